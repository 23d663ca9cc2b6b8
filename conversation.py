"""The chat format: how a conversation becomes token ids, which of them a fine-tuned model learns,
and the same rules as a Jinja chat template for Hugging Face and llama.cpp.

A conversation is a list of messages, {"role": "system" | "user" | "assistant", "content": str},
the Hugging Face convention. It reaches the model as

    <|endoftext|> <|user|> ...question... <|end|> <|assistant|> ...answer... <|end|> ...

each turn being its role's start token, the content encoded as any text is, and <|end|>. The
<|endoftext|> in front is where every pretraining document starts (tokenizer.prompt_ids), so a
conversation reads to the model as the start of a text. Supervised fine-tuning (sft.py) learns only
what the assistant says: its content and the <|end|> that closes it, in every assistant turn; the
rest is context. Generation stops at <|end|>.

The API other files rely on (kept stable):
    ROLES, TURN_START (role -> token), END_OF_TURN, CHAT_TOKENS, CHAT_TEMPLATE
    check_conversation(messages, where) -> messages    a UserError naming `where` if malformed
    conversation_from_row(row, where) -> messages      a jsonl row: "messages", or Alpaca's fields
    chat_token_ids(tokenizer) -> {token: id}           a UserError if the vocabulary lacks them
    render_conversation(tokenizer, messages) -> (ids, mask)   mask[i] = 1: ids[i] is learned
    render_prompt(tokenizer, messages) -> ids          history + the assistant's turn start
    stop_ids(tokenizer) -> [ids]                       where a reply ends: <|end|>, <|endoftext|>
"""
from configurator import UserError

ROLES = ("system", "user", "assistant")
# Four tokens: a start per role and one end shared by all of them. A role as one token cannot be
# confused with text that happens to spell it, and one end token is one id for generation to stop
# at, in this repository, in transformers and in llama.cpp alike. A separate end per role would add
# ids that mean the same thing; a role spelled in text between header tokens (LLaMA 3's way) would
# cost more tokens per turn and depend on how the tokenizer splits the role's name.
TURN_START = {role: f"<|{role}|>" for role in ROLES}
END_OF_TURN = "<|end|>"
CHAT_TOKENS = (*TURN_START.values(), END_OF_TURN)

# The same rendering in Jinja, the language of Hugging Face's chat_template and GGUF's
# tokenizer.chat_template: bos_token is <|endoftext|> in every export, and the special tokens'
# texts are read back as their ids when the rendered string is tokenized.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system', 'user', "
    "'assistant'] %}{{ raise_exception('the roles are system, user and assistant') }}{% endif %}{{ "
    "'<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def check_conversation(messages, where: str) -> list[dict]:
    """messages if they are a conversation this format can render, else a UserError that names
    `where` (a file and line): a list of {"role", "content"} with known roles, string contents, and
    no empty assistant turn (it would teach the model to stop at once)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: \"messages\" must be a non-empty list of "
                        "{\"role\", \"content\"} objects")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise UserError(f"{where}: every message needs a \"role\" and a string \"content\"")
        if message.get("role") not in ROLES:
            raise UserError(f"{where}: unknown role {message.get('role')!r}; the roles are "
                            f"{', '.join(ROLES)}")
        if message["role"] == "assistant" and not message["content"].strip():
            raise UserError(f"{where}: an assistant turn is empty; give it content or drop it")
    return messages


def conversation_from_row(row, where: str) -> list[dict]:
    """The conversation of one jsonl row: its "messages", or an Alpaca row (instruction, optional
    input, output) as one user turn and the assistant's answer."""
    if isinstance(row, dict) and "messages" in row:
        return check_conversation(row["messages"], where)
    if isinstance(row, dict) and "instruction" in row and "output" in row:
        question = "\n\n".join(part for part in (row["instruction"], row.get("input")) if part)
        return check_conversation([{"role": "user", "content": question},
                                   {"role": "assistant", "content": row["output"]}], where)
    raise UserError(f"{where}: a row needs \"messages\" (a list of {{\"role\", \"content\"}}) or "
                    "Alpaca's \"instruction\" and \"output\"")


def chat_token_ids(tokenizer) -> dict[str, int]:
    """The ids of CHAT_TOKENS in this vocabulary; a UserError if it was built without them."""
    missing = [token for token in CHAT_TOKENS if token not in tokenizer.special_tokens]
    if missing:
        raise UserError(f"the tokenizer has no {', '.join(missing)}; fine-tune it with sft.py "
                        "first (it adds the chat tokens), or prepare the data again with "
                        "prepare.py, which reserves them")
    return {token: tokenizer.special_tokens[token] for token in CHAT_TOKENS}


def render_conversation(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """ids of the conversation and its loss mask, one flag per id: 1 where the id is what the
    assistant says (its content and its <|end|>), 0 for <|endoftext|>, the turn starts and what the
    system and the user say."""
    special = chat_token_ids(tokenizer)
    ids, mask = [tokenizer.eot_id], [0]
    for message in messages:
        content = tokenizer.encode(message["content"])
        learned = int(message["role"] == "assistant")
        ids += [special[TURN_START[message["role"]]], *content, special[END_OF_TURN]]
        mask += [0] + [learned] * (len(content) + 1)
    return ids, mask


def render_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """What generation starts from: the conversation so far, then the assistant's turn start."""
    ids, _ = render_conversation(tokenizer, messages)
    return ids + [chat_token_ids(tokenizer)[TURN_START["assistant"]]]


def stop_ids(tokenizer) -> list[int]:
    """The ids a reply ends at: <|end|> where the vocabulary has it, and <|endoftext|>, which is
    where a base model stops."""
    end = tokenizer.special_tokens.get(END_OF_TURN)
    return [tokenizer.eot_id] if end is None else [end, tokenizer.eot_id]
