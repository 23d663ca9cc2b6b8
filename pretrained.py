"""What a run starts from with --init_from: a Hugging Face model directory (export.py's, or a
published Llama) or the ckpt_dir of a training run of this repository, whose newest checkpoint is
read. First the architecture (init_architecture, before anything is built), then the weights
(load_init_weights).

A run whose vocabulary has ids after the ones the model was trained with (sft.py adds the chat
tokens to a tokenizer that lacks them) grows the embedding and the output layer by that many rows.
A new row starts as model.py initialises every row, random with a standard deviation of 0.02: the
fine-tuning loss then starts lower than with rows set to the mean of the trained ones
(docs/sft.md).
"""
import dataclasses
from pathlib import Path

import torch

from checkpoint import load_model
from huggingface import hf_architecture, load_hf_weights, refuse_contradictions

# The fields of a checkpoint's config that are the architecture, as config.json's are.
ARCHITECTURE = ("n_embd", "n_heads", "n_kv_heads", "n_layers", "multiple_of", "eps", "theta",
                "tie_embeddings")


def is_hf_directory(path: str) -> bool:
    return (Path(path) / "config.json").exists()


def init_architecture(cfg, vocab_size: int) -> tuple[object, int]:
    """The run's config (a TrainConfig) with --init_from's architecture, and the embedding rows the
    model gets: the source's, or vocab_size where the dataset's vocabulary adds ids after them."""
    if is_hf_directory(cfg.init_from):
        return hf_architecture(cfg, vocab_size)
    _, state, model, _ = load_model(cfg.init_from, purpose="starting from")
    fields = {name: state["config"][name] for name in ARCHITECTURE}
    refuse_contradictions(cfg, fields, f"{cfg.init_from}'s checkpoint")
    return dataclasses.replace(cfg, **fields), max(vocab_size, model.config.vocab_size)


def grown(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """weight with rows up to `rows`, each new one drawn as model.py draws a row at initialisation
    (from torch's generator, which train.py seeds)."""
    extra = torch.empty(rows - weight.shape[0], weight.shape[1]).normal_(0.0, 0.02)
    return torch.cat([weight, extra.to(weight.dtype)])


def load_init_weights(model, init_from: str) -> str:
    """--init_from's weights into `model` (built with init_architecture's config); returns the line
    that says which rows were added ("" when none were)."""
    if is_hf_directory(init_from):
        load_hf_weights(model, init_from)
        return ""
    _, _, source, _ = load_model(init_from, purpose="starting from")
    state = source.state_dict()
    rows, trained = model.config.vocab_size, source.config.vocab_size
    if rows == trained:
        model.load_state_dict(state)
        return ""
    for name in ("tok_embeddings.weight", "output.weight"):
        state[name] = grown(state[name], rows)
    if model.config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state)
    return (f"{init_from} had {trained} embedding rows: ids {trained} to {rows - 1} get new rows "
            "of the embedding and the output layer, random as at initialisation (std 0.02)")
