"""export.py and the way back in: a checkpoint -> a Hugging Face LlamaForCausalLM directory that
transformers computes and tokenizes identically with; such a directory -> train.py --init_from and
prepare.py --tokenizer."""
import csv
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import (
    ROOT,
    SHAPES,
    VARIED_TEXT,
    logit_tolerance,
    one_line_error,
    recording_top_two_gaps,
    run,
)
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import prepare
from checkpoint import checkpoint_paths, load_checkpoint
from configurator import UserError, load_config
from export import ExportConfig, export
from huggingface import hf_architecture, load_hf_weights, model_config_from_hf, write_tokenizer
from model import Transformer
from tokenizer import gpt2_tokenizer, load_tokenizer, prompt_ids
from train import TrainConfig


@pytest.fixture(scope="module")
def exports(small_runs):
    """shape -> (checkpoint dict, export directory) of the small model trained with train.py and
    exported with export.py (conftest's small_runs: each shape is trained once per test run)."""
    made = {}

    def get(shape):
        if shape not in made:
            ckpt_dir = small_runs(shape)
            made[shape] = load_checkpoint(checkpoint_paths(ckpt_dir)[-1]), ckpt_dir / "hf"
        return made[shape]

    return get


@pytest.fixture(params=list(SHAPES))
def exported(request, exports):
    return exports(request.param)


@pytest.fixture
def gqa_export(exports):
    return exports("gqa")


def init_from_hf(cfg, vocab_size):
    """What train.py does with --init_from: the directory's architecture, then a model holding its
    weights."""
    cfg, vocab_size = hf_architecture(cfg, vocab_size)
    model = Transformer(cfg.model_config(vocab_size))
    load_hf_weights(model, cfg.init_from)
    return cfg, model


