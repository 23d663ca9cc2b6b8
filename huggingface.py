"""The Hugging Face format, both ways: model.py's weights and config as a LlamaForCausalLM
directory's (config.json, model.safetensors), tiktoken's vocabulary as tokenizer.json, and such a
directory read back.

export.py writes a directory with these (hf_name, hf_config, write_tokenizer); train.py --init_from
starts from one (hf_architecture, load_hf_weights); eval.py scores one (load_hf_model); export.py's
GGUF file stores the same byte-level vocabulary (byte_level_vocabulary).

Reading order: parameter names -> config.json, both ways -> reading a directory -> the tokenizer.
"""
import dataclasses
import json
import shutil
from pathlib import Path

from configurator import UserError
from conversation import CHAT_TEMPLATE, CHAT_TOKENS
from model import ModelConfig, Transformer, ffn_width
from tokenizer import EOT, load_tokenizer

# --------------------------------------------------------------------------------------------------
# Parameter names. Both models pair rotary dimension i with i + head_dim/2 ("rotate half"), use the
# same frequencies, and give query head h the key/value head h // group; tests/test_export.py checks
# this by comparing logits. So the conversion is pure renaming: no q/k rows are permuted.
LAYER_NAMES = {
    "attention_norm": "input_layernorm", "attention.wq": "self_attn.q_proj",
               "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
               "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
               "feed_forward.w2": "mlp.down_proj",
}
OTHER_NAMES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def hf_name(name: str) -> str:
    """A model.py parameter name as Hugging Face calls it: layers.3.attention.wq.weight ->
    model.layers.3.self_attn.q_proj.weight."""
    module = name.removesuffix(".weight")
    if module.startswith("layers."):
        _, index, inner = module.split(".", 2)
        return f"model.layers.{index}.{LAYER_NAMES[inner]}.weight"
    return f"{OTHER_NAMES[module]}.weight"


