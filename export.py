"""Export a checkpoint as a Hugging Face LlamaForCausalLM directory or as a GGUF file for llama.cpp.

    python export.py --ckpt_dir=out --out_dir=out/hf  # the newest checkpoint, weights as trained
    python export.py --ckpt=out/ckpt_00000488.pt --out_dir=out/hf_bf16 --dtype=bfloat16 --overwrite
    python export.py --ckpt_dir=out --format=gguf --out=out/model.gguf --dtype=q8_0
    python export.py --ckpt_dir=out --ckpt=best --out_dir=out/hf_best  # the lowest val loss

The directory (config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json, README.md) is what the rest of the ecosystem starts from: transformers'
AutoModelForCausalLM and AutoTokenizer, vLLM, lm-evaluation-harness, the Hub. The mapping between
model.py and that format, both ways, is huggingface.py's; the way back in is `python train.py
--init_from=DIR` and `python prepare.py --tokenizer=DIR`.

Reading order: the model card -> GGUF's names, layout and metadata -> exporting: what both formats
share (start_export, written_in_place), then export() and export_gguf().
"""
import contextlib
import csv
import json
import math
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError

from checkpoint import load_model
from configurator import UserError, load_config, run_cli
from conversation import CHAT_TEMPLATE, END_OF_TURN, stop_ids
from dataset import read_meta
from files import publish, refuse_existing
from huggingface import byte_level_vocabulary, hf_config, hf_name, write_tokenizer
from model import ModelConfig, Transformer, ffn_width


# --------------------------------------------------------------------------------------------------
# The model card: what the checkpoint and its log say about how the model was made.
def final_validation(log_file: Path, step: int) -> dict | None:
    """The last evaluated row of the CSV log at or before the checkpoint's update, if the log is
    still there."""
    if not log_file.exists():
        return None
    with open(log_file, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["val_loss"] and int(row["step"]) <= step]
    return rows[-1] if rows else None


def model_card(ckpt: dict, path: Path, meta: dict, model_cfg: ModelConfig, n_params: int) -> str:
    cfg = ckpt["config"]  # the training run's whole config
    row = final_validation(Path(cfg["log_file"]) if cfg["log_file"] else path.parent / "log.csv",
                           ckpt["step"])
    # dpo.py's validation loss is a DPO loss over pairs, with no bits per byte
    val = ((f"{float(row['val_loss']):.4f} nats/token, {float(row['val_bpb']):.4f} bits/byte "
            f"(update {row['step']}, {cfg['eval_tokens']:,} validation tokens)" if row["val_bpb"]
            else f"{float(row['val_loss']):.4f} (update {row['step']})") if row
           else "not recorded (no log.csv next to the checkpoint)")
    script = ckpt.get("script", "train.py")  # the script that trained it: train.py, or dpo.py
    command = f"`{shlex.join(['python', script, *ckpt['argv']])}`"
    c = model_cfg
    architecture = (f"LlamaForCausalLM: {c.n_layers} layers, width {c.n_embd}, {c.n_heads} query / "
                    f"{c.n_kv_heads} key-value heads, SwiGLU width "
                    f"{ffn_width(c.n_embd, c.multiple_of)}, RoPE theta {c.theta:g}, tied "
                    f"embeddings: {'yes' if c.tie_embeddings else 'no'}")
    trained = (f"{ckpt['tokens']:,} ({ckpt['step']:,} updates of {cfg['tokens_per_update']:,} "
               f"tokens, {ckpt['elapsed_s'] / 60:.1f} minutes)")
    if cfg["init_from"]:
        trained += f", starting from the weights of `{cfg['init_from']}`"
    vocabulary = (f"{meta.get('tokenizer')}, {meta.get('vocab_size'):,} ids; every document ends "
                  "with the end-of-text token")
    return f"""---
library_name: transformers
pipeline_tag: text-generation
---
# A {n_params / 1e6:.1f}M-parameter LLaMA-style model

{"Pretrained from scratch by next-token prediction" if script == "train.py"
 else f"Trained with {script} from `{cfg['init_from']}`"}, exported from `{path}` by export.py.

| | |
|---|---|
| parameters | {n_params:,} |
| architecture | {architecture} |
| context | {c.max_seq_len} tokens (the length it was trained on) |
| dataset | `{cfg["dataset_dir"]}`: {meta.get("source", "unknown source")} |
| tokenizer | {vocabulary} |
| tokens trained | {trained} |
| final validation loss | {val} |
| training command | {command} |

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")
model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")
inputs = tokenizer("ROMEO:", return_tensors="pt")
print(tokenizer.decode(model.generate(**inputs, max_new_tokens=100)[0]))  # generation_config.json
```
"""


