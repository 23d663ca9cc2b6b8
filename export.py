"""Export a checkpoint as a Hugging Face LlamaForCausalLM directory or as a GGUF file for llama.cpp; read such a
directory back for train.py.

    python export.py --ckpt_dir=out --out_dir=out/hf                  # the newest checkpoint, weights as trained
    python export.py --ckpt=out/ckpt_00000488.pt --out_dir=out/hf_bf16 --dtype=bfloat16 --overwrite
    python export.py --ckpt_dir=out --format=gguf --out=out/model.gguf --dtype=q8_0
    python export.py --ckpt_dir=out --ckpt=best --out_dir=out/hf_best   # the lowest validation loss of the run

The directory (config.json, model.safetensors, generation_config.json, tokenizer.json, tokenizer_config.json,
README.md) is what the rest of the ecosystem starts from: transformers' AutoModelForCausalLM and AutoTokenizer,
vLLM, lm-evaluation-harness, the Hub. The way back in is `python train.py --init_from=DIR` (hf_architecture below) and
`python prepare.py --tokenizer=DIR`.

Reading order: parameter names -> config.json, both ways -> reading a directory (hf_architecture, load_hf_weights)
-> the tokenizer (tiktoken's ranks -> tokenizer.json) -> the model card -> GGUF (export_gguf) -> export().
"""
import csv
import dataclasses
import json
import math
import os
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from checkpoint import load_model
from configurator import UserError, load_config, run_cli
from model import ModelConfig, Transformer, ffn_width
from prepare import EOT, publish, read_meta

# ----------------------------------------------------------------------------------------------------------------
# Parameter names. Both models pair rotary dimension i with i + head_dim/2 ("rotate half"), use the same
# frequencies, and give query head h the key/value head h // group; tests/test_export.py checks this by comparing
# logits. So the conversion is pure renaming: no q/k rows are permuted.
LAYER_NAMES = {
    "attention_norm": "input_layernorm", "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
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
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.n_embd // c.n_heads, "hidden_act": "silu", "rms_norm_eps": c.eps, "rope_theta": c.theta,
        "rope_scaling": None, "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02,
        # <|endoftext|> separates documents in training, so it is both the start a prompt follows and the stop.
        "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": dtype, "use_cache": True,
    }


