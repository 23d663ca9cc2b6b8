"""export.py --format=gguf: one file that llama.cpp runs. Read back with gguf's own reader, it holds
model.py's weights in llama.cpp's layout, the metadata llama.cpp needs, and a vocabulary that
encodes like tiktoken; a forward pass written from llama.cpp's conventions, fed its tensors, gives
model.py's logits."""
import errno
import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import regex
import torch
from gguf import GGUFReader
from helpers import VARIED_TEXT, one_line_error, run

import prepare
from checkpoint import load_model
from configurator import UserError
from conversation import CHAT_TEMPLATE
from export import ExportConfig, export_gguf, gguf_name, main
from huggingface import byte_characters
from model import ModelConfig, Transformer
from tokenizer import load_tokenizer, prompt_ids, tokenizer_fingerprint

# (n_heads, n_kv_heads, tie_embeddings) of the models the file must describe exactly.
SHAPES = {"mha-untied": (4, 4, False), "gqa-tied": (4, 2, True), "mqa-untied": (4, 1, False),
          "mha-tied": (2, 2, True)}
# Numbers of every length, code, whitespace runs, non-Latin scripts and emoji, beside VARIED_TEXT.
MORE_TEXT = ["ROMEO:\nBut soft, what light through yonder window breaks?\n",
             "7 42 314 2718 31415 926535 8979323846",
             "x = [1, 22, 333]\nfor i in range(10):\n\tprint(f'{i:03d}')  \n",
             "\n\n\n\n    \t  \r\n  end   ",
             "Привет, мир! Γειά σου κόσμε. مرحبا بالعالم. שלום עולם",
             "🙂🙂🙂 naïve café — “quotes” …",
             "don't I'LL we've THEY'RE it'S", ""]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny dataset encoded with GPT-2's vocabulary (from TIKTOKEN_CACHE_DIR: nothing is
    downloaded)."""
    directory = tmp_path_factory.mktemp("gpt2")
    (directory / "docs.jsonl").write_text(json.dumps({"text": "ROMEO:\nBut soft!\n" * 50}) + "\n")
    prepare.main([f"--input={directory / 'docs.jsonl'}", f"--out_dir={directory / 'data'}",
                  "--tokenizer=gpt2"])
    return directory / "data"


def make_checkpoint(ckpt_dir: Path, dataset_dir: Path, shape: str, vocab_size: int,
                    seed: int = 0) -> Transformer:
    """A checkpoint as train.py saves it (the parts export.py reads), holding random weights; the
    norms' gains are random too, so that a tensor put in the wrong place changes the logits."""
    n_heads, n_kv_heads, tied = SHAPES[shape]
    config = ModelConfig(vocab_size=vocab_size, max_seq_len=64, n_embd=64, n_heads=n_heads,
                         n_kv_heads=n_kv_heads,
                         n_layers=2, multiple_of=32, theta=500.0, tie_embeddings=tied)
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if p.dim() == 1 else 0.2 * torch.randn_like(p))
    ckpt_dir.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "step": 0,
                "tokenizer": tokenizer_fingerprint(dataset_dir),
                "config": vars(config) | {"dataset_dir": str(dataset_dir)}},
               ckpt_dir / "ckpt_00000000.pt")
    return model


@pytest.fixture(scope="module")
def exports(shakespeare_dir, gpt2_dir, tmp_path_factory):
    """(vocabulary, shape, dtype) -> (model.py's model, the GGUF file read back), each made once per
    module."""
    made = {}

    def get(vocabulary, shape, dtype="float32"):
        key = (vocabulary, shape, dtype)
        if key not in made:
            dataset = {"bpe": shakespeare_dir, "gpt2": gpt2_dir}[vocabulary]
            ckpt_dir = tmp_path_factory.mktemp(f"{vocabulary}-{shape}")
            model = make_checkpoint(ckpt_dir / "out", dataset, shape,
                                    {"bpe": 8192, "gpt2": 50261}[vocabulary])
            out = export_gguf(ExportConfig(ckpt_dir=str(ckpt_dir / "out"),
                                           out=str(ckpt_dir / "m.gguf"), dtype=dtype))
            made[key] = model, GGUFReader(out)
        return made[key]

    return get


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


