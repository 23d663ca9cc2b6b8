"""train.py: configuration, the loader, the scheduler, accumulation vs DDP, checkpoints and
resuming."""
import builtins
import copy
import io
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import OTHER_ROUNDING, TINY, assert_same_weights, final_weights, run, toy_dataset

import hardware
import preemption
import train
from checkpoint import checkpoint_paths
from configurator import UserError, load_config
from model import Transformer
from preflight import drift_tolerance
from train import (
    DatasetLoader,
    Scheduler,
    TrainConfig,
    accumulation_steps,
    make_optimizer,
    update_timer,
)


# --- configuration --------------------------------------------------------------------------------
def test_overrides_parse_python_literals_and_bare_strings():
    cfg = load_config(["--n_layers=3", "--max_lr=3e-4", "--min_lr=0", "--device=cpu",
                       "--compile=True"], TrainConfig)
    assert (cfg.n_layers, cfg.max_lr, cfg.min_lr, cfg.device, cfg.compile) == (3, 3e-4, 0, "cpu",
                                                                               True)


def test_config_file_then_overrides_in_order(tmp_path):
    path = tmp_path / "small.py"
    path.write_text("import math\nn_layers = 2\nmax_lr = 2e-3\n")
    cfg = load_config([str(path), "--n_layers=5"], TrainConfig)
    assert (cfg.n_layers, cfg.max_lr) == (5, 2e-3)


def test_llama_1b3_config_holds_the_guides_run():
    cfg = load_config(["config/llama_1b3.py"], TrainConfig)
    assert (cfg.n_embd, cfg.n_heads, cfg.n_layers, cfg.multiple_of) == (2048, 32, 24, 256)
    assert (cfg.max_seq_len, cfg.batch_size) == (2048, 4)
    assert (cfg.tokens_per_update, cfg.warmup_iterations, cfg.max_lr, cfg.min_lr) == (2**19, 500,
                                                                                      1e-4, 1e-5)
    assert (cfg.training_tokens, cfg.token_ckpt, cfg.eval_interval) == (45e9, 1e9, 32)
    assert accumulation_steps(cfg, world_size=8) == 8  # 4*2048*8 = 65,536 tokens per micro-step
    assert cfg.training_tokens // cfg.tokens_per_update == 85_830


@pytest.mark.parametrize("argv, message", [
    (["--n_layer=3"], "did you mean n_layers"),
    (["--n_layers=three"], "--n_layers expects int"),
    (["--n_layers=True"], "--n_layers expects int"),
    (["--max_lr"], "has no value"),
    (["config/nope.py"], "does not exist"),
    (["--schedule=step"], "cosine, linear or constant"),
    (["--load_ckpt=maybe"], "True, False or 'auto'"),
])
def test_bad_configuration_is_one_clear_error(argv, message):
    with pytest.raises(UserError, match=message):
        load_config(argv, TrainConfig)


def test_config_file_that_raises_names_the_file(tmp_path):
    path = tmp_path / "broken.py"
    path.write_text("n_layers = undefined_name\n")
    with pytest.raises(UserError, match="broken.py' raised NameError"):
        load_config([str(path)], TrainConfig)


def test_accumulation_must_divide_evenly():
    cfg = TrainConfig(batch_size=4, max_seq_len=2048, tokens_per_update=2**19)
    assert accumulation_steps(cfg, world_size=1) == 64
    with pytest.raises(UserError, match="not a multiple"):
        accumulation_steps(cfg, world_size=3)


# --- the learning-rate schedule -------------------------------------------------------------------
def test_cosine_schedule_values():
    s = Scheduler(None, "cosine", training_steps=1001, warmup_steps=100, max_lr=1e-3, min_lr=1e-4)
    assert s.lr_at(0) == pytest.approx(1e-5)  # the first update gets 1/100 of the peak
    assert s.lr_at(99) == pytest.approx(1e-3)  # the last warm-up update reaches the peak
    assert s.lr_at(100) == pytest.approx(1e-3)
    # halfway through the decay: the mean of max and min
    assert s.lr_at(550) == pytest.approx(5.5e-4)
    assert s.lr_at(1000) == pytest.approx(1e-4)  # the final update is at min_lr
    assert s.lr_at(5000) == pytest.approx(1e-4)  # and it stays there


def test_linear_and_constant_schedules():
    s = Scheduler(None, "linear", training_steps=1001, warmup_steps=100, max_lr=1e-3, min_lr=1e-4)
    assert [s.lr_at(i)
            for i in (0, 99, 325, 550, 1000)] == pytest.approx([1e-5, 1e-3, 7.75e-4, 5.5e-4, 1e-4])
    c = Scheduler(None, "constant", training_steps=1001, warmup_steps=100, max_lr=1e-3, min_lr=1e-4)
    assert {c.lr_at(i) for i in (0, 50, 1000)} == {1e-3}


