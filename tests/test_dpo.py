"""dpo.py: a pair rendered in the chat format with only the answer's tokens counted, the two
reductions of an answer's log-probability, the loss and rewards of the paper (ln 2 before the first
update), the run's log, its resume, and the pairs it refuses."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_same_curve,
    assert_same_weights,
    final_weights,
    logged,
    one_line_error,
    run,
)

import dpo
import export
from checkpoint import checkpoint_paths, load_model
from configurator import UserError, load_config
from dpo import (
    DPOConfig,
    answer_logps,
    collate,
    dpo_loss,
    own_mistakes,
    pair_from_row,
    pair_logps,
    preference_metrics,
    split_by_prompt,
    train_dpo,
)
from model import ModelConfig, Transformer
from shakespeare import exact_match
from tokenizer import gpt2_tokenizer
from train import main

ROW = {"prompt": "Who wrote Hamlet?", "chosen": "Shakespeare.", "rejected": "Marlowe, I think."}
# The tiny run's model (conftest's tiny_run) on a few pairs: each update takes 2 micro-steps of 2.
PLAYS = ["Hamlet", "Macbeth", "Othello", "King Lear", "The Tempest", "Twelfth Night"]
DPO_TINY = ["--batch_size=2", "--pairs_per_update=4", "--val_fraction=0.3", "--max_lr=1e-3",
            "--eval_interval=2", "--device=cpu", "--dtype=float32", "--compile=False"]


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [{"prompt": f"Name play {i}.", "chosen": play, "rejected": PLAYS[(i + 2) % 6] + " too"}
            for i, play in enumerate(PLAYS * 3)]
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def counted(tokenizer, answer) -> str:
    ids, mask = answer
    return tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])


# --- pairs ----------------------------------------------------------------------------------------
def test_only_the_answer_and_its_end_of_turn_count_never_the_prompt(gpt2):
    chosen, rejected = pair_from_row(gpt2, ROW, "row")
    assert gpt2.decode(chosen[0]) == ("<|endoftext|><|user|>Who wrote Hamlet?<|end|><|assistant|>"
                                      "Shakespeare.<|end|>")
    assert (counted(gpt2, chosen), counted(gpt2, rejected)) == ("Shakespeare.<|end|>",
                                                                "Marlowe, I think.<|end|>")
    # a prompt of several turns, an assistant's among them: only the final answer counts
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
               {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Who?"}]
    chosen, _ = pair_from_row(gpt2, {**ROW, "prompt": history,
                                     "chosen": [{"role": "assistant", "content": "Him."}]}, "row")
    assert counted(gpt2, chosen) == "Him.<|end|>"
    # strings are one user turn and one assistant turn
    as_messages = {"prompt": [{"role": "user", "content": ROW["prompt"]}],
                   **{k: [{"role": "assistant", "content": ROW[k]}]
                      for k in ("chosen", "rejected")}}
    assert pair_from_row(gpt2, as_messages, "row") == pair_from_row(gpt2, ROW, "row")
    # answers written as the whole conversation, the prompt's turns first, as many hub datasets do
    whole = {k: as_messages["prompt"] + as_messages[k] for k in ("chosen", "rejected")}
    assert pair_from_row(gpt2, {**ROW, **whole}, "row") == pair_from_row(gpt2, ROW, "row")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q?", "chosen": "A."}, "'rejected' is missing"),
    ({"prompt": "Q?", "rejected": "B."}, "'chosen' is missing"),
    ({"chosen": "A.", "rejected": "B."}, "'prompt' is missing"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "A."}, "are the same answer"),
    ({"prompt": "Q?", "chosen": 3, "rejected": "B."}, "'chosen' is a int"),
    ({"prompt": "Q?", "chosen": [{"role": "user", "content": "A."}], "rejected": "B."},
     "must have the role \"assistant\""),
    ({"prompt": "Q?", "chosen": "", "rejected": "B."}, "assistant turn is empty"),
    (["Q?", "A.", "B."], "a JSON object"),
])
def test_a_row_that_is_not_a_pair_names_its_line_and_the_fix(gpt2, row, message):
    with pytest.raises(UserError, match=message) as error:
        pair_from_row(gpt2, row, "pairs.jsonl:7")
    assert str(error.value).startswith("pairs.jsonl:7")


def test_validation_prompts_are_never_trained_on():
    rows = [{"prompt": f"question {i % 40}", "chosen": "a", "rejected": f"b{i}"}
            for i in range(400)]
    train, val = split_by_prompt(rows, 0.25)
    assert len(train) + len(val) == 400 and 60 <= len(val) <= 140
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in val}


# --- log-probabilities, loss and rewards ----------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_pairs(gpt2):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=gpt2.vocab_size, n_layers=1, n_embd=32, n_heads=2,
                                    n_kv_heads=2, max_seq_len=64))
    rows = [ROW, {"prompt": [{"role": "user", "content": "Yes or no?"}], "chosen": "Yes.",
                  "rejected": "No, and that is all I will say."}]
    return model.eval(), [pair_from_row(gpt2, row, "row") for row in rows]


def test_an_answers_log_probability_is_its_tokens_summed_or_averaged_whatever_the_padding(
        gpt2, model_and_pairs):
    model, pairs = model_and_pairs
    x, y = collate(pairs, gpt2.eot_id, "cpu")  # padded to the longest of the four sequences
    with torch.no_grad():
        batched = {r: answer_logps(model, x, y, r) for r in ("sum", "mean")}
        for i, (ids, mask) in enumerate([p[0] for p in pairs] + [p[1] for p in pairs]):
            logits = model(torch.tensor([ids[:-1]]))[0][0]
            token_logps = logits.log_softmax(-1)[range(len(ids) - 1), ids[1:]]
            answer = token_logps[torch.tensor(mask[1:]) == 1]
            assert len(answer) == sum(mask)
            torch.testing.assert_close(batched["sum"][i], answer.sum(), atol=1e-4, rtol=0)
            torch.testing.assert_close(batched["mean"][i], answer.mean(), atol=1e-5, rtol=0)


def test_before_any_update_the_loss_is_ln_2_and_every_reward_0(gpt2, model_and_pairs):
    model, pairs = model_and_pairs
    x, y = collate(pairs, gpt2.eot_id, "cpu")
    for reduction in ("sum", "mean"):
        logps = answer_logps(model, x, y, reduction)
        # the reference as dpo.py caches it: computed once, one pair at a time
        ref = pair_logps(model, pairs, 1, gpt2.eot_id, reduction, "cpu", torch.float32)
        loss, chosen, rejected = dpo_loss(logps, ref.T.reshape(-1), beta=0.1)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
        assert chosen.abs().max() < 1e-6 and rejected.abs().max() < 1e-6
        metrics = preference_metrics(chosen, rejected)
        # no pair is preferred yet: the accuracy counts margins > 0 only
        assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert metrics["rewards_accuracy"] == 0


def test_the_loss_and_rewards_are_the_papers():
    # two pairs: the policy raised the first chosen answer by 1 nat and lowered its rejected one by
    # 1; the second pair the other way round
    logps = torch.tensor([-1.0, -4.0, -3.0, -2.0], requires_grad=True)
    ref = torch.tensor([-2.0, -3.0, -2.0, -3.0])
    loss, chosen, rejected = dpo_loss(logps, ref, beta=0.5)
    assert chosen.tolist() == [0.5, -0.5] and rejected.tolist() == [-0.5, 0.5]
    assert loss.item() == pytest.approx((-F.logsigmoid(torch.tensor(1.0))
                                         - F.logsigmoid(torch.tensor(-1.0))).item() / 2)
    metrics = preference_metrics(chosen, rejected)
    assert metrics == pytest.approx({"loss": loss.item(), "rewards_chosen": 0.0,
                                     "rewards_rejected": 0.0, "rewards_margin": 0.0,
                                     "rewards_accuracy": 0.5})
    # the gradient raises every chosen answer and lowers every rejected one, most where the
    # margin is wrong
    loss.backward()
    assert (logps.grad[:2] < 0).all() and (logps.grad[2:] > 0).all()
    assert logps.grad[1].abs() > logps.grad[0].abs()


# --- pairs from the model's own answers: the offline default -------------------------------------
def test_a_pair_rejects_an_answer_the_model_gives_itself(tiny_run, monkeypatch):
    _, _, model, tokenizer = load_model(str(tiny_run))
    items = [("Which play is Hamlet in?", "Hamlet"), ("Who says this line: \"To be\"", "HAMLET")]
    # the tiny run's model was never fine-tuned: every answer it gives is a mistake
    rows = own_mistakes(model, tokenizer, items, seed=0)
    assert [(r["prompt"], r["chosen"]) for r in rows] == items
    assert all(r["rejected"].strip() and not exact_match(r["rejected"], r["chosen"]) for r in rows)
    # a model that answers right (up to case and a final ".") gives no pair
    monkeypatch.setattr(dpo, "model_answer", lambda model, tokenizer, question, temperature:
                        dict(items)[question].lower() + ".")
    assert own_mistakes(model, tokenizer, items, seed=0) == []


def test_the_offline_pairs_train_on_the_tasks_training_questions_and_validate_on_held_out_ones(
        monkeypatch):
    # shakespeare.py's two splits share no line (its tests); a stand-in for them here
    monkeypatch.setattr(dpo, "questions", lambda split: [{"question": f"{split} {i}", "answer": "A"}
                                                         for i in range(8 if split == "train"
                                                                        else 3)])
    monkeypatch.setattr(dpo, "model_answer", lambda *args, **kwargs: "B")
    train, val = dpo.offline_pairs(DPOConfig(), tokenizer=None, policy=None)
    assert [r["prompt"] for r in train] == [f"train {i}" for i in range(0, 8, dpo.OFFLINE_EVERY)]
    assert [r["prompt"] for r in val] == ["eval 0", "eval 1", "eval 2"]
    assert {(r["chosen"], r["rejected"]) for r in train + val} == {("A", "B")}


# --- the run --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dpo_run(tiny_run, pairs_file, tmp_path_factory):
    """12 updates of 4 pairs on the tiny run's model, checkpoints after 6 and 12; its stdout in
    stdout.txt."""
    path = tmp_path_factory.mktemp("dpo")
    out = run("dpo.py", *dpo_options(tiny_run, pairs_file), f"--ckpt_dir={path}").stdout
    (path / "stdout.txt").write_text(out)
    return path


def dpo_options(tiny_run, pairs_file) -> list[str]:
    return [f"--init_from={tiny_run}", f"--data={pairs_file}", "--passes=4", "--token_ckpt=768",
            *DPO_TINY]


def test_a_run_starts_at_ln_2_logs_the_rewards_and_widens_the_margin(dpo_run):
    out = (dpo_run / "stdout.txt").read_text()
    assert "12 training pairs, 6 validation pairs" in out and "sum of log-probs, beta 0.1" in out
    log = logged(dpo_run)
    assert sorted(log) == list(range(1, 13))
    assert float(log[1]["train_loss"]) == pytest.approx(math.log(2), abs=1e-4)
    assert float(log[1]["rewards_margin"]) == 0
    assert float(log[12]["rewards_margin"]) > 0.05 and float(log[12]["train_loss"]) < 0.67
    # the validation pairs at every eval_interval, the last update among them
    assert [s for s, row in log.items() if row["val_rewards_accuracy"]] == list(range(2, 13, 2))
    # the validation side of the split is never trained on
    train_rows, val_rows = ([json.loads(line) for line in open(dpo_run / f"pairs_{s}.jsonl")]
                            for s in ("train", "val"))
    assert (len(train_rows), len(val_rows)) == (12, 6)
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in val_rows}


def test_the_exported_model_card_says_how_dpo_made_it(dpo_run, tiny_run, tmp_path):
    export.main([f"--ckpt_dir={dpo_run}", f"--out_dir={tmp_path / 'hf'}"])
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"Trained with dpo.py from `{tiny_run}`" in card
    assert f"| final validation loss | {logged(dpo_run)[12]['val_loss']} (update 12) |" in card
    assert "| training command | `python dpo.py --init_from=" in card


def test_resume_goes_on_as_an_uninterrupted_run(dpo_run, tiny_run, pairs_file, tmp_path):
    for name in ("ckpt_00000006.pt", "log.csv", "pairs_train.jsonl", "pairs_val.jsonl"):
        shutil.copy(dpo_run / name, tmp_path)
    out = run("dpo.py", *dpo_options(tiny_run, pairs_file), f"--ckpt_dir={tmp_path}",
              "--load_ckpt=True").stdout
    assert "resumed from" in out and "at update 6" in out
    assert_same_weights(final_weights(dpo_run), final_weights(tmp_path))
    straight, resumed = logged(dpo_run), logged(tmp_path)
    assert sorted(resumed) == list(range(1, 13))
    for column in ("train_loss", "rewards_margin", "val_loss", "val_rewards_margin"):
        assert_same_curve(straight, resumed, [s for s in straight if straight[s][column]], column)


def test_two_ranks_train_as_one_rank_with_accumulation(dpo_run, tiny_run, pairs_file, tmp_path):
    # one micro-step of 2 pairs on each of 2 ranks, where dpo_run took 2 micro-steps on one
    run("-m torch.distributed.run --standalone --nproc_per_node=2 dpo.py",
        *dpo_options(tiny_run, pairs_file), f"--ckpt_dir={tmp_path}")
    assert_same_weights(final_weights(dpo_run), final_weights(tmp_path), atol=1e-6)
    straight, two = logged(dpo_run), logged(tmp_path)
    assert_same_curve(straight, two, range(1, 13), "rewards_margin")


def test_bad_input_is_one_line_and_leaves_the_run_directory_as_it_was(tiny_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROW) + "\n" + json.dumps({"prompt": "Q?", "chosen": "A."}) + "\n")
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    result = run("dpo.py", f"--init_from={tiny_run}", f"--data={bad}", f"--ckpt_dir={existing}",
                 *DPO_TINY, check=False)
    one_line_error(result, f"{bad}:2", "'rejected' is missing")
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q?", "rejected": "B."}, "'chosen' is missing"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "A."}, "are the same answer"),
])
def test_every_bad_pair_stops_the_run_before_it_writes(row, message, tiny_run, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROW) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=message):
        main([f"--init_from={tiny_run}", f"--data={bad}", f"--ckpt_dir={tmp_path / 'out'}",
              *DPO_TINY], config=DPOConfig, run=train_dpo)
    assert not (tmp_path / "out").exists()


def test_settings_dpo_cannot_honour_are_refused(tmp_path):
    with pytest.raises(UserError, match="holds no checkpoint; fine-tune a model with sft.py"):
        main([f"--init_from={tmp_path}"], config=DPOConfig, run=train_dpo)
    refused = {"--dropout=0.1": "without dropout", "--fsdp=True": "not FSDP",
               "--tokens_per_update=1024": "counts in pairs", "--reduction=max": "sum or mean"}
    for arg, message in refused.items():
        with pytest.raises(UserError) as error:
            load_config([arg], DPOConfig)
        assert message in str(error.value), arg


def test_a_model_without_the_chat_tokens_says_to_fine_tune_it_first(
        tiny_run, pairs_file, shakespeare_dir, tmp_path):
    # the tiny run's model as if pretrained on a dataset prepared without the chat tokens
    data = tmp_path / "gpt2_data"
    data.mkdir()
    meta = json.loads((shakespeare_dir / "meta.json").read_text())
    meta |= {"tokenizer": "gpt2", "vocab_size": 50257, "special_tokens": {"<|endoftext|>": 50256}}
    (data / "meta.json").write_text(json.dumps(meta))
    state = torch.load(checkpoint_paths(tiny_run)[-1], weights_only=True)
    state["config"]["dataset_dir"], state["tokenizer"] = str(data), "gpt2-50257-gpt2"
    (tmp_path / "base").mkdir()
    torch.save(state, tmp_path / "base" / "ckpt_00000006.pt")
    with pytest.raises(UserError, match="no <|system|>.*sft.py"):
        main([f"--init_from={tmp_path / 'base'}", f"--data={pairs_file}",
              f"--ckpt_dir={tmp_path / 'out'}", *DPO_TINY], config=DPOConfig, run=train_dpo)
    assert not (tmp_path / "out").exists()