def model_config_from_hf(hf: dict, where: str, multiple_of: int) -> dict:
    """The ModelConfig fields (all but max_seq_len and dropout, which are training choices) of a config.json.

    What model.py cannot compute exactly is refused, naming the field. multiple_of is kept when it gives the file's
    intermediate_size, otherwise the width itself is used as the multiple."""

    def refuse(field, why):
        raise UserError(f"{where} has {field}={hf.get(field)!r}, but {why}; use a model without it")

    if hf.get("model_type") != "llama":
        refuse("model_type", "only LlamaForCausalLM (model_type 'llama') is read")
    rope_type = (hf.get("rope_parameters") or {}).get("rope_type", "default")  # transformers 5 nests it here
    if hf.get("rope_scaling") or rope_type != "default":
        refuse("rope_scaling" if hf.get("rope_scaling") else "rope_parameters",
               "model.py has plain RoPE only (no rope_scaling)")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field):
            refuse(field, "model.py's linear layers have no biases")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "model.py's feed-forward is SwiGLU (silu)")
    try:
        n_embd, n_heads, width = hf["hidden_size"], hf["num_attention_heads"], hf["intermediate_size"]
        fields = {"vocab_size": hf["vocab_size"], "n_embd": n_embd, "n_heads": n_heads,
                  "n_kv_heads": hf.get("num_key_value_heads") or n_heads, "n_layers": hf["num_hidden_layers"],
                  "eps": hf.get("rms_norm_eps", 1e-6),
                  "theta": float((hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10_000.0))),
                  "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}
    except KeyError as e:
        raise UserError(f"{where} has no {e.args[0]}; it is not a complete Llama config") from None
    if hf.get("head_dim") not in (None, n_embd // n_heads):
        refuse("head_dim", f"model.py's head size is hidden_size / num_attention_heads = {n_embd // n_heads}")
    if ffn_width(n_embd, multiple_of) != width:
        multiple_of = width
    if ffn_width(n_embd, multiple_of) != width:
        refuse("intermediate_size", f"model.py's SwiGLU width is at least 8/3 * hidden_size = {8 * n_embd // 3}")
    return fields | {"multiple_of": multiple_of}


def hf_architecture(cfg, vocab_size: int) -> tuple[object, int]:
    """train.py --init_from=DIR, first step, before anything is built or written: the run's config (a TrainConfig)
    with DIR's architecture, from its config.json, and the size of DIR's embedding.

    A setting the user chose (cfg.user_set) that contradicts config.json is refused, and so is a dataset whose
    vocabulary the embedding cannot hold. The config returned holds config.json's values, so checkpoints record
    them; the training choices (max_seq_len, dropout, batch, schedule) stay the run's."""
    root = Path(cfg.init_from)
    try:
        hf = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        raise UserError(f"{root} has no readable config.json; --init_from takes a Hugging Face model directory") \
            from None
    fields = model_config_from_hf(hf, str(root / "config.json"), cfg.multiple_of)
    for name, value in fields.items():
        if name in cfg.user_set and getattr(cfg, name) != value:
            raise UserError(f"{name}={getattr(cfg, name)} (set in a config file or on the command line) contradicts "
                            f"{root}/config.json ({name}={value}); drop it: with --init_from the architecture comes "
                            "from config.json")
    if vocab_size > fields["vocab_size"]:
        raise UserError(f"{cfg.dataset_dir}'s vocabulary has {vocab_size} ids but {root}'s embedding only "
                        f"{fields['vocab_size']}; prepare the data with --tokenizer={root}")
    return dataclasses.replace(cfg, **{k: v for k, v in fields.items() if k != "vocab_size"}), fields["vocab_size"]


def load_hf_weights(model: Transformer, directory: str):
    """train.py --init_from=DIR, second step: DIR's safetensors weights into `model` (built with hf_architecture's
    config), each tensor renamed to model.py's name, checked against its shape and kept in fp32 for training."""
    from safetensors.torch import load_file

    root = Path(directory)
    index = root / "model.safetensors.index.json"  # big models are split over several files
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
        else ["model.safetensors"]
    if not (root / files[0]).exists():
        raise UserError(f"{root} has no model.safetensors; only safetensors weights are read (re-save the model "
                        "with transformers' save_pretrained)")
    tied = model.config.tie_embeddings
    expected = {hf_name(n): (n, t.shape) for n, t in model.state_dict().items() if not (tied and n == "output.weight")}
    weights = {}
    for name, tensor in ((n, t) for file in files for n, t in load_file(root / file).items()):
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # derived from the config (older transformers saved it), or a copy of the embedding
        if name not in expected:
            raise UserError(f"{root} holds the tensor {name}, which model.py has no place for; it is not a plain "
                            "Llama checkpoint (quantized? another architecture?)")
        ours, shape = expected.pop(name)
        if tensor.shape != shape:
            raise UserError(f"{root}: {name} has shape {tuple(tensor.shape)} but config.json implies {tuple(shape)}")
        weights[ours] = tensor.float()  # training keeps fp32 weights, whatever the file holds
    if expected:
        raise UserError(f"{root} lacks the tensor {next(iter(expected))}; the checkpoint is incomplete")
    if tied:
        weights["output.weight"] = weights["tok_embeddings.weight"]
    model.load_state_dict(weights)


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer: tiktoken's ranks rebuilt as a Hugging Face `tokenizers` BPE that splits and merges identically.
def byte_characters() -> dict[int, str]:
    """GPT-2's byte-level alphabet, which tokenizer.json uses to write any byte string as text: the printable
    Latin-1 bytes stand for themselves, the 68 others (controls, space, ...) for the characters from U+0100 on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The pair each token was merged from, in rank order: what tokenizer.json's BPE needs and tiktoken never stores.

    tiktoken encodes a piece by repeatedly joining the adjacent pair whose concatenation has the lowest rank. Run
    on a token's own bytes with only lower ranks allowed, that rule stops at the two parts the token is made of."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            pair_ranks = [ranks.get(a + b, rank) for a, b in zip(parts, parts[1:], strict=False)]
            best = pair_ranks.index(min(pair_ranks))
            if pair_ranks[best] >= rank:
                break  # not reachable by merges (never the case for a trained BPE); found whole via ignore_merges
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def byte_level_vocabulary(tokenizer) -> tuple[list[str], list[tuple[str, str]]]:
    """The tiktoken vocabulary (bpe or gpt2) as GPT-2's byte-level text, which both tokenizer.json and GGUF store:
    the mergeable tokens in id order, and the merges in rank order."""
    # In both vocabularies the mergeable tokens are ids 0 .. eot_id - 1 and <|endoftext|> comes right after.
    ranks = {tokenizer.encoding.decode_single_token_bytes(i): i for i in range(tokenizer.eot_id)}
    chars = byte_characters()

    def text(token: bytes) -> str:
        return "".join(chars[b] for b in token)

    return [text(token) for token in ranks], [(text(a), text(b)) for a, b in merges_from_ranks(ranks)]


def hf_tokenizer(tokenizer):
    """A `tokenizers` Tokenizer that encodes every text to the same ids as the tiktoken one (bpe or gpt2)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as FastTokenizer

    tokens, merges = byte_level_vocabulary(tokenizer)
    vocab = {token: rank for rank, token in enumerate(tokens)}
    # ignore_merges: a piece that is itself a token is taken whole, as tiktoken does, before any merging.
    fast = FastTokenizer(models.BPE(vocab, merges, ignore_merges=True))
    # First the same regex split as tiktoken, then bytes -> alphabet characters (its own regex switched off).
    fast.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    fast.decoder = decoders.ByteLevel()
    fast.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    assert fast.token_to_id(EOT) == tokenizer.eot_id  # the id right after the last rank, as in tiktoken
    # tokenizer(text) gives what sample.py feeds the model (prepare.prompt_ids): <|endoftext|>, then the text;
    # add_special_tokens=False gives the text alone.
    fast.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A $B:1",
                                                        special_tokens=[(EOT, tokenizer.eot_id)])
    return fast