def tensors(reader: GGUFReader) -> dict[str, np.ndarray]:
    """Every tensor as fp32, in PyTorch's (rows, columns) order."""
    return {t.name: gguf.quants.dequantize(t.data,
                                           t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            for t in reader.tensors}


# --------------------------------------------------------------------------------------------------
# Weights and metadata
@pytest.mark.parametrize("shape", SHAPES)
def test_every_tensor_is_model_pys_in_llama_cpps_layout(exports, shape):
    model, reader = exports("bpe", shape)
    n_heads, n_kv_heads, tied = SHAPES[shape]
    got, ours = tensors(reader), {k: v.numpy() for k, v in model.state_dict().items()}
    assert len(got) == 2 + 2 * 9 + (not tied)  # a tied output matrix is token_embd, stored once
    assert "output.weight" not in got if tied else np.array_equal(got["output.weight"],
                                                                  ours["output.weight"])
    assert np.array_equal(got["token_embd.weight"], ours["tok_embeddings.weight"])
    assert np.array_equal(got["output_norm.weight"], ours["norm.weight"])
    for i in range(2):
        for theirs, name in [("attn_norm", "attention_norm"), ("attn_v", "attention.wv"),
                                ("attn_output", "attention.wo"), ("ffn_norm", "ffn_norm"),
                                ("ffn_gate", "feed_forward.w1"), ("ffn_up", "feed_forward.w3"),
                                ("ffn_down", "feed_forward.w2")]:
            assert np.array_equal(got[f"blk.{i}.{theirs}.weight"],
                                  ours[f"layers.{i}.{name}.weight"])
        for theirs, name, heads in [("attn_q", "wq", n_heads), ("attn_k", "wk", n_kv_heads)]:
            # per head, row 2j is model.py's row j and row 2j + 1 its row j + head_dim/2
            w = ours[f"layers.{i}.attention.{name}.weight"].reshape(heads, 2, 64 // n_heads // 2,
                                                                    64)
            permuted = got[f"blk.{i}.{theirs}.weight"].reshape(heads, 64 // n_heads // 2, 2, 64)
            assert np.array_equal(permuted[:, :, 0], w[:, 0]) and np.array_equal(permuted[:, :, 1],
                                                                                 w[:, 1])
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}


def test_the_metadata_is_what_llama_cpp_reads(exports, shakespeare_dir):
    _, reader = exports("bpe", "gqa-tied")
    assert {key: field(reader, key) for key in [
        "general.architecture", "general.file_type", "llama.context_length",
                                                "llama.embedding_length",
        "llama.block_count", "llama.feed_forward_length", "llama.attention.head_count",
        "llama.attention.head_count_kv", "llama.attention.layer_norm_rms_epsilon",
                                                "llama.rope.freq_base",
        "llama.rope.dimension_count", "llama.vocab_size", "tokenizer.ggml.model",
                                                "tokenizer.ggml.pre",
        "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                                                "tokenizer.ggml.add_bos_token",
        "tokenizer.ggml.eot_token_id", "tokenizer.chat_template"]} == {
        "general.architecture": "llama", "general.file_type": 0, "llama.context_length": 64,
        "llama.embedding_length": 64, "llama.block_count": 2, "llama.feed_forward_length": 192,
        "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(
            1e-5), "llama.rope.freq_base": 500.0,
        "llama.rope.dimension_count": 16, "llama.vocab_size": 8192, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.bos_token_id": 8187,
        "tokenizer.ggml.eos_token_id": 8187,
        "tokenizer.ggml.add_bos_token": True,
        # a chat ends its reply at <|end|>, rendered as conversation.py renders it
        "tokenizer.ggml.eot_token_id": 8191, "tokenizer.chat_template": CHAT_TEMPLATE}
    # llama.cpp prepends that BOS to every prompt: the ids sample.py feeds (prompt_ids),
    # <|endoftext|> first
    assert prompt_ids(load_tokenizer(shakespeare_dir), "ROMEO:")[0] == 8187
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader,
                                                                  "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == 8192
    # <|endoftext|> and the chat tokens are control tokens, which llama.cpp never prints
    assert tokens[8187:] == ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert set(types[8187:]) == {gguf.TokenType.CONTROL}
    assert set(types[:8187]) == {gguf.TokenType.NORMAL}
    # GPT-2's byte-level alphabet: space is U+0120
    assert tokens[ord("A")] == "A" and tokens[ord(" ")] == "Ġ"
    # every token beyond the bytes is one merge
    assert len(field(reader, "tokenizer.ggml.merges")) == 8187 - 256