# --------------------------------------------------------------------------------------------------
# GGUF: one file holding weights, shape and tokenizer, which llama.cpp runs (and Ollama, LM Studio
# and llama-cpp-python, which are built on it). llama.cpp's own converter cannot read our Hugging
# Face export: it knows a tokenizer only by the ids that published models' tokenizers give a fixed
# string, so the file is written here.
GGUF_NAMES = {
    "tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
    "attention_norm": "attn_norm", "attention.wq": "attn_q", "attention.wk": "attn_k",
              "attention.wv": "attn_v",
    "attention.wo": "attn_output", "ffn_norm": "ffn_norm", "feed_forward.w1": "ffn_gate",
    "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down",
}
# --dtype -> how the matrices are stored, and the file type that llama.cpp reports for it.
GGUF_DTYPES = {"float32": ("F32", "ALL_F32"), "float16": ("F16", "MOSTLY_F16"),
               "bfloat16": ("BF16", "MOSTLY_BF16"),
               "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# llama.cpp splits text with one of a fixed set of regexes, named by tokenizer.ggml.pre. gpt2's is
# GPT-2's own.
# prepare.py's (GPT-4's with numbers in chunks of at most 2 digits) is not among them; llama-bpe is
# the same regex with chunks of up to 3 digits, so only runs of 3 or more digits may be split
# differently.
GGUF_PRE_TOKENIZERS = {"gpt2": "gpt-2", "bpe": "llama-bpe"}


def gguf_name(name: str) -> str:
    """A model.py parameter name as llama.cpp calls it: layers.3.attention.wq.weight ->
    blk.3.attn_q.weight."""
    module = name.removesuffix(".weight")
    if module.startswith("layers."):
        _, index, inner = module.split(".", 2)
        return f"blk.{index}.{GGUF_NAMES[inner]}.weight"
    return f"{GGUF_NAMES[module]}.weight"


def adjacent_rope_pairs(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq or wk with each head's rows reordered for llama.cpp's rotary layout.

    llama.cpp's llama architecture rotates dimensions (2i, 2i + 1) of a head together, model.py
    rotates (i, i + head_dim/2), with the same frequency for pair i. Putting output rows i and i +
    head_dim/2 next to each other makes llama.cpp rotate exactly model.py's pairs; q.k is a sum over
    dimensions, so its order does not matter."""
    rows, columns = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, columns).transpose(1, 2).reshape(rows, columns)


def gguf_type(t: torch.Tensor, dtype: str):
    """The GGML type one weight is stored in at --dtype."""
    import gguf

    qtype = gguf.GGMLQuantizationType[GGUF_DTYPES[dtype][0]]
    # the norms' gains: a few thousand numbers, kept fp32 as llama.cpp's converter keeps them
    if t.dim() == 1:
        return gguf.GGMLQuantizationType.F32
    # q8_0 quantizes rows in blocks of 32; others go in fp16
    if t.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return gguf.GGMLQuantizationType.F16
    return qtype


def llama_cpp_tensors(model):
    """(GGUF name, weight) for every tensor of the file, in llama.cpp's layout."""
    c = model.config
    for name, t in model.state_dict().items():
        if c.tie_embeddings and name == "output.weight":
            # without output.weight llama.cpp multiplies by token_embd: the tied matrix, stored once
            continue
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = adjacent_rope_pairs(t, c.n_heads if name.endswith("wq.weight") else c.n_kv_heads)
        yield gguf_name(name), t


def gguf_vocabulary(tokenizer, n_rows: int) -> tuple[list[str], list[int], list[str]]:
    """tokens, token types and merges as llama.cpp's gpt2 tokenizer model reads them: one token per
    embedding row, in byte-level text; <|endoftext|> and the chat tokens control tokens; merges as
    "left right" in rank order."""
    from gguf import TokenType

    tokens, merges = byte_level_vocabulary(tokenizer)
    special = list(tokenizer.special_tokens)
    # A model imported with --init_from may have more embedding rows than its dataset's vocabulary
    # has ids.
    spare = [f"<|unused_{i}|>" for i in range(n_rows - len(tokens) - len(special))]
    types = ([TokenType.NORMAL] * len(tokens) + [TokenType.CONTROL] * len(special)
             + [TokenType.UNUSED] * len(spare))
    return tokens + special + spare, types, [f"{a} {b}" for a, b in merges]


def gguf_writer(path: Path, c: ModelConfig, tokenizer, dtype: str, name: str):
    """A GGUFWriter holding the llama architecture's metadata and the tokenizer, tensors still to
    add."""
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
    # <|endoftext|> separates documents in training: a prompt starts after one (llama.cpp prepends
    # it, as prepare.prompt_ids does), and generation stops at the next.
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(True)
    if END_OF_TURN in tokenizer.special_tokens:
        # llama.cpp's chat completion renders conversations with the template and ends a reply at
        # the end-of-turn token, as chat.py does
        writer.add_chat_template(CHAT_TEMPLATE)
        writer.add_eot_token_id(tokenizer.special_tokens[END_OF_TURN])
    return writer


# --------------------------------------------------------------------------------------------------
@dataclass
class ExportConfig:
    ckpt_dir: str = "out"  # the training run whose newest checkpoint is exported
    format: str = "hf"  # hf: a Hugging Face model directory; gguf: one file for llama.cpp
    out_dir: str = ""  # --format=hf's directory; "" means <ckpt_dir>/hf
    out: str = ""  # --format=gguf's file; "" means <ckpt_dir>/model.gguf
    ckpt: str = ""  # a checkpoint instead of ckpt_dir's newest; "best": the lowest val loss
    dataset_dir: str = ""  # whose tokenizer to export; "" = the dataset the checkpoint trained on
    # q8_0 stores 8 bits and a scale per 32 weights, about a quarter of the size.
    dtype: str = "float32"  # the weights': float32 (as trained), bfloat16; gguf also float16, q8_0
    overwrite: bool = False  # replace an existing out_dir or out


FORMATS = {"hf": "a Hugging Face directory", "gguf": "a GGUF file"}


def start_export(cfg: ExportConfig, out: Path, option: str,
                 dtypes) -> tuple[Path, dict, Transformer, object]:
    """What both formats do first, before anything is written: refuse an existing `out` (without
    --overwrite) and a --dtype the format cannot store, then read the checkpoint's weights (never
    its optimizer state) and the tokenizer it was trained with. Returns load_model's (path,
    checkpoint, model, tokenizer)."""
    refuse_existing(out, cfg.overwrite, option)
    if cfg.dtype not in dtypes:
        raise UserError(f"--dtype={cfg.dtype}: {FORMATS[cfg.format]} takes {', '.join(dtypes)}")
    return load_model(cfg.ckpt_dir, cfg.ckpt, cfg.dataset_dir, purpose="exporting")


@contextlib.contextmanager
def written_in_place(out: Path, overwrite: bool, option: str):
    """A path beside `out`, inside a temporary directory, to write the export to (a file, or a
    directory the caller makes); when the block completes it is renamed to `out`. A failed write (a
    full disk, most likely) ends in one line and leaves an existing `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp_dir / out.name
        publish(tmp_dir / out.name, out, overwrite, option)
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot write {out} ({type(e).__name__}: {e}); free space there or choose "
                        f"another {option}") from None
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def export(cfg: ExportConfig) -> Path:
    """--format=hf: the checkpoint as a Hugging Face LlamaForCausalLM directory."""
    from safetensors.torch import save_file

    out_dir = Path(cfg.out_dir or Path(cfg.ckpt_dir) / "hf")
    path, ckpt, model, tokenizer = start_export(cfg, out_dir, "--out_dir", ("float32", "bfloat16"))
    model_cfg = model.config
    # A tied output matrix is the embedding: it is stored once, and tie_word_embeddings says so.
    tensors = {hf_name(name): t.to(getattr(torch, cfg.dtype)).contiguous() for name,
               t in ckpt["model"].items()
               if not (model_cfg.tie_embeddings and name == "output.weight")}
    meta = read_meta(cfg.dataset_dir or ckpt["config"]["dataset_dir"])
    with written_in_place(out_dir, cfg.overwrite, "--out_dir") as tmp:
        tmp.mkdir()
        # "format": "pt" tells transformers these are PyTorch tensors (older versions refuse a file
        # without it).
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "model.safetensors").chmod(0o644)  # safetensors creates it private to its owner
        config = hf_config(model_cfg, tokenizer.eot_id, cfg.dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        # transformers' generate() defaults: sample.py's, and stop where chat.py and sample.py stop
        # (the end of a turn, the end of a document)
        stop = stop_ids(tokenizer)
        generation = {"bos_token_id": tokenizer.eot_id,
                      "eos_token_id": stop if len(stop) > 1 else stop[0],
                      "pad_token_id": tokenizer.eot_id, "do_sample": True, "temperature": 0.8,
                      "top_p": 0.9}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer(tokenizer, tmp, model_cfg.max_seq_len)
        n_params = sum(t.numel() for t in tensors.values())
        (tmp / "README.md").write_text(model_card(ckpt, path, meta, model_cfg, n_params))
    return out_dir


def export_gguf(cfg: ExportConfig) -> Path:
    """--format=gguf: the checkpoint as one GGUF file."""
    import gguf

    out = Path(cfg.out or Path(cfg.ckpt_dir) / "model.gguf")
    path, _, model, tokenizer = start_export(cfg, out, "--out", GGUF_DTYPES)
    if tokenizer.name not in GGUF_PRE_TOKENIZERS:
        raise UserError(f"{tokenizer.path} is a tokenizer.json, which GGUF export does not read; "
                        "export a model trained on a dataset with its own BPE or gpt2 vocabulary, "
                        "or use --format=hf")
    with written_in_place(out, cfg.overwrite, "--out") as tmp:
        writer = gguf_writer(tmp, model.config, tokenizer, cfg.dtype, path.stem)
        # The file lists every tensor's name, type and shape before the data, so the list is made
        # from shapes alone; then each tensor is converted and written in turn: memory holds one
        # model and one tensor more.
        for name, t in llama_cpp_tensors(model):
            qtype = gguf_type(t, cfg.dtype)
            byte_shape = gguf.quants.quant_shape_to_byte_shape(t.shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.uint8, math.prod(byte_shape),
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, t in llama_cpp_tensors(model):
            writer.write_tensor_data(gguf.quants.quantize(t.float().numpy(),
                                                          gguf_type(t, cfg.dtype)))
        writer.close()
    return out


def main(argv: list[str]):
    # A bare --overwrite reads as --overwrite=True, as in prepare.py.
    cfg = load_config(["--overwrite=True" if arg == "--overwrite" else arg for arg in argv],
                      ExportConfig)
    if cfg.format == "gguf" and not cfg.out_dir:
        out = export_gguf(cfg)
        print(f"wrote {out} ({out.stat().st_size:,} bytes)")
    elif cfg.format == "hf" and not cfg.out:
        out_dir = export(cfg)
        print(f"wrote {out_dir}: " + ", ".join(f"{p.name} ({p.stat().st_size:,} bytes)"
                                               for p in sorted(out_dir.iterdir())))
    else:
        raise UserError(f"--format={cfg.format}: use --format=hf with --out_dir (a directory) or "
                        "--format=gguf with --out (a file)")


if __name__ == "__main__":
    run_cli(main)