def our_model(ckpt):
    model = Transformer(
        TrainConfig(**ckpt["config"]).model_config(ckpt["model"]["tok_embeddings.weight"].shape[0]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def real_text_ids(shakespeare_dir, n):
    return torch.from_numpy(np.load(shakespeare_dir / "val_000000.npy")[1000:1000
                                                                        + n].astype(np.int64))[None]


# --------------------------------------------------------------------------------------------------
# Out: the export computes what model.py computes
def test_the_directory_describes_the_model(exported):
    ckpt, hf_dir = exported
    config = json.loads((hf_dir / "config.json").read_text())
    c = TrainConfig(**ckpt["config"])
    assert {k: config[k]
            for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads",
                                   "rms_norm_eps", "rope_theta", "max_position_embeddings",
                                   "tie_word_embeddings",
                                   "vocab_size", "bos_token_id", "eos_token_id",
                                   "torch_dtype")} == {
        "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                                       "num_key_value_heads": c.n_kv_heads,
        "rms_norm_eps": 1e-5, "rope_theta": 10_000.0, "max_position_embeddings": 64,
                                                       "tie_word_embeddings": False,
        "vocab_size": 8192, "bos_token_id": 8187, "eos_token_id": 8187, "torch_dtype": "float32"}
    assert config[
        "intermediate_size"] == ckpt["model"]["layers.0.feed_forward.w1.weight"].shape[0] == 256
    weights = load_file(hf_dir / "model.safetensors")
    assert len(weights) == len(ckpt["model"]) == 2 + 2 * 9 + 1
    assert torch.equal(weights["model.layers.1.self_attn.k_proj.weight"],
                       ckpt["model"]["layers.1.attention.wk.weight"])
    card = (hf_dir / "README.md").read_text()
    last_eval = ckpt_log_last_eval(hf_dir.parent)
    assert "| tokens trained | 2,560 (10 updates of 256 tokens" in card
    loss, bpb = float(last_eval["val_loss"]), float(last_eval["val_bpb"])
    assert f"{loss:.4f} nats/token, {bpb:.4f} bits/byte" in card
    assert f"| parameters | {our_model(ckpt).num_params():,} |" in card
    assert "`python train.py --n_layers=2 --n_embd=64" in card and "data/shakespeare" in card


def ckpt_log_last_eval(ckpt_dir):
    with open(ckpt_dir / "log.csv") as f:
        return [row for row in csv.DictReader(f) if row["val_loss"]][-1]


def test_transformers_gives_the_same_logits(exported, shakespeare_dir):
    ckpt, hf_dir = exported
    ours, theirs = our_model(ckpt), AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(theirs) is LlamaForCausalLM and theirs.dtype == torch.float32
    torch.manual_seed(0)
    for ids in (torch.randint(0, 8192, (2, 64)), real_text_ids(shakespeare_dir, 64)):
        with torch.no_grad():
            logits = ours(ids)[0]
            assert (logits - theirs(ids).logits).abs().max().item() <= logit_tolerance(logits)


def test_greedy_generation_is_identical(exported, shakespeare_dir, monkeypatch):
    ckpt, hf_dir = exported
    ours, theirs = our_model(ckpt), AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    # 12 + 20 tokens fit the 64-token context. Not more: a model trained ten updates soon loops
    # between two tokens, whose logits can then come within rounding of each other.
    prompt = real_text_ids(shakespeare_dir, 12)
    gaps = recording_top_two_gaps(monkeypatch)
    # generation_config.json stops transformers at <|end|> or <|endoftext|>, as chat.py stops
    stops = json.loads((hf_dir / "generation_config.json").read_text())["eos_token_id"]
    assert stops == [8191, 8187]
    expected = ours.generate(prompt, 20, temperature=0, eos_token=stops)[0].tolist()
    # The logits agree to rounding (the test above); each step's best token leads by more, so it is
    # the only answer.
    with torch.no_grad():
        assert min(gaps) > 2 * logit_tolerance(ours(torch.tensor([expected]))[0])
    got = theirs.generate(prompt, max_new_tokens=20, do_sample=False)[0].tolist()
    # transformers stops at either; model.generate pads the rest of the row with the first
    assert got == expected[:len(got)] and len(got) > 12 and set(expected[len(got):]) <= {8191}
    assert len(got) == 32 or got[-1] in stops


def test_sample_py_and_transformers_continue_a_prompt_alike(gqa_export, shakespeare_dir):
    """Both begin the prompt after an <|endoftext|>; greedy, they write the same continuation."""
    ckpt, hf_dir = gqa_export
    result = run("sample.py", f"--ckpt_dir={hf_dir.parent}", "--prompt=ROMEO:", "--temperature=0",
                 "--max_new_tokens=20")
    assert result.returncode == 0, result.stderr
    # after the header line
    ours = result.stdout.split("\n", 1)[1].removesuffix("\n" + "-" * 40 + "\n")
    tokenizer, model = (AutoTokenizer.from_pretrained(hf_dir),
                        AutoModelForCausalLM.from_pretrained(hf_dir).eval())
    prompt = tokenizer("ROMEO:", return_tensors="pt")
    assert prompt[
        "input_ids"][0,
                     0].item() == tokenizer.bos_token_id == load_tokenizer(shakespeare_dir).eot_id
    with torch.no_grad():
        theirs = model.generate(**prompt, max_new_tokens=20, do_sample=False)[0]
    assert ours == tokenizer.decode(theirs, skip_special_tokens=True)


@pytest.mark.parametrize("which", ["bpe", "gpt2"])
def test_the_tokenizer_encodes_like_tiktoken(which, gqa_export, shakespeare_dir, tmp_path):
    if which == "bpe":
        tiktoken_tokenizer, hf_dir = load_tokenizer(shakespeare_dir), gqa_export[1]
    else:
        tiktoken_tokenizer, hf_dir = gpt2_tokenizer(), tmp_path
        write_tokenizer(tiktoken_tokenizer, tmp_path, 1024)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    plays = tiktoken_tokenizer.decode(np.load(shakespeare_dir / "val_000000.npy")[:20_000])
    for text in (VARIED_TEXT, plays):
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == tiktoken_tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        # A prompt reaches the model as sample.py gives it: after an <|endoftext|>, as every
        # document in the shards
        assert tokenizer(text)["input_ids"] == prompt_ids(tiktoken_tokenizer, text) == [
            tiktoken_tokenizer.eot_id, *ids]
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == tiktoken_tokenizer.eot_id
    assert len(tokenizer) == tiktoken_tokenizer.vocab_size


def test_bfloat16_export_and_an_existing_out_dir(gqa_export, tmp_path):
    ckpt, hf_dir = gqa_export
    out = tmp_path / "bf16"
    export(ExportConfig(ckpt_dir=str(hf_dir.parent), out_dir=str(out), dtype="bfloat16"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    weights = load_file(out / "model.safetensors")
    assert torch.equal(weights["lm_head.weight"], ckpt["model"]["output.weight"].bfloat16())
    before = (out / "model.safetensors").stat().st_mtime_ns
    one_line_error(run("export.py", f"--ckpt_dir={hf_dir.parent}", f"--out_dir={out}", check=False),
                   "--overwrite")
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    export(ExportConfig(ckpt_dir=str(hf_dir.parent), out_dir=str(out), overwrite=True))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert sorted(p.name
                  for p in tmp_path.iterdir()) == ["bf16"], "no temporary directory is left behind"


READ_PEAK = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from checkpoint import load_checkpoint
def peak():  # bytes, from the kernel's accounting of this process (mapped file pages count too)
    status = open("/proc/self/status")
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) * 1024
open("/proc/self/clear_refs", "w").write("5")  # the peak is now the current size (not the imports')
before = peak()
ckpt = load_checkpoint(Path(sys.argv[2]), tensors=sys.argv[3])
assert sum(float(t.sum()) for t in ckpt["model"].values()) == 0  # every weight read
print(peak() - before)
"""


def test_reading_the_weights_alone_leaves_the_optimizer_state_on_disk(tmp_path):
    # AdamW keeps two moments per weight: export.py and sample.py would read three times the bytes
    # they need.
    weights = 8 * 2**20  # 32 MiB in fp32
    state = {"model": {"w": torch.zeros(weights)}, "step": 1,
             "optimizer": {"state": {0: {"exp_avg": torch.ones(weights),
                                         "exp_avg_sq": torch.ones(weights)}}}}
    path = tmp_path / "ckpt_00000001.pt"
    torch.save(state, path)
    peak = {tensors: int(subprocess.run([sys.executable, "-c", READ_PEAK, ROOT, path, tensors],
                                        capture_output=True,
                                        text=True, check=True).stdout)
            for tensors in ("all", "model")}
    assert peak["all"] > 2.5 * 4 * weights and peak["model"] < 1.5 * 4 * weights, peak


# --------------------------------------------------------------------------------------------------
# Back in: train.py --init_from and prepare.py --tokenizer
def test_export_then_init_from_is_bitwise_the_checkpoint(exported, shakespeare_dir):
    ckpt, hf_dir = exported  # the default --dtype=float32
    cfg, model = init_from_hf(load_config([f"--init_from={hf_dir}",
                                           f"--dataset_dir={shakespeare_dir}"], TrainConfig),
                              8192)
    for name in ("n_embd", "n_heads", "n_kv_heads", "n_layers", "multiple_of", "eps", "theta",
                 "tie_embeddings"):
        assert getattr(cfg, name) == ckpt["config"][name], name
    state = model.state_dict()
    assert state.keys() == ckpt["model"].keys()
    assert all(torch.equal(state[name], ckpt["model"][name]) for name in state)


@pytest.fixture(scope="module")
def tied_gqa_llama(tmp_path_factory, exports):
    """A LlamaForCausalLM made by transformers itself: tied embeddings, 4 query heads sharing 1
    key/value head, a SwiGLU width and RoPE base unlike model.py's defaults; saved with the exported
    model's tokenizer."""
    directory = tmp_path_factory.mktemp("tied_gqa")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=64, intermediate_size=192,
                         num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-6,
                         rope_theta=500_000.0,
                         max_position_embeddings=128, tie_word_embeddings=True, bos_token_id=8187,
                         eos_token_id=8187,
                         initializer_range=0.1)  # larger than usual, so the logits are far from 0
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (directory / name).write_bytes((exports("gqa")[1] / name).read_bytes())
    return model, directory


def test_a_tied_gqa_transformers_model_imports_with_the_same_logits(
        tied_gqa_llama, shakespeare_dir):
    theirs, directory = tied_gqa_llama
    cfg, ours = init_from_hf(load_config([f"--init_from={directory}",
                                          f"--dataset_dir={shakespeare_dir}"],
                                         TrainConfig), 8192)
    assert (cfg.n_kv_heads, cfg.multiple_of, cfg.eps, cfg.theta, cfg.tie_embeddings) == (1, 192,
                                                                                         1e-6,
                                                                                         500_000.0,
                                                                                         True)
    assert ours.output.weight is ours.tok_embeddings.weight
    assert ours.num_params() == theirs.num_parameters()
    ids = torch.randint(0, 8192, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours.eval()(ids)[0]
        assert (logits - theirs(ids).logits).abs().max().item() <= logit_tolerance(logits)


def test_a_contradicting_setting_or_a_too_large_vocabulary_is_refused(
        tied_gqa_llama, shakespeare_dir):
    directory = tied_gqa_llama[1]
    # refused even when the value chosen is TrainConfig's default: what counts is that the user set
    # it
    with pytest.raises(UserError,
                       match=r"n_kv_heads=4 \(set in a config .* contradicts .*n_kv_heads=1"):
        init_from_hf(load_config([f"--init_from={directory}", "--n_kv_heads=4"], TrainConfig), 8192)
    with pytest.raises(UserError, match="vocabulary has 50257 ids but .* embedding only 8192"):
        init_from_hf(load_config([f"--init_from={directory}"], TrainConfig), 50257)


def test_rope_scaling_is_refused_on_the_command_line_before_anything_is_written(tmp_path):
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=2, rope_scaling={"rope_type": "linear", "factor": 2.0})
    LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    result = run("train.py", f"--init_from={tmp_path / 'model'}", f"--ckpt_dir={tmp_path / 'out'}",
                 check=False)
    one_line_error(result, "rope_scaling")
    assert not (tmp_path / "out").exists()


BASE = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 96,
        "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("change, field", [
    ({"attention_bias": True}, "attention_bias"), ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"), ({"head_dim": 8}, "head_dim"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "rope_parameters"),
    ({"intermediate_size": 64}, "intermediate_size"), ({"model_type": "mistral"}, "model_type"),
])
def test_every_unsupported_field_is_named(change, field):
    with pytest.raises(UserError, match=f"has {field}="):
        model_config_from_hf(BASE | change, "config.json", 128)