def write_tokenizer(tokenizer, directory: Path, max_seq_len: int):
    """tokenizer.json + tokenizer_config.json, which AutoTokenizer loads as a fast tokenizer."""
    if tokenizer.name == "hf":  # the dataset was encoded with a tokenizer.json already (prepare --tokenizer=DIR)
        shutil.copyfile(tokenizer.path, directory / "tokenizer.json")
    else:
        hf_tokenizer(tokenizer).save(str(directory / "tokenizer.json"))
    eot = tokenizer.decode([tokenizer.eot_id])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
              "model_max_length": max_seq_len,
              # LLaMA takes no token_type_ids; listed, transformers 4.x hands them to generate(), which refuses them
              "model_input_names": ["input_ids", "attention_mask"],
              # transformers would otherwise "tidy" decoded text (" ." -> "."), so decode(encode(s)) != s
              "clean_up_tokenization_spaces": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# The model card: what the checkpoint and its log say about how the model was made.
def final_validation(log_file: Path, step: int) -> dict | None:
    """The last evaluated row of the CSV log at or before the checkpoint's update, if the log is still there."""
    if not log_file.exists():
        return None
    with open(log_file, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["val_loss"] and int(row["step"]) <= step]
    return rows[-1] if rows else None


def model_card(ckpt: dict, path: Path, meta: dict, model_cfg: ModelConfig, n_params: int) -> str:
    cfg = ckpt["config"]  # the training run's whole config
    row = final_validation(Path(cfg["log_file"]) if cfg["log_file"] else path.parent / "log.csv", ckpt["step"])
    val = (f"{float(row['val_loss']):.4f} nats/token, {float(row['val_bpb']):.4f} bits/byte (update {row['step']}, "
           f"{cfg['eval_tokens']:,} validation tokens)" if row else "not recorded (no log.csv next to the checkpoint)")
    command = f"`{shlex.join(['python', 'train.py', *ckpt['argv']])}`" if "argv" in ckpt \
        else "not recorded (the checkpoint predates it)"
    c = model_cfg
    architecture = (f"LlamaForCausalLM: {c.n_layers} layers, width {c.n_embd}, {c.n_heads} query / {c.n_kv_heads} "
                    f"key-value heads, SwiGLU width {ffn_width(c.n_embd, c.multiple_of)}, RoPE theta {c.theta:g}, "
                    f"tied embeddings: {'yes' if c.tie_embeddings else 'no'}")
    trained = (f"{ckpt['tokens']:,} ({ckpt['step']:,} updates of {cfg['tokens_per_update']:,} tokens, "
               f"{ckpt['elapsed_s'] / 60:.1f} minutes)")
    if cfg["init_from"]:
        trained += f", starting from the weights of `{cfg['init_from']}`"
    return f"""---
library_name: transformers
pipeline_tag: text-generation
---
# A {n_params / 1e6:.1f}M-parameter LLaMA-style model

Pretrained from scratch by next-token prediction, exported from `{path}` by export.py.

| | |
|---|---|
| parameters | {n_params:,} |
| architecture | {architecture} |
| context | {c.max_seq_len} tokens (the length it was trained on) |
| dataset | `{cfg["dataset_dir"]}`: {meta.get("source", "unknown source")} |
| tokenizer | {meta.get("tokenizer")}, {meta.get("vocab_size"):,} ids; every document ends with the end-of-text token |
| tokens trained | {trained} |
| final validation loss | {val} |
| training command | {command} |

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")
inputs = tokenizer("ROMEO:", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=100)[0]))  # samples: see generation_config.json
```
"""


