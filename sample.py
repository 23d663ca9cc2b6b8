"""Generate text from the newest checkpoint of a training run (or another one: --ckpt=PATH, or
--ckpt=best for the one with the lowest validation loss).

    python sample.py --ckpt_dir=out --prompt="ROMEO:" --max_new_tokens=200 --temperature=0.8 \\
        --top_p=0.9
    python sample.py --ckpt_dir=out --ckpt=best
"""
from dataclasses import dataclass

import torch

from checkpoint import load_model
from configurator import UserError, load_config, run_cli
from hardware import pick_device
from tokenizer import prompt_ids


@dataclass
class SampleConfig:
    ckpt_dir: str = "out"  # the training run whose newest checkpoint generates
    ckpt: str = ""  # a checkpoint instead of ckpt_dir's newest; "best": the lowest val loss
    dataset_dir: str = ""  # whose tokenizer to use; "" = the dataset the checkpoint trained on
    prompt: str = ""  # it follows an <|endoftext|>, as each training document; "" = that alone
    num_samples: int = 1  # continuations of the prompt, generated together as one batch
    max_new_tokens: int = 200  # tokens generated after the prompt (fewer if a document ends)
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 0.9  # 1.0 = no nucleus cut
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N" or "mps"
    seed: int = 1337  # the random numbers sampling draws: the same seed gives the same text

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise UserError("sampling needs --temperature >= 0, --top_k >= 0 and 0 < --top_p <= 1 "
                            f"(got temperature={self.temperature}, top_k={self.top_k}, "
                            f"top_p={self.top_p})")


def main(argv: list[str]):
    cfg = load_config(argv, SampleConfig)
    # Reading only: a damaged newest checkpoint is skipped (train.py renames it when it resumes),
    # not touched.
    path, ckpt, model, tokenizer = load_model(cfg.ckpt_dir, cfg.ckpt, cfg.dataset_dir,
                                              purpose="sampling from")
    device = pick_device(cfg.device)
    model.to(device)
    torch.manual_seed(cfg.seed)

    prompt = prompt_ids(tokenizer, cfg.prompt)
    idx = torch.tensor([prompt] * cfg.num_samples, device=device)
    out = model.generate(idx, cfg.max_new_tokens, temperature=cfg.temperature,
                         top_k=cfg.top_k or None,
                         top_p=cfg.top_p if cfg.top_p < 1 else None, eos_token=tokenizer.eot_id)
    print(f"# {path} (update {ckpt['step']}, {ckpt['tokens']:,} tokens)")
    for row in out.tolist():
        new = [t for t in row[len(prompt):] if t != tokenizer.eot_id]
        print(cfg.prompt + tokenizer.decode(new))
        print("-" * 40)


if __name__ == "__main__":
    run_cli(main)
