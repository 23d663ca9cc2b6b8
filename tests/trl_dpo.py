"""TRL's DPO loss and rewards beside dpo.py's, for one batch of pairs on the Hugging Face exports
of a policy and of its reference (docs/dpo.md). Run it in a virtual environment with trl installed
beside requirements.txt (CI has no trl; pytest does not collect this file):

    python tests/trl_dpo.py out/dpo/hf out/sft/hf out/dpo/pairs_val.jsonl [PAIRS]

It scores the file's first PAIRS pairs (default 8) as one batch, once with the paper's summed
log-probabilities (TRL's loss_type "sigmoid") and once with their mean per token ("sigmoid_norm"),
prints both sides of every logged value and exits 1 if any differs by more than 1e-5. TRL's rewards
are beta times the summed log-ratios whatever the loss type, so with the mean they are compared with
the summed log-ratios dpo.py computes, times beta.
"""
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import dpo  # noqa: E402 (the repository's modules: the path first)
from huggingface import load_hf_model  # noqa: E402

TOLERANCE = 1e-5
BETA = {r: dpo.DPOConfig(reduction=r).beta for r in dpo.REDUCTIONS}  # dpo.py's default for each
TRL_LOSS = {"sum": "sigmoid", "mean": "sigmoid_norm"}


def ours(policy_dir: str, reference_dir: str, rows: list[dict], reduction: str) -> dict:
    """dpo.py's loss and TRL's reward columns for the batch, on model.py's copy of each export."""
    policy, tokenizer = load_hf_model(Path(policy_dir))
    reference, _ = load_hf_model(Path(reference_dir))
    pairs = [dpo.pair_from_row(tokenizer, row, f"row {i}") for i, row in enumerate(rows)]
    x, y = dpo.collate(pairs, tokenizer.eot_id, "cpu")
    with torch.no_grad():
        logps = {r: (dpo.answer_logps(policy, x, y, r), dpo.answer_logps(reference, x, y, r))
                 for r in ("sum", reduction)}
        loss, _, _ = dpo.dpo_loss(*logps[reduction], BETA[reduction])
        # TRL's rewards are beta times the summed log-ratios, whatever its loss
        _, chosen, rejected = dpo.dpo_loss(*logps["sum"], BETA[reduction])
    metrics = dpo.preference_metrics(chosen, rejected)
    return {"loss": loss.item(), **{f"rewards/{name}": metrics[f"rewards_{key}"]
                                    for name, key in (("chosen", "chosen"),
                                                      ("rejected", "rejected"),
                                                      ("margins", "margin"),
                                                      ("accuracies", "accuracy"))}}


def trl(policy_dir: str, reference_dir: str, rows: list[dict], reduction: str) -> dict:
    """TRL's DPOTrainer evaluating the batch, the transformers models and the exported tokenizer
    with its chat template."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    # TRL renders a conversational pair with the tokenizer's chat template: the messages are given
    # as dpo.py reads them, a string being one turn
    fields = ("prompt", "chosen", "rejected")
    data = Dataset.from_list([dict(zip(fields, dpo.pair_messages(row, "row"), strict=True))
                              for row in rows])
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, beta=BETA[reduction], loss_type=[TRL_LOSS[reduction]],
                         per_device_eval_batch_size=len(rows), max_length=None, report_to=[],
                         use_cpu=True, bf16=False, fp16=False)
        trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(policy_dir,
                                                                        dtype=torch.float32),
                             ref_model=AutoModelForCausalLM.from_pretrained(reference_dir,
                                                                            dtype=torch.float32),
                             args=args, train_dataset=data, eval_dataset=data,
                             processing_class=AutoTokenizer.from_pretrained(policy_dir))
        metrics = trainer.evaluate()
    return {name: metrics[f"eval_{name}"] for name in ("loss", "rewards/chosen", "rewards/rejected",
                                                       "rewards/margins", "rewards/accuracies")}


def compare(policy_dir: str, reference_dir: str, rows: list[dict]) -> float:
    """Print both sides for both reductions; returns the largest difference."""
    worst = 0.0
    print(f"{len(rows)} pairs | {'reduction':9} {'value':18} {'dpo.py':>12} {'TRL':>12} "
          f"{'difference':>10}")
    for reduction in ("sum", "mean"):
        a, b = ours(policy_dir, reference_dir, rows, reduction), trl(policy_dir, reference_dir,
                                                                     rows, reduction)
        for name in a:
            worst = max(worst, abs(a[name] - b[name]))
            print(f"{'':10}  {reduction:9} {name:18} {a[name]:12.7f} {b[name]:12.7f} "
                  f"{abs(a[name] - b[name]):10.1e}")
    return worst


if __name__ == "__main__":
    policy_dir, reference_dir, data = sys.argv[1:4]
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    with open(data) as f:
        batch = [json.loads(line) for line in f if line.strip()][:count]
    largest = compare(policy_dir, reference_dir, batch)
    print(f"largest difference {largest:.1e} (tolerance {TOLERANCE:g})")
    sys.exit(0 if largest <= TOLERANCE else 1)