# ----------------------------------------------------------------------------------------------------------------
# GGUF: one file holding weights, shape and tokenizer, which llama.cpp runs (and Ollama, LM Studio and
# llama-cpp-python, which are built on it). llama.cpp's own converter cannot read our Hugging Face export: it knows a
# tokenizer only by the ids that published models' tokenizers give a fixed string, so the file is written here.
GGUF_NAMES = {
    "tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
    "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
    "attention.wo": "attn_output", "ffn_norm": "ffn_norm", "feed_forward.w1": "ffn_gate",
    "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down",
}
# --dtype -> how the matrices are stored, and the file type that llama.cpp reports for it.
GGUF_DTYPES = {"float32": ("F32", "ALL_F32"), "float16": ("F16", "MOSTLY_F16"), "bfloat16": ("BF16", "MOSTLY_BF16"),
               "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# llama.cpp splits text with one of a fixed set of regexes, named by tokenizer.ggml.pre. gpt2's is GPT-2's own.
# prepare.py's (GPT-4's with numbers in chunks of at most 2 digits) is not among them; llama-bpe is the same
# regex with chunks of up to 3 digits, so only runs of 3 or more digits may be split differently.
GGUF_PRE_TOKENIZERS = {"gpt2": "gpt-2", "bpe": "llama-bpe"}


def gguf_name(name: str) -> str:
    """A model.py parameter name as llama.cpp calls it: layers.3.attention.wq.weight -> blk.3.attn_q.weight."""
    module = name.removesuffix(".weight")
    if module.startswith("layers."):
        _, index, inner = module.split(".", 2)
        return f"blk.{index}.{GGUF_NAMES[inner]}.weight"
    return f"{GGUF_NAMES[module]}.weight"


def adjacent_rope_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq or wk with each head's rows reordered for llama.cpp's rotary layout.

    llama.cpp's llama architecture rotates dimensions (2i, 2i + 1) of a head together, model.py rotates
    (i, i + head_dim/2), with the same frequency for pair i. Putting output rows i and i + head_dim/2 next to each
    other makes llama.cpp rotate exactly model.py's pairs; q.k is a sum over dimensions, so its order does not
    matter."""
    rows, columns = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def gguf_type(t: torch.Tensor, dtype: str):
    """The GGML type one weight is stored in at --dtype."""
    import gguf

    qtype = gguf.GGMLQuantizationType[GGUF_DTYPES[dtype][0]]
    if t.dim() == 1:  # the norms' gains: a few thousand numbers, kept fp32 as llama.cpp's converter keeps them
        return gguf.GGMLQuantizationType.F32
    if t.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:  # q8_0 quantizes rows in blocks of 32; others go in fp16
        return gguf.GGMLQuantizationType.F16
    return qtype


def llama_cpp_tensors(model):
    """(GGUF name, weight) for every tensor of the file, in llama.cpp's layout."""
    c = model.config
    for name, t in model.state_dict().items():
        if c.tie_embeddings and name == "output.weight":
            continue  # without output.weight llama.cpp multiplies by token_embd: the tied matrix, stored once
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = adjacent_rope_pairs(t, c.n_heads if name.endswith("wq.weight") else c.n_kv_heads)
        yield gguf_name(name), t


def gguf_vocabulary(tokenizer, n_rows: int) -> tuple[list[str], list[int], list[str]]:
    """tokens, token types and merges as llama.cpp's gpt2 tokenizer model reads them: one token per embedding row,
    in byte-level text; <|endoftext|> a control token; merges as "left right" in rank order."""
    from gguf import TokenType

    tokens, merges = byte_level_vocabulary(tokenizer)
    # A model imported with --init_from may have more embedding rows than its dataset's vocabulary has ids.
    spare = [f"<|unused_{i}|>" for i in range(n_rows - tokenizer.eot_id - 1)]
    types = [TokenType.NORMAL] * len(tokens) + [TokenType.CONTROL] + [TokenType.UNUSED] * len(spare)
    return tokens + [EOT] + spare, types, [f"{a} {b}" for a, b in merges]


def gguf_writer(path: Path, c: ModelConfig, tokenizer, dtype: str, name: str):
    """A GGUFWriter holding the llama architecture's metadata and the tokenizer, tensors still to add."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType[GGUF_DTYPES[dtype][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(c.max_seq_len)
    writer.add_embedding_length(c.n_embd)
    writer.add_block_count(c.n_layers)
    writer.add_feed_forward_length(ffn_width(c.n_embd, c.multiple_of))
    writer.add_head_count(c.n_heads)
    writer.add_head_count_kv(c.n_kv_heads)
    writer.add_layer_norm_rms_eps(c.eps)
    writer.add_rope_freq_base(c.theta)
    writer.add_rope_dimension_count(c.n_embd // c.n_heads)
    writer.add_vocab_size(c.vocab_size)
    tokens, types, merges = gguf_vocabulary(tokenizer, c.vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for a byte-level BPE with merges
    writer.add_tokenizer_pre(GGUF_PRE_TOKENIZERS[tokenizer.name])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    # <|endoftext|> separates documents in training: a prompt starts after one (llama.cpp prepends it, as
    # prepare.prompt_ids does), and generation stops at the next.
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(True)
    return writer


def export_gguf(cfg) -> Path:
    """--format=gguf: the checkpoint as one GGUF file, written under a temporary name and renamed when complete."""
    import gguf

    out = Path(cfg.out or Path(cfg.ckpt_dir) / "model.gguf")
    if out.exists() and not cfg.overwrite:
        raise UserError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if cfg.dtype not in GGUF_DTYPES:
        raise UserError(f"--dtype={cfg.dtype}: a GGUF file takes {', '.join(GGUF_DTYPES)}")
    path, ckpt, model, tokenizer = load_model(cfg.ckpt_dir, cfg.ckpt, cfg.dataset_dir, purpose="exporting")
    if tokenizer.name not in GGUF_PRE_TOKENIZERS:
        raise UserError(f"{tokenizer.path} is a tokenizer.json, which GGUF export does not read; export a model "
                        "trained on a dataset with its own BPE or gpt2 vocabulary, or use --format=hf")
    c = model.config
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf_writer(Path(tmp), c, tokenizer, cfg.dtype, path.stem)
        # The file lists every tensor's name, type and shape before the data, so the list is made from shapes alone;
        # then each tensor is converted and written in turn, and memory holds one model plus one converted tensor.
        for name, t in llama_cpp_tensors(model):
            qtype = gguf_type(t, cfg.dtype)
            byte_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.uint8, math.prod(byte_shape), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, t in llama_cpp_tensors(model):
            writer.write_tensor_data(gguf.quants.quantize(t.float().numpy(), gguf_type(t, cfg.dtype)))
        writer.close()
        os.chmod(tmp, 0o644)  # mkstemp makes it private to its owner; a model is for everyone to read
        os.replace(tmp, out)
    except OSError as e:  # a full disk, most likely; an existing file at out is left as it was
        raise UserError(f"cannot write {out} ({type(e).__name__}: {e}); free space there or choose another --out") \
            from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return out


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class ExportConfig:
    ckpt_dir: str = "out"  # the training run whose newest checkpoint is exported
    format: str = "hf"  # hf: a Hugging Face model directory; gguf: one file for llama.cpp
    out_dir: str = ""  # --format=hf's directory; "" means <ckpt_dir>/hf
    out: str = ""  # --format=gguf's file; "" means <ckpt_dir>/model.gguf
    ckpt: str = ""  # a checkpoint to export instead of the newest one in ckpt_dir; "best": the lowest val loss
    dataset_dir: str = ""  # whose tokenizer to export; "" means the dataset the checkpoint was trained on
    # q8_0 stores 8 bits and a scale per 32 weights, about a quarter of the size.
    dtype: str = "float32"  # of the saved weights: float32 (as trained) or bfloat16; gguf also float16 and q8_0
    overwrite: bool = False  # replace an existing out_dir or out


def export(cfg: ExportConfig) -> Path:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    out_dir = Path(cfg.out_dir or Path(cfg.ckpt_dir) / "hf")
    if out_dir.exists() and not cfg.overwrite:
        raise UserError(f"{out_dir} already exists; pass --overwrite to replace it or choose another --out_dir")
    if cfg.dtype not in ("float32", "bfloat16"):
        raise UserError(f"--dtype={cfg.dtype}: use float32 or bfloat16")
    # Only the weights are read, never the optimizer's state.
    path, ckpt, model, tokenizer = load_model(cfg.ckpt_dir, cfg.ckpt, cfg.dataset_dir, purpose="exporting")
    model_cfg = model.config
    # A tied output matrix is the embedding: it is stored once, and tie_word_embeddings says so.
    tensors = {hf_name(name): t.to(getattr(torch, cfg.dtype)).contiguous() for name, t in ckpt["model"].items()
               if not (model_cfg.tie_embeddings and name == "output.weight")}
    meta = read_meta(cfg.dataset_dir or ckpt["config"]["dataset_dir"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    tmp_dir.chmod(0o755)  # mkdtemp makes it private to its owner; a model is for everyone to read
    try:
        # "format": "pt" tells transformers these are PyTorch tensors (older versions refuse a file without it).
        save_file(tensors, tmp_dir / "model.safetensors", metadata={"format": "pt"})
        (tmp_dir / "model.safetensors").chmod(0o644)  # safetensors creates it private to its owner
        config = hf_config(model_cfg, tokenizer.eot_id, cfg.dtype)
        (tmp_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        # transformers' generate() defaults: sample.py's, and stop at the end of a document.
        generation = {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
                      "pad_token_id": tokenizer.eot_id, "do_sample": True, "temperature": 0.8, "top_p": 0.9}
        (tmp_dir / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer(tokenizer, tmp_dir, model_cfg.max_seq_len)
        n_params = sum(t.numel() for t in tensors.values())
        (tmp_dir / "README.md").write_text(model_card(ckpt, path, meta, model_cfg, n_params))
        publish(tmp_dir, out_dir, cfg.overwrite)
    except (OSError, SafetensorError) as e:  # a full disk, most likely; an existing out_dir is left as it was
        raise UserError(f"cannot write {out_dir} ({type(e).__name__}: {e}); free space there or choose another "
                        "--out_dir") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def main(argv: list[str]):
    # A bare --overwrite reads as --overwrite=True, as in prepare.py.
    cfg = load_config(["--overwrite=True" if arg == "--overwrite" else arg for arg in argv], ExportConfig)
    if cfg.format == "gguf" and not cfg.out_dir:
        out = export_gguf(cfg)
        print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    elif cfg.format == "hf" and not cfg.out:
        out_dir = export(cfg)
        print(f"wrote {out_dir}: " + ", ".join(f"{p.name} ({p.stat().st_size:,} bytes)"
                                               for p in sorted(out_dir.iterdir())))
    else:
        raise UserError(f"--format={cfg.format}: use --format=hf with --out_dir (a directory) or --format=gguf with "
                        "--out (a file)")


if __name__ == "__main__":
    run_cli(main)
