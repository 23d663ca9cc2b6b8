"""Generate text from the newest checkpoint of a training run.

    python sample.py --ckpt_dir=out --prompt="ROMEO:" --max_new_tokens=200 --temperature=0.8 --top_p=0.9
"""
import sys
from dataclasses import dataclass

import torch

from model import Transformer
from prepare import UserError, load_tokenizer, run_cli
from train import (
    TrainConfig,
    checkpoint_paths,
    load_config,
    newest_loadable_checkpoint,
    pick_device,
    tokenizer_fingerprint,
)


@dataclass
class SampleConfig:
    ckpt_dir: str = "out"
    dataset_dir: str = ""  # whose tokenizer to use; "" means the dataset the checkpoint was trained on
    prompt: str = ""  # "" starts from a document boundary
    num_samples: int = 1
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 0.9  # 1.0 = no nucleus cut
    device: str = "auto"
    seed: int = 1337


def main(argv: list[str]):
    cfg = load_config(argv, SampleConfig)
    paths = checkpoint_paths(cfg.ckpt_dir)
    if not paths:
        raise UserError(f"no checkpoint in {cfg.ckpt_dir}; train first (python train.py) or pass --ckpt_dir")
    # Reading only: a damaged newest checkpoint is skipped (train.py renames it when it resumes), not touched.
    path, ckpt = newest_loadable_checkpoint(paths, master=False, tensors="model")
    if path != paths[-1]:
        print(f"warning: {paths[-1]} cannot be loaded (damaged or unsafe); sampling from {path}", file=sys.stderr)
    train_cfg = TrainConfig(**ckpt["config"])
    dataset_dir = cfg.dataset_dir or train_cfg.dataset_dir
    tokenizer = load_tokenizer(dataset_dir)
    if tokenizer_fingerprint(dataset_dir) != ckpt["tokenizer"]:
        raise UserError(f"{dataset_dir} has another tokenizer than {path} was trained with; "
                        "pass the training dataset with --dataset_dir")
    device = pick_device(cfg.device)
    # The embedding's rows, not the tokenizer's size: a model imported with --init_from may have spare rows.
    model = Transformer(train_cfg.model_config(ckpt["model"]["tok_embeddings.weight"].shape[0]))
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    torch.manual_seed(cfg.seed)

    prompt = tokenizer.encode(cfg.prompt) if cfg.prompt else [tokenizer.eot_id]
    idx = torch.tensor([prompt] * cfg.num_samples, device=device)
    out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature, top_k=cfg.top_k or None,
                         top_p=cfg.top_p if cfg.top_p < 1 else None, eos_token=tokenizer.eot_id)
    print(f"# {path} (update {ckpt['step']}, {ckpt['tokens']:,} tokens)")
    for row in out.tolist():
        new = [t for t in row[len(prompt):] if t != tokenizer.eot_id]
        print(cfg.prompt + tokenizer.decode(new))
        print("-" * 40)


if __name__ == "__main__":
    run_cli(main)