def test_scheduler_sets_the_optimizer():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    s = Scheduler(opt, "cosine", 100, 10, 1.0, 0.1)
    assert s.step(4) == opt.param_groups[0]["lr"] == 0.5
    assert s.state_dict()["training_steps"] == 100 and s.current_lr == 0.5


# --- the loader -----------------------------------------------------------------------------------


def test_batches_are_next_token_pairs(tmp_path):
    loader = DatasetLoader(toy_dataset(tmp_path, [100]), "train", batch_size=2, seq_len=4)
    x, y = loader.next_batch()
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert y.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert x.dtype == torch.long


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_ranks_never_share_tokens_and_skip_at_most_one_batch_per_shard(tmp_path, world_size):
    B, T, lengths = 2, 8, [173, 64, 250, 97]
    path = toy_dataset(tmp_path, lengths)
    loaders = [DatasetLoader(path, "train", B, T, rank, world_size) for rank in range(world_size)]
    per_epoch = sum(loaders[0].batches_per_shard(i) for i in range(len(loaders[0].shards)))
    used = []
    for _ in range(per_epoch):
        for loader in loaders:
            x, y = loader.next_batch()
            used.extend(x.flatten().tolist())
            assert torch.equal(y.flatten()[:-1], x.flatten()[1:])  # the target is the next token
    assert len(used) == len(set(used)), "a token position was used twice in one epoch"
    starts = np.cumsum([0] + lengths)
    for shard, n in enumerate(lengths):
        if n < B * T * world_size + 1:
            continue  # too short to feed every rank once: skipped whole
        in_shard = sum(starts[shard] <= t < starts[shard + 1] for t in used)
        assert n - in_shard <= world_size * B * T, "more than one batch per rank skipped in a shard"
    # the next pass cuts windows int(0.618 * T) = 4 tokens further in (see the next test)
    assert loaders[0].next_batch()[0][0, 0].item() % T == 4


def test_each_pass_after_the_first_cuts_new_windows_and_takes_them_in_a_new_order(tmp_path):
    loader = DatasetLoader(toy_dataset(tmp_path, [100]), "train", batch_size=2, seq_len=8)
    starts = {}  # pass -> the first token of every window it read, in the order it read them
    while loader.passes < 4:
        passes = loader.passes
        starts.setdefault(passes, []).extend(loader.next_batch()[0][:, 0].tolist())
    assert starts[0] == list(range(0, 96, 8))  # the guide's order: one window after the other
    # int(pass * 0.618 * 8) % 8 tokens in; (99 - cut) // 8 windows fit after the cut, and batches
    # of 2 take all of them or all but one, each once
    for passes, cut, read in ((1, 4, 10), (2, 1, 12), (3, 6, 10)):
        assert len(set(starts[passes])) == read and {t % 8 for t in starts[passes]} == {cut}
        assert starts[passes] != sorted(starts[passes])
    assert [t // 8 for t in starts[1]] != [t // 8 for t in starts[2]]  # each pass its own order
    # saved in checkpoints, so a resumed run cuts where this one would
    assert loader.state_dict()["passes"] == 4


@pytest.mark.parametrize("batches", [9, 30])  # in the first pass, in a shuffled one
def test_loader_position_round_trips(tmp_path, batches):
    path = toy_dataset(tmp_path, [60, 60])
    a = DatasetLoader(path, "train", 2, 4)
    for _ in range(batches):
        a.next_batch()
    b = DatasetLoader(path, "train", 2, 4)
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_sequence_longer_than_any_shard_is_refused(tmp_path):
    with pytest.raises(UserError, match="lower batch_size or max_seq_len"):
        DatasetLoader(toy_dataset(tmp_path, [50]), "train", batch_size=2, seq_len=32)


def test_token_ids_beyond_the_vocabulary_are_refused(tmp_path):
    loader = DatasetLoader(toy_dataset(tmp_path, [100]), "train", 2, 4, vocab_size=50)
    with pytest.raises(UserError, match="token id 99"):
        loader.next_batch()


# --- whole runs, as a user starts them ------------------------------------------------------------
def test_two_ranks_match_one_rank_with_accumulation(shakespeare_dir, tmp_path):
    # The default optimizer: Muon for the blocks' matrices and AdamW for the rest, so both are
    # checked under DDP.
    common = [*TINY, f"--dataset_dir={shakespeare_dir}", "--training_tokens=768"]  # 6 updates
    # 1 rank x 2 micro-steps of 2x32 tokens
    run("train.py", *common, f"--ckpt_dir={tmp_path / 'one'}",
        env=os.environ | OTHER_ROUNDING)
    run("-m torch.distributed.run --standalone --nproc_per_node=2 train.py", *common,
        f"--ckpt_dir={tmp_path / 'two'}", "--tracker=tensorboard")  # 2 ranks x 1 micro-step
    assert len(list((tmp_path / "two").glob("events.out.tfevents.*"))) == 1  # rank 0 alone tracks
    # The token embedding's peak (embedding_lr) is the largest learning rate of the run.
    assert_same_weights(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"),
                        atol=drift_tolerance(TrainConfig.embedding_lr, 6))


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(shakespeare_dir, tmp_path):
    # The guide's AdamW for every weight; the next test resumes the default, Muon + AdamW.
    common = [*TINY, "--optimizer=adamw", f"--dataset_dir={shakespeare_dir}",
              "--training_tokens=1280",
              "--token_ckpt=640", "--keep_ckpts=5"]  # 10 updates, checkpoints after 5 and 10
    straight = tmp_path / "straight"
    run("train.py", *common, f"--ckpt_dir={straight}")
    assert [p.name for p in checkpoint_paths(straight)] == ["ckpt_00000005.pt", "ckpt_00000010.pt"]
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "ckpt_00000005.pt", resumed)
    shutil.copy(straight / "log.csv", resumed)
    out = run("train.py", *common, f"--ckpt_dir={resumed}", "--load_ckpt=True").stdout
    assert "resumed from" in out and "at update 5" in out
    assert_same_weights(final_weights(straight), final_weights(resumed))
    rows = (resumed / "log.csv").read_text().splitlines()
    assert rows[0] == ("step,progress_pct,train_loss,perplexity,lr,grad_norm,tokens,tokens_per_sec,"
                       "elapsed_s,val_loss,val_bpb,skipped,eval_acc,eval_acc_norm,suite")
    assert [r.split(",")[0] for r in rows[1:]] == [str(i) for i in range(1, 11)]
    assert rows[-1].split(",")[6] == "1280" and rows[-1].split(",")[10] != ""
    assert (resumed / "loss.png").stat().st_size > 10_000


