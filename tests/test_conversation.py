"""The chat format (conversation.py): the special tokens every vocabulary reserves, a conversation
rendered as ids with its loss mask, the prompt that generation starts from, the rows sft.py reads,
and the same ids through transformers' apply_chat_template."""
import json

import pytest
from helpers import ROOT

from configurator import UserError
from conversation import (
    CHAT_TEMPLATE,
    CHAT_TOKENS,
    chat_token_ids,
    conversation_from_row,
    render_conversation,
    render_prompt,
    stop_ids,
)
from tokenizer import EOT, gpt2_tokenizer, load_tokenizer, train_bpe

CONVERSATION = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Who wrote Hamlet?"},
    {"role": "assistant", "content": "Shakespeare."},
    {"role": "user", "content": "And Macbeth?"},
    {"role": "assistant", "content": "Shakespeare, again."},
]


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


def test_the_chat_tokens_follow_endoftext_in_both_vocabularies(gpt2):
    assert gpt2.special_tokens == {EOT: 50256, "<|system|>": 50257, "<|user|>": 50258,
                                   "<|assistant|>": 50259, "<|end|>": 50260}
    assert gpt2.vocab_size == 50261
    # the trained BPE keeps the vocabulary size asked for: 4 fewer merges make room
    bpe = train_bpe([(ROOT / "README.md").read_text()], 300)
    assert bpe.vocab_size == 300 and bpe.eot_id == 295
    assert list(bpe.special_tokens.values()) == list(range(295, 300))
    # text that spells a chat token is text, never the token
    assert not set(bpe.encode("<|user|> <|end|>")) & set(bpe.special_tokens.values())


def test_the_mask_covers_exactly_each_assistant_answer_and_its_end(gpt2):
    ids, mask = render_conversation(gpt2, CONVERSATION)
    special = chat_token_ids(gpt2)
    system, user, assistant, end = (special[t] for t in CHAT_TOKENS)
    expected, learned = [gpt2.eot_id], []
    for message in CONVERSATION:
        content = gpt2.encode(message["content"])
        expected += [{"system": system, "user": user, "assistant": assistant}[message["role"]],
                     *content, end]
        if message["role"] == "assistant":
            learned += [*content, end]
    assert ids == expected and len(mask) == len(ids)
    assert [i for i, m in zip(ids, mask, strict=True) if m] == learned
    # both answers' tokens are learned, each ending with <|end|>; the turn starts and the user's
    # and system's words are context
    answers = [gpt2.encode(text) for text in ("Shakespeare.", "Shakespeare, again.")]
    assert sum(mask) == len(answers[0]) + 1 + len(answers[1]) + 1
    assert gpt2.decode([i for i, m in zip(ids, mask, strict=True) if m]) == \
        "Shakespeare.<|end|>Shakespeare, again.<|end|>"


def test_the_prompt_is_the_history_then_the_assistants_turn_start(gpt2):
    ids = render_prompt(gpt2, CONVERSATION[:2])
    assert gpt2.decode(ids) == ("<|endoftext|><|system|>Answer in one word.<|end|>"
                                "<|user|>Who wrote Hamlet?<|end|><|assistant|>")
    assert ids == render_conversation(gpt2, CONVERSATION[:3])[0][:len(ids)]
    assert stop_ids(gpt2) == [50260, 50256]


def test_a_vocabulary_without_the_chat_tokens_says_what_to_run(gpt2):
    old = gpt2_tokenizer(chat=False)
    assert old.vocab_size == 50257 and stop_ids(old) == [50256]
    with pytest.raises(UserError, match="no <|system|>.*sft.py"):
        render_prompt(old, CONVERSATION[:2])


@pytest.mark.parametrize("row, message", [
    ({"text": "hello"}, 'needs "messages"'),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "user"}]}, 'string "content"'),
    ({"messages": [{"role": "tool", "content": "x"}]}, "unknown role 'tool'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " "}]},
     "assistant turn is empty"),
])
def test_a_malformed_row_is_one_line_naming_where(row, message):
    with pytest.raises(UserError, match=message) as e:
        conversation_from_row(row, "chat.jsonl:3")
    assert str(e.value).startswith("chat.jsonl:3: ")


def test_an_alpaca_row_is_a_question_and_its_answer():
    row = {"instruction": "Name the play.", "input": "To be, or not to be", "output": "Hamlet"}
    assert conversation_from_row(row, "x") == [
        {"role": "user", "content": "Name the play.\n\nTo be, or not to be"},
        {"role": "assistant", "content": "Hamlet"}]
    assert conversation_from_row({**row, "input": ""}, "x")[0]["content"] == "Name the play."


def test_transformers_chat_template_gives_the_same_ids(shakespeare_dir, tmp_path):
    """export.py's tokenizer files: apply_chat_template renders exactly render_prompt's and
    render_conversation's ids."""
    from transformers import AutoTokenizer

    from huggingface import write_tokenizer

    tokenizer = load_tokenizer(shakespeare_dir)
    write_tokenizer(tokenizer, tmp_path, 64)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    hf = AutoTokenizer.from_pretrained(tmp_path)
    for turns in (1, 3, 5):
        messages = CONVERSATION[:turns]
        # transformers 5 hands back a BatchEncoding
        assert hf.apply_chat_template(messages, add_generation_prompt=True)["input_ids"] == \
            render_prompt(tokenizer, messages)
        assert hf.apply_chat_template(messages)["input_ids"] == \
            render_conversation(tokenizer, messages)[0]
    with pytest.raises(Exception, match="roles are system, user and assistant"):
        hf.apply_chat_template([{"role": "tool", "content": "x"}])


def test_a_dataset_prepared_without_the_chat_tokens_reads_as_it_was(shakespeare_dir, tmp_path):
    """meta.json lists <|endoftext|> alone: the vocabulary is its merges and that one token, so a
    model pretrained on it keeps its shape."""
    meta = json.loads((shakespeare_dir / "meta.json").read_text())
    (tmp_path / "tokenizer.tiktoken").write_bytes((shakespeare_dir / "tokenizer.tiktoken")
                                                  .read_bytes())
    old = {**meta, "vocab_size": 8188, "special_tokens": {EOT: 8187}}
    (tmp_path / "meta.json").write_text(json.dumps(old))
    tokenizer = load_tokenizer(tmp_path)
    assert (tokenizer.vocab_size, tokenizer.eot_id, tokenizer.special_tokens) == (8188, 8187,
                                                                                  {EOT: 8187})
    assert tokenizer.encode("ROMEO:") == load_tokenizer(shakespeare_dir).encode("ROMEO:")
    assert stop_ids(tokenizer) == [8187]
