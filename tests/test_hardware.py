"""hardware.choose_speed: dtype=auto from timed whole updates, compile=auto from the run's length
and whether torch.compile can build here, and a resumed run's speed choices from its checkpoint."""
import pytest
import torch

import hardware
from configurator import UserError
from train import TrainConfig


def never(dtype):
    pytest.fail("measured where nothing needs measuring")


def timer(fast):
    """A time_update whose `fast` dtype takes 0.1 s an update and the other 0.3 s."""
    return lambda dtype: 0.1 if dtype == fast else 0.3


@pytest.fixture
def compiles(monkeypatch):
    """torch.compile can build here (without spending seconds finding out)."""
    monkeypatch.setattr(hardware, "compile_failure", lambda device: "")


@pytest.fixture
def bf16_cpu(monkeypatch):
    """A CPU with bf16 instructions: dtype=auto weighs bf16 against fp32."""
    monkeypatch.setattr(hardware, "pick_dtype", lambda name, device: torch.bfloat16)


def test_explicit_dtype_and_compile_are_obeyed_without_measuring(compiles):
    cfg = TrainConfig(dtype="bfloat16", compile=False)
    assert hardware.choose_speed(cfg, None, never, "cpu") == (torch.bfloat16, False, "")
    cfg = TrainConfig(dtype="float32", compile=True)
    assert hardware.choose_speed(cfg, None, never, "cpu") == (torch.float32, True, "")


def test_auto_keeps_the_dtype_whose_updates_are_faster_and_compiles_only_a_long_run(
        bf16_cpu, compiles):
    for fast, slow in ((torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)):
        # 1,000 updates of 0.1 s: under 2 minutes
        dtype, compile, why = hardware.choose_speed(TrainConfig(training_tokens=1000 * 4096), None,
                                                    timer(fast), "cpu")
        assert dtype == fast and not compile
        assert f"{str(fast)[6:]} 0.100 s" in why and f"{str(slow)[6:]} 0.300 s" in why
        assert why.startswith("auto: dtype: an update took ") and "compile: no" in why
    cfg = TrainConfig(dtype="float32", training_tokens=1300 * 4096)
    _, compile, why = hardware.choose_speed(cfg, None, timer(torch.float32), "cpu")
    assert compile and "compile: yes, its updates take about 2.2 min eager" in why  # 1,300 x 0.1 s
    _, compile, why = hardware.choose_speed(TrainConfig(dtype="float32", max_minutes=30), None,
                                            never, "cpu")
    assert compile and "the run lasts 30 min" in why


def test_updates_are_timed_alternately_after_a_warm_up_and_the_fastest_of_each_counts():
    # warm-ups first: allocation, caches
    calls, noisy = [], iter([9.0, 9.0, 0.5, 0.4, 0.2, 0.9, 0.6, 0.3])
    state = torch.get_rng_state()

    def time_update(dtype):
        calls.append(dtype)
        torch.rand(1)  # dropout in the timed update
        return next(noisy)

    seconds = hardware.update_seconds(time_update, [torch.bfloat16, torch.float32], "cpu")
    assert calls == [torch.bfloat16, torch.float32] * (1 + hardware.SPEED_ROUNDS)
    # bf16's 0.5, 0.2, 0.6; fp32's 0.4, 0.9, 0.3
    assert seconds.tolist() == pytest.approx([0.2, 0.3])
    assert torch.equal(torch.get_rng_state(), state)


def test_a_resumed_run_keeps_its_checkpoints_dtype_and_compile_without_measuring(
        bf16_cpu, compiles):
    saved = {"dtype": "bfloat16", "compile": True}
    assert hardware.choose_speed(TrainConfig(), saved, never, "cpu") == \
        (torch.bfloat16, True, "dtype bfloat16 and compile True from the checkpoint")
    # What the user sets now wins, and the start-up line says what the checkpoint had.
    cfg = TrainConfig(dtype="float32", user_set=("dtype",))
    assert hardware.choose_speed(cfg, saved, never, "cpu") == \
        (torch.float32, True, "compile True from the checkpoint; dtype float32 as set, the "
                              "checkpoint trained in bfloat16")
    cfg = TrainConfig(dtype="bfloat16", compile=False, user_set=("dtype", "compile"))
    assert hardware.choose_speed(cfg, saved, never, "cpu") == \
        (torch.bfloat16, False, "compile False as set, the checkpoint trained with compile True")


def test_where_torch_compile_cannot_build_auto_trains_eager_and_an_explicit_compile_is_refused(
        monkeypatch):
    monkeypatch.setattr(hardware, "compile_failure", lambda device: "no C++ compiler")
    cfg = TrainConfig(dtype="float32", max_minutes=30)  # long enough to compile
    _, compile, why = hardware.choose_speed(cfg, None, never, "cpu")
    assert not compile
    assert why == "auto: compile: no, torch.compile cannot build code here (no C++ compiler)"
    _, compile, why = hardware.choose_speed(TrainConfig(), {"dtype": "float32", "compile": True},
                                            never, "cpu")
    assert not compile and "compile True from the checkpoint | auto: compile: no" in why
    with pytest.raises(UserError, match=r"\(no C\+\+ compiler\).*or pass --compile=False$"):
        hardware.choose_speed(TrainConfig(dtype="float32", compile=True), None, never, "cpu")