def test_resume_with_dropout_and_samples_keeps_the_sample_schedule_and_the_weights(
        shakespeare_dir, tmp_path):
    # Dropout and sampling both draw from the RNG, so a resumed run matches only if it restores the
    # RNG and prints samples at the same updates as the uninterrupted run (1, 2, 4, 8), not afresh
    # from update 1 of its own. The default optimizer: Muon's momentum must come back from the
    # checkpoint too.
    common = [*TINY, f"--dataset_dir={shakespeare_dir}", "--training_tokens=1024",
              "--token_ckpt=512",
              "--dropout=0.1", "--model_gen_multiplier=2"]  # 8 updates, checkpoints after 4 and 8
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = run("train.py", *common, f"--ckpt_dir={straight}").stdout
    assert re.findall(r"sample at update (\d+)", out) == ["1", "2", "4", "8"]
    resumed.mkdir()
    shutil.copy(straight / "ckpt_00000004.pt", resumed)
    out = run("train.py", *common, f"--ckpt_dir={resumed}", "--load_ckpt=True").stdout
    assert re.findall(r"sample at update (\d+)", out) == ["8"]
    assert_same_weights(final_weights(straight), final_weights(resumed))
    optimizer = torch.load(checkpoint_paths(straight)[-1], weights_only=True)["optimizer"]
    assert set(optimizer) == {"muon",
                              "adamw"} and optimizer["muon"]["state"], "Muon's momentum is saved"