def hf_config(c: ModelConfig, eot_id: int, dtype: str) -> dict:
    """config.json of a LlamaForCausalLM computing exactly what model.py computes with config c."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd, "intermediate_size": ffn_width(c.n_embd, c.multiple_of),
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
            "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.n_embd // c.n_heads, "hidden_act": "silu", "rms_norm_eps": c.eps,
            "rope_theta": c.theta,
        "rope_scaling": None, "max_position_embeddings": c.max_seq_len,
            "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "initializer_range": 0.02,
        # <|endoftext|> separates documents in training, so it is both the start a prompt follows
        # and the stop.
        "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": dtype, "use_cache": True,
    }


def model_config_from_hf(hf: dict, where: str, multiple_of: int) -> dict:
    """The ModelConfig fields (all but max_seq_len and dropout, which are training choices) of a
    config.json.

    What model.py cannot compute exactly is refused, naming the field. multiple_of is kept when it
    gives the file's intermediate_size, otherwise the width itself is used as the multiple."""

    def refuse(field, why):
        raise UserError(f"{where} has {field}={hf.get(field)!r}, but {why}; use a model without it")

    if hf.get("model_type") != "llama":
        refuse("model_type", "only LlamaForCausalLM (model_type 'llama') is read")
    # transformers 5 nests it here
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")
    if hf.get("rope_scaling") or rope_type != "default":
        refuse("rope_scaling" if hf.get("rope_scaling") else "rope_parameters",
               "model.py has plain RoPE only (no rope_scaling)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            refuse(field, "model.py's linear layers have no biases")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "model.py's feed-forward is SwiGLU (silu)")
    try:
        n_embd, n_heads, width = (hf["hidden_size"], hf["num_attention_heads"],
                                  hf["intermediate_size"])
        fields = {"vocab_size": hf["vocab_size"], "n_embd": n_embd, "n_heads": n_heads,
                  "n_kv_heads": hf.get("num_key_value_heads") or n_heads,
                  "n_layers": hf["num_hidden_layers"],
                  "eps": hf.get("rms_norm_eps", 1e-6),
                  "theta": float((hf.get("rope_parameters") or {}).get(
                      "rope_theta", hf.get("rope_theta", 10_000.0))),
                  "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}
    except KeyError as e:
        raise UserError(f"{where} has no {e.args[0]}; it is not a complete Llama config") from None
    if hf.get("head_dim") not in (None, n_embd // n_heads):
        refuse("head_dim",
               f"model.py's head size is hidden_size / num_attention_heads = {n_embd // n_heads}")
    if ffn_width(n_embd, multiple_of) != width:
        multiple_of = width
    if ffn_width(n_embd, multiple_of) != width:
        refuse("intermediate_size",
               f"model.py's SwiGLU width is at least 8/3 * hidden_size = {8 * n_embd // 3}")
    return fields | {"multiple_of": multiple_of}



# --------------------------------------------------------------------------------------------------
# Reading a directory: train.py --init_from and eval.py start from a Hugging Face model.
def read_config_json(directory: Path, multiple_of: int) -> tuple[dict, dict]:
    """A Hugging Face model directory's config.json, and the ModelConfig fields it gives
    (model_config_from_hf's)."""
    try:
        hf = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{directory} has no readable config.json; it is not a Hugging Face model "
                        "directory") from None
    return hf, model_config_from_hf(hf, str(directory / "config.json"), multiple_of)


def refuse_contradictions(cfg, fields: dict, source: str):
    """With --init_from the architecture comes from `source`: a setting the user chose
    (cfg.user_set) that differs from its `fields` is a mistake, refused."""
    for name, value in fields.items():
        if name in cfg.user_set and getattr(cfg, name) != value:
            raise UserError(f"{name}={getattr(cfg, name)} (set in a config file or on the command "
                            f"line) contradicts {source} ({name}={value}); drop it: with "
                            f"--init_from the architecture comes from {source}")


def hf_architecture(cfg, vocab_size: int) -> tuple[object, int]:
    """train.py --init_from=DIR, first step, before anything is built or written: the run's config
    (a TrainConfig) with DIR's architecture, from its config.json, and the size of DIR's embedding.

    A setting the user chose (cfg.user_set) that contradicts config.json is refused, and so is a
    dataset whose vocabulary the embedding cannot hold. The config returned holds config.json's
    values, so checkpoints record them; the training choices (max_seq_len, dropout, batch, schedule)
    stay the run's."""
    root = Path(cfg.init_from)
    _, fields = read_config_json(root, cfg.multiple_of)
    refuse_contradictions(cfg, fields, f"{root}/config.json")
    if vocab_size > fields["vocab_size"]:
        raise UserError(f"{cfg.dataset_dir}'s vocabulary has {vocab_size} ids but {root}'s "
                        "embedding only "
                        f"{fields['vocab_size']}; prepare the data with --tokenizer={root}")
    return dataclasses.replace(cfg,
                               **{k: v for k,
                                  v in fields.items() if k != "vocab_size"}), fields["vocab_size"]


def load_hf_weights(model: Transformer, directory: str):
    """train.py --init_from=DIR, second step: DIR's safetensors weights into `model` (built with
    hf_architecture's config), each tensor renamed to model.py's name, checked against its shape and
    kept in fp32 for training."""
    from safetensors.torch import load_file

    root = Path(directory)
    index = root / "model.safetensors.index.json"  # big models are split over several files
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    if not (root / files[0]).exists():
        raise UserError(f"{root} has no model.safetensors; only safetensors weights are read "
                        "(re-save the model with transformers' save_pretrained)")
    tied = model.config.tie_embeddings
    expected = {hf_name(n): (n, t.shape) for n,
                t in model.state_dict().items() if not (tied and n == "output.weight")}
    weights = {}
    for name, tensor in ((n, t) for file in files for n, t in load_file(root / file).items()):
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            # derived from the config (older transformers saved it), or a copy of the embedding
            continue
        if name not in expected:
            raise UserError(f"{root} holds the tensor {name}, which model.py has no place for; it "
                            "is not a plain Llama checkpoint (quantized? another architecture?)")
        ours, shape = expected.pop(name)
        if tensor.shape != shape:
            raise UserError(f"{root}: {name} has shape {tuple(tensor.shape)} but config.json "
                            f"implies {tuple(shape)}")
        weights[ours] = tensor.float()  # training keeps fp32 weights, whatever the file holds
    if expected:
        raise UserError(f"{root} lacks the tensor {next(iter(expected))}; the checkpoint is "
                        "incomplete")
    if tied:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    model.load_state_dict(weights)


# --------------------------------------------------------------------------------------------------
# The tokenizer: tiktoken's ranks rebuilt as a Hugging Face `tokenizers` BPE that splits and merges
# identically.
def byte_characters() -> dict[int, str]:
    """GPT-2's byte-level alphabet, which tokenizer.json uses to write any byte string as text: the
    printable Latin-1 bytes stand for themselves, the 68 others (controls, space, ...) for the
    characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The pair each token was merged from, in rank order: what tokenizer.json's BPE needs and
    tiktoken never stores.

    tiktoken encodes a piece by repeatedly joining the adjacent pair whose concatenation has the
    lowest rank. Run on a token's own bytes with only lower ranks allowed, that rule stops at the
    two parts the token is made of."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:], strict=False)]
            best = pair_ranks.index(min(pair_ranks))
            if pair_ranks[best] >= rank:
                # not reachable by merges (never the case for a trained BPE); found whole via
                # ignore_merges
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def byte_level_vocabulary(tokenizer) -> tuple[list[str], list[tuple[str, str]]]:
    """The tiktoken vocabulary (bpe or gpt2) as GPT-2's byte-level text, which both tokenizer.json
    and GGUF store:
    the mergeable tokens in id order, and the merges in rank order."""
    # In both vocabularies the mergeable tokens are ids 0 .. eot_id - 1 and <|endoftext|> comes
    # right after.
    ranks = {tokenizer.encoding.decode_single_token_bytes(i): i for i in range(tokenizer.eot_id)}
    chars = byte_characters()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    return [text(token) for token in ranks], [(text(a), text(b)) for a,
                                              b in merges_from_ranks(ranks)]


def hf_tokenizer(tokenizer):
    """A `tokenizers` Tokenizer that encodes every text to the same ids as the tiktoken one (bpe or
    gpt2)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as FastTokenizer

    tokens, merges = byte_level_vocabulary(tokenizer)
    vocab = {token: rank for rank, token in enumerate(tokens)}
    # ignore_merges: a piece that is itself a token is taken whole, as tiktoken does, before any
    # merging.
    fast = FastTokenizer(models.BPE(vocab, merges, ignore_merges=True))
    # First the same regex split as tiktoken, then bytes -> alphabet characters (its own regex
    # switched off).
    fast.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    fast.decoder = decoders.ByteLevel()
    # <|endoftext|> and the chat tokens, in id order right after the last rank, as in tiktoken
    fast.add_special_tokens([AddedToken(token, special=True, normalized=False)
                             for token in tokenizer.special_tokens])
    assert {token: fast.token_to_id(token) for token in tokenizer.special_tokens} == \
        tokenizer.special_tokens
    # tokenizer(text) gives what sample.py feeds the model (prepare.prompt_ids): <|endoftext|>, then
    # the text;
    # add_special_tokens=False gives the text alone.
    fast.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A $B:1",
                                                        special_tokens=[(EOT, tokenizer.eot_id)])
    return fast


def write_tokenizer(tokenizer, directory: Path, max_seq_len: int):
    """tokenizer.json + tokenizer_config.json, which AutoTokenizer loads as a fast tokenizer."""
    # the dataset was encoded with a tokenizer.json already (prepare --tokenizer=DIR)
    if tokenizer.name == "hf":
        shutil.copyfile(tokenizer.path, directory / "tokenizer.json")
    else:
        hf_tokenizer(tokenizer).save(str(directory / "tokenizer.json"))
    eot = tokenizer.decode([tokenizer.eot_id])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
              "model_max_length": max_seq_len,
              # LLaMA takes no token_type_ids; listed, transformers 4.x hands them to generate(),
              # which refuses them
              "model_input_names": ["input_ids", "attention_mask"],
              # transformers would otherwise "tidy" decoded text (" ." -> "."), so decode(encode(s))
              # != s
              "clean_up_tokenization_spaces": False}
    if all(token in tokenizer.special_tokens for token in CHAT_TOKENS):
        # apply_chat_template renders conversations as conversation.py does
        config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_hf_model(directory: Path) -> tuple[Transformer, object]:
    """A Hugging Face LlamaForCausalLM directory (export.py's, or a published one) as a model.py
    Transformer in fp32, with its tokenizer; what model.py cannot compute exactly is refused, as for
    train.py --init_from."""
    if not (directory / "tokenizer.json").exists():
        raise UserError(f"{directory} has no tokenizer.json; save the model's fast tokenizer there "
                        "(transformers' AutoTokenizer.from_pretrained(...).save_pretrained) to "
                        "score it")
    tokenizer = load_tokenizer(directory)
    hf, fields = read_config_json(directory, ModelConfig.multiple_of)
    # The context the harness gives the model is config.json's too (LlamaConfig's default when it is
    # missing).
    config = ModelConfig(**fields, max_seq_len=hf.get("max_position_embeddings", 2048))
    if tokenizer.vocab_size > config.vocab_size:
        raise UserError(f"{directory}'s tokenizer has {tokenizer.vocab_size} ids but its embedding "
                        f"only {config.vocab_size} rows; the tokenizer belongs to another model")
    model = Transformer(config)
    load_hf_weights(model, str(directory))
    return model.eval(), tokenizer