def test_prepare_encodes_with_a_model_directorys_tokenizer(tied_gqa_llama, tmp_path):
    directory = tied_gqa_llama[1]
    texts = [VARIED_TEXT, "ROMEO:\nBut soft, what light through yonder window breaks?\n" * 20,
             "a <|endoftext|> b"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "data"
    prepare.main([f"--input={tmp_path / 'docs.jsonl'}", f"--out_dir={out}",
                  f"--tokenizer={directory}",
                  "--val_fraction=0.2"])
    meta = json.loads((out / "meta.json").read_text())
    assert (
        meta["tokenizer"], meta["vocab_size"], meta["special_tokens"]) == (
        "hf", 8192, {"<|endoftext|>": 8187, "<|system|>": 8188, "<|user|>": 8189,
                     "<|assistant|>": 8190, "<|end|>": 8191})
    hf = AutoTokenizer.from_pretrained(directory)
    # a dataset made this way reads back with its own tokenizer.json
    tokenizer = load_tokenizer(out)
    documents = []
    for split in ("train", "val"):
        ids = np.concatenate([np.load(p) for p in sorted(out.glob(f"{split}_*.npy"))]).tolist()
        ends = [i for i, t in enumerate(ids) if t == 8187]
        for start, end in zip([0] + [e + 1 for e in ends[:-1]], ends, strict=True):
            documents.append(document := tokenizer.decode(ids[start:end]))
            # the ids are the HF tokenizer's own encoding; "<|endoftext|>" inside a text stays
            # characters
            assert ids[start:end] == hf(document, split_special_tokens=True,
                                        add_special_tokens=False).input_ids
    assert "".join(documents) == "".join(texts)
    with pytest.raises(UserError, match="has no tokenizer.json"):
        (tmp_path / "no_tokenizer").mkdir()
        (tmp_path / "no_tokenizer" / "config.json").write_text("{}")
        load_tokenizer(tmp_path / "no_tokenizer")


def test_tied_embeddings_share_one_matrix_counted_once():
    from model import ModelConfig

    torch.manual_seed(0)
    untied, tied = Transformer(ModelConfig()), Transformer(ModelConfig(tie_embeddings=True))
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 8192 * 128
    assert tied.flops_per_token() == untied.flops_per_token()  # the output matmul is still done
    # drawn once, from N(0, 0.02)
    assert abs(tied.tok_embeddings.weight.std().item() - 0.02) < 0.0005
    trained = torch.optim.AdamW(tied.parameters()).param_groups[0]["params"]
    assert sum(p.numel() for p in trained) == tied.num_params()


def test_a_full_disk_is_one_error_and_keeps_the_previous_export(gqa_export, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    ckpt_dir, out = gqa_export[1].parent, tmp_path / "hf"
    export(ExportConfig(ckpt_dir=str(ckpt_dir), out_dir=str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(UserError, match="cannot write .*No space left on device.*free space"):
        export(ExportConfig(ckpt_dir=str(ckpt_dir), out_dir=str(out), overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