def test_the_default_auto_settings_resume_with_the_checkpoints_dtype_and_compile(
        shakespeare_dir, tmp_path):
    """dtype=auto and compile=auto are decided when a run starts; a resumed run takes them from its
    checkpoint and measures nothing. With the same dtype and compile setting, on one rank of the
    same machine, its updates round as the uninterrupted run's did: the tolerance is zero."""
    auto = [arg for arg in TINY if not arg.startswith(("--dtype", "--compile"))]
    common = [*auto, f"--dataset_dir={shakespeare_dir}", "--training_tokens=1280",
              "--token_ckpt=640", "--keep_ckpts=5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    start_up = re.compile(r"^[\d,]+ parameters \| .*$", re.MULTILINE)  # the line a run starts with
    # measured
    assert "| auto: " in start_up.search(run("train.py", *common,
                                             f"--ckpt_dir={straight}").stdout)[0]
    chosen = torch.load(straight / "ckpt_00000005.pt", weights_only=True)["config"]
    assert chosen["compile"] is False  # 10 tiny updates: far too short to pay for compiling
    resumed.mkdir()
    shutil.copy(straight / "ckpt_00000005.pt", resumed)
    out = run("train.py", *common, f"--ckpt_dir={resumed}", "--load_ckpt=True").stdout
    assert start_up.search(out)[0].endswith(f"| cpu {chosen['dtype']} | dtype {chosen['dtype']} "
                                            "and compile False from the checkpoint")
    assert_same_weights(final_weights(straight), final_weights(resumed))


def test_the_speed_measurement_trains_copies_and_leaves_the_run_as_it_was(shakespeare_dir):
    cfg = load_config([*TINY, "--dropout=0.1", f"--dataset_dir={shakespeare_dir}"], TrainConfig)
    loader = DatasetLoader(cfg.dataset_dir, "train", cfg.batch_size, cfg.max_seq_len)
    torch.manual_seed(0)
    model = Transformer(cfg.model_config(8192))
    optimizer = make_optimizer(model, cfg, "cpu")
    weights, position, rng = (copy.deepcopy(model.state_dict()), loader.state_dict(),
                              torch.get_rng_state())
    time_update = update_timer(model, cfg, loader, accumulation_steps(cfg, 1), "cpu")
    # as choose_speed
    assert hardware.update_seconds(time_update, [torch.float32, torch.bfloat16], "cpu").min() > 0
    assert_same_weights(model.state_dict(), weights)
    assert loader.state_dict() == position and torch.equal(torch.get_rng_state(), rng)
    assert optimizer.state_dict()["adamw"]["state"] == {} and all(p.grad is None
                                                                  for p in model.parameters())


def test_a_resumed_run_takes_its_learning_rates_from_its_own_config(shakespeare_dir, tmp_path):
    """What TrainingDiverged advises: resume from the last checkpoint with a lower max_lr."""
    args = [*TINY, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path}"]
    run("train.py", *args, "--training_tokens=1024", "--max_lr=1e-2")
    run("train.py", *args, "--training_tokens=2048", "--max_lr=1e-3", "--min_lr=1e-4",
        "--load_ckpt=True")
    lrs = [float(row.split(",")[4]) for row in (tmp_path / "log.csv").read_text().splitlines()[9:]]
    lower = Scheduler(None, "cosine", 16, 2, 1e-3, 1e-4)
    # the log keeps 4 digits
    assert lrs == pytest.approx([lower.lr_at(step) for step in range(8, 16)], rel=5e-4)


def test_prepare_train_resume_sample_end_to_end(tmp_path):
    """The README's workflow on a small corpus of its own, every step a subprocess."""
    corpus = tmp_path / "corpus.txt"
    plays = [f"ROMEO:\nSpeak again, bright angel {i}, for thou art as glorious to this night.\n\n"
             f"JULIET:\nO Romeo, Romeo! Wherefore art thou Romeo {i * 7}?\n\n" for i in range(400)]
    corpus.write_text("".join(plays))
    data, ckpt = tmp_path / "data", tmp_path / "out"
    run("prepare.py", f"--input={corpus}", f"--out_dir={data}", "--vocab_size=400")
    args = [*TINY, "--max_lr=1e-2", f"--dataset_dir={data}", f"--ckpt_dir={ckpt}",
            "--training_tokens=1024"]
    first = run("train.py", *args).stdout
    assert "update 8/8" in first and (ckpt / "ckpt_00000008.pt").exists()
    second = run("train.py", *args[:-1], "--training_tokens=2048", "--load_ckpt=True").stdout
    assert "resumed from" in second and "update 16/16" in second
    rows = (ckpt / "log.csv").read_text().splitlines()[1:]
    losses = [float(r.split(",")[2]) for r in rows]
    assert losses[-1] < losses[0] - 0.5, "the loss should fall on this repetitive corpus"
    # starts near ln V
    assert math.isclose(float(rows[0].split(",")[2]), math.log(400), abs_tol=0.3)
    text = run("sample.py", f"--ckpt_dir={ckpt}", "--prompt=ROMEO:", "--max_new_tokens=20").stdout
    assert "update 16" in text and "ROMEO:" in text


def test_a_run_reads_meta_json_once(shakespeare_dir, tmp_path, monkeypatch):
    """The dataset's meta.json is read once when a run starts and passed on: to the tokenizer, to
    both splits' shards, to the fingerprint that checkpoints record and to the bits-per-byte of
    every evaluation."""
    opened, real_open = [], io.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened.append(Path(file).name)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)  # what pathlib's read_text opens files with
    monkeypatch.setattr(builtins, "open", counting_open)
    # leave pytest's Ctrl-C handler in place
    monkeypatch.setattr(preemption.signal, "signal", lambda *args: None)
    train.main([*TINY, f"--dataset_dir={shakespeare_dir}", f"--ckpt_dir={tmp_path}",
                "--training_tokens=256"])
    assert opened.count("meta.json") == 1
    assert checkpoint_paths(tmp_path)  # the run went through to its checkpoint