# --------------------------------------------------------------------------------------------------
# The forward pass as llama.cpp computes it
def rms_norm(x, gain, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * gain


def adjacent_pair_rope(x, theta):
    """llama.cpp's rotary embedding for the llama architecture ("normal" rope): dimensions 2i and 2i
    + 1 of each head, at position p, are turned by p * theta^(-2i/head_dim). x is (T, heads,
    head_dim)."""
    T, _, d = x.shape
    angles = np.arange(T)[:, None, None] * theta ** (-np.arange(0, d, 2) / d)
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * np.cos(angles) - odd * np.sin(angles)
    out[..., 1::2] = even * np.sin(angles) + odd * np.cos(angles)
    return out


def llama_cpp_logits(reader: GGUFReader, ids: list[int], weights: dict | None = None) -> np.ndarray:
    """Logits computed from the file alone (or from its metadata and `weights`), the way llama.cpp's
    llama graph does, in float64."""
    w = {k: v.astype(np.float64) for k, v in (weights or tensors(reader)).items()}
    n_head, n_kv = (field(reader, "llama.attention.head_count"),
                    field(reader, "llama.attention.head_count_kv"))
    eps, theta = (field(reader, "llama.attention.layer_norm_rms_epsilon"),
                  field(reader, "llama.rope.freq_base"))
    x = w["token_embd.weight"][ids]
    T, d = len(ids), x.shape[1] // n_head
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(field(reader, "llama.block_count")):
        h = rms_norm(x, w[f"blk.{i}.attn_norm.weight"], eps)
        q = adjacent_pair_rope((h @ w[f"blk.{i}.attn_q.weight"].T).reshape(T, n_head, d), theta)
        k = adjacent_pair_rope((h @ w[f"blk.{i}.attn_k.weight"].T).reshape(T, n_kv, d), theta)
        v = (h @ w[f"blk.{i}.attn_v.weight"].T).reshape(T, n_kv, d)
        # query head j reads key/value head j // (n_head / n_kv), as ggml broadcasts them
        k, v = np.repeat(k, n_head // n_kv, axis=1), np.repeat(v, n_head // n_kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(d) + causal
        p = np.exp(scores - scores.max(-1, keepdims=True))
        y = np.einsum("hqk,khd->qhd", p / p.sum(-1, keepdims=True), v).reshape(T, -1)
        x = x + y @ w[f"blk.{i}.attn_output.weight"].T
        h = rms_norm(x, w[f"blk.{i}.ffn_norm.weight"], eps)
        gate = h @ w[f"blk.{i}.ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate))
                 * (h @ w[f"blk.{i}.ffn_up.weight"].T)) @ w[f"blk.{i}.ffn_down.weight"].T
    output = w.get("output.weight", w["token_embd.weight"])  # no output.weight: the embedding, tied
    return rms_norm(x, w["output_norm.weight"], eps) @ output.T


@pytest.mark.parametrize("vocabulary, shape", [("bpe", s) for s in SHAPES] + [("gpt2", "gqa-tied")])
def test_llama_cpps_forward_pass_on_the_file_gives_model_pys_logits(exports, vocabulary, shape):
    model, reader = exports(vocabulary, shape)
    ids = torch.randint(0, model.config.vocab_size, (64,),
                        generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].double().numpy()
    theirs = llama_cpp_logits(reader, ids)
    assert np.abs(ours).max() > 3  # logits far from 0, so that the comparison means something
    assert np.abs(theirs - ours).max() <= 1e-4 * np.abs(ours).max()


def test_without_the_permutation_the_logits_differ(exports):
    """What the test above catches: llama.cpp rotating model.py's unpermuted q and k."""
    model, reader = exports("bpe", "mha-untied")
    ids = list(range(100, 164))
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0][0].double().numpy()
    unpermuted, ours_weights = tensors(reader), model.state_dict()
    for i in range(2):
        for name in ("q", "k"):
            weight = ours_weights[f"layers.{i}.attention.w{name}.weight"]
            unpermuted[f"blk.{i}.attn_{name}.weight"] = weight.numpy()
    theirs = llama_cpp_logits(reader, ids, unpermuted)
    assert np.abs(theirs - ours).max() > 0.01 * np.abs(ours).max()


# --------------------------------------------------------------------------------------------------
# The vocabulary
def gguf_encoder(reader: GGUFReader, pattern: str):
    """A byte-level BPE encoder built from the file's tokens and merges alone, as llama.cpp's gpt2
    tokenizer model runs it: split by `pattern`, each piece as byte-level characters; with llama-bpe
    a piece that is a token is taken whole (llama.cpp's ignore_merges), otherwise the adjacent pair
    with the lowest merge rank is joined until none is left."""
    tokens = field(reader, "tokenizer.ggml.tokens")
    ids = {token: i for i, token in enumerate(tokens)}
    ranks = {tuple(merge.split(" ")): rank for rank,
             merge in enumerate(field(reader, "tokenizer.ggml.merges"))}
    whole = field(reader, "tokenizer.ggml.pre") == "llama-bpe"
    chars = byte_characters()

    def encode_piece(piece: str) -> list[int]:
        parts = [chars[b] for b in piece.encode()]
        if whole and "".join(parts) in ids:
            return [ids["".join(parts)]]
        while len(parts) > 1:
            pair_ranks = [ranks.get(pair, len(ranks))
                          for pair in zip(parts, parts[1:], strict=False)]
            best = int(np.argmin(pair_ranks))
            if pair_ranks[best] == len(ranks):
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        return [ids[p] for p in parts]

    return lambda text: [i for piece in regex.findall(pattern, text) for i in encode_piece(piece)]


@pytest.mark.parametrize("vocabulary", ["bpe", "gpt2"])
def test_the_tokens_and_merges_encode_like_tiktoken(exports, vocabulary, shakespeare_dir, gpt2_dir):
    tokenizer = load_tokenizer({"bpe": shakespeare_dir, "gpt2": gpt2_dir}[vocabulary])
    encode = gguf_encoder(exports(vocabulary, "gqa-tied")[1], tokenizer.pattern)
    plays = load_tokenizer(shakespeare_dir).decode(np.load(shakespeare_dir
                                                           / "val_000000.npy")[:5000])
    total = 0
    for text in [VARIED_TEXT, plays, *MORE_TEXT]:
        expected = tokenizer.encode(text)
        assert encode(text) == expected, text[:80]
        total += len(expected)
    assert total > {"bpe": 1500, "gpt2": 1500}[vocabulary]


# --------------------------------------------------------------------------------------------------
# Other dtypes and the user's mistakes
@pytest.mark.parametrize("dtype, tolerance",
                         [("float16", 0.0), ("bfloat16", 0.0), ("q8_0", 0.6 / 127)])
def test_smaller_dtypes_round_the_weights_and_keep_the_norms(exports, dtype, tolerance):
    model, reader = exports("bpe", "gqa-tied", dtype)
    _, f32 = exports("bpe", "gqa-tied")
    exact, got = tensors(f32), tensors(reader)
    for t in reader.tensors:
        w = exact[t.name]
        if w.ndim == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32 and np.array_equal(got[t.name], w)
        elif dtype == "q8_0":
            # each block of 32 weights is int8 multiples of a step, its largest |w| / 127 rounded to
            # fp16: off by half a step, plus up to 127 times the step's own rounding (2^-11 of it)
            assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            blocks = np.abs(w).reshape(-1, 32).max(-1, keepdims=True)
            assert (np.abs(got[t.name] - w).reshape(-1, 32) <= tolerance * blocks).all()
        else:
            rounded = torch.tensor(w).to(getattr(torch, dtype)).float().numpy()
            assert t.tensor_type.name == {"float16": "F16", "bfloat16": "BF16"}[dtype]
            assert np.array_equal(got[t.name], rounded)
    assert field(reader, "general.file_type") == {"float16": 1, "bfloat16": 32, "q8_0": 7}[dtype]
    # q8_0: 32 int8 and one fp16 step
    bytes_per_weight = {"F32": 4, "F16": 2, "BF16": 2, "Q8_0": 34 / 32}
    assert all(t.n_bytes == t.n_elements * bytes_per_weight[t.tensor_type.name]
               for t in reader.tensors)
    # llama.cpp computes, with the rounded weights, what model.py computes with them
    rounded = {name: torch.tensor(got.get(gguf_name(name), got["token_embd.weight"]))
               for name in model.state_dict()}
    for name, w in rounded.items():
        # llama.cpp's row order back to model.py's
        if ".attention.wq." in name or ".attention.wk." in name:
            rounded[name] = w.view(w.shape[0] // 16, 8, 2, 64).transpose(1, 2).reshape(w.shape)
    rounded_model = Transformer(model.config).eval()
    rounded_model.load_state_dict(rounded)
    ids = list(range(64))
    with torch.no_grad():
        ours = rounded_model(torch.tensor([ids]))[0][0].double().numpy()
    assert np.abs(llama_cpp_logits(reader, ids) - ours).max() <= 1e-4 * np.abs(ours).max()


def test_an_existing_file_needs_overwrite_and_a_bad_dtype_is_named(shakespeare_dir, tmp_path):
    make_checkpoint(tmp_path / "out", shakespeare_dir, "mha-untied", 8192)
    out, options = tmp_path / "model.gguf", [f"--ckpt_dir={tmp_path / 'out'}", "--format=gguf"]
    main([*options, f"--out={out}"])
    before = out.read_bytes()
    one_line_error(run("export.py", *options, f"--out={out}", check=False),
                   f"{out} already exists; pass --overwrite")
    with pytest.raises(UserError,
                       match="--dtype=q4_0: a GGUF file takes float32, float16, bfloat16, q8_0"):
        main([*options, f"--out={out}", "--overwrite", "--dtype=q4_0"])
    with pytest.raises(UserError, match="--format=gguf with --out "):
        main([*options, f"--out_dir={tmp_path / 'hf'}"])
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf",
                                                          "out"], "no temporary file is left behind"


def test_a_model_read_for_export_keeps_its_head_tied(shakespeare_dir, tmp_path):
    model = make_checkpoint(tmp_path / "out", shakespeare_dir, "gqa-tied", 8192)
    _, _, read, _ = load_model(str(tmp_path / "out"))
    assert read.output.weight is read.tok_embeddings.weight and read.num_params(
        ) == model.num_params()
    assert all(torch.equal(a, b) for a,
               b in zip(read.state_dict().values(), model.state_dict().values(), strict=True))


def test_a_full_disk_is_one_error_and_keeps_the_previous_file(
        shakespeare_dir, tmp_path, monkeypatch):
    make_checkpoint(tmp_path / "out", shakespeare_dir, "mha-untied", 8192)
    cfg = ExportConfig(ckpt_dir=str(tmp_path / "out"), out=str(tmp_path / "model.gguf"),
                       overwrite=True)
    before = export_gguf(cfg).read_bytes()

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    with pytest.raises(UserError, match="cannot write .*No space left on device.*free space"):
        export_gguf(ExportConfig(ckpt_dir=cfg.ckpt_dir, out=cfg.out, overwrite=True, dtype="q8_0"))
    assert (tmp_path / "model.gguf").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf", "out"]
