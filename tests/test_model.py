"""Specification of model.py: shapes, the guide's architecture, initial loss, generation and
sampling."""
import math
import time

import pytest
import torch
from helpers import logit_tolerance, recording_top_two_gaps

import model as model_py
from configurator import UserError, load_config
from model import Attention, FeedForward, ModelConfig, Transformer, apply_rope, rope_tables, sample
from sample import SampleConfig

# Small enough that a forward pass takes about a millisecond on a laptop CPU.
TINY = dict(vocab_size=64, max_seq_len=16, n_embd=32, n_heads=4, n_kv_heads=2, n_layers=2,
            multiple_of=16)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides})).eval()


@pytest.mark.parametrize("shape, words", [
    (dict(n_embd=100, n_heads=6), "divisible by n_heads"),
    (dict(n_embd=42, n_heads=6), "must be even"),
    (dict(n_embd=384, n_heads=6, n_kv_heads=4), "multiple of n_kv_heads"),
    (dict(n_layers=0), "positive"),
    (dict(dropout=1.0), "dropout"),
])
def test_impossible_shapes_raise_a_value_error_that_names_the_fix(shape, words):
    # model.py imports nothing of this repository: its errors are Python's own. train.py reports
    # them as one line (tests/test_reliability.py).
    with pytest.raises(ValueError, match=words):
        ModelConfig(**shape)


@pytest.mark.parametrize("n_embd, multiple_of, hidden", [
    (2048, 256, 5632),  # the guide's 1.3B: 2/3*4*2048 = 5461.3 -> 22 * 256
    (384, 256, 1024),  # the default: exactly 1024, no rounding needed
    (512, 256, 1536),  # 1365.3 -> 6 * 256
    (4096, 256, 11008),  # LLaMA-7B: 10922.7 -> 43 * 256
    (32, 16, 96),  # 85.3 -> 6 * 16
])
def test_swiglu_hidden_size(n_embd, multiple_of, hidden):
    with torch.device("meta"):
        ffn = FeedForward(ModelConfig(n_embd=n_embd, n_heads=4, n_kv_heads=4,
                                      multiple_of=multiple_of))
    assert (ffn.w1.out_features, ffn.w3.out_features, ffn.w2.in_features) == (hidden, hidden,
                                                                              hidden)


def test_guide_1b3_config_has_1_3_billion_parameters():
    with torch.device("meta"):  # shapes only, nothing allocated
        model = Transformer(ModelConfig(vocab_size=8192, max_seq_len=2048, n_embd=2048, n_heads=32,
                                        n_kv_heads=32, n_layers=24, multiple_of=256))
    n = model.num_params()
    print(f"1.3B config: {n:,} parameters")
    per_layer = 4 * 2048 * 2048 + 3 * 2048 * 5632 + 2 * 2048  # attention, SwiGLU, two RMSNorm gains
    # + final norm, embedding, output
    assert n == 24 * per_layer + 2048 + 2 * 8192 * 2048 == 1_266_780_160
    # 6N counts the matmul weights only (not the embedding lookup or the gains), plus the attention
    # term.
    assert model.flops_per_token() == 6 * (n - 8192 * 2048 - 49 * 2048) + 12 * 24 * 2048 * 2048


def test_default_config_parameter_count():
    with torch.device("meta"):
        blocks = 4 * (4 * 128**2 + 3 * 128 * 384 + 2 * 128)
        assert Transformer(ModelConfig()).num_params() == blocks + 128 + 2 * 8192 * 128 == 2_950_272


def complex_rope(x, theta):
    """Reference rotary embedding written independently: pair (x[i], x[i + d/2]) is the complex
    number x[i] + j*x[i + d/2], multiplied by exp(j * position * theta^(-2i/d))."""
    T, d = x.shape[-2], x.shape[-1]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2:].double())
    freqs = 1.0 / theta ** (torch.arange(d // 2, dtype=torch.float64) * 2 / d)
    z = z * torch.polar(torch.ones(T, d // 2, dtype=torch.float64),
                        torch.arange(T)[:, None] * freqs)
    return torch.cat((z.real, z.imag), dim=-1).float()


def test_rope_matches_complex_number_reference():
    x = torch.randn(2, 3, 50, 16)
    cos, sin = rope_tables(16, 50, 500.0)
    # fp32 against float64: each output is two products of values below ~4, rounded to 24 bits
    # (about 5e-7 each).
    torch.testing.assert_close(apply_rope(x, cos, sin), complex_rope(x, 500.0), atol=1e-5,
                               rtol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    q, k = torch.randn(16), torch.randn(16)
    cos, sin = rope_tables(16, 64, 10_000.0)

    def score(m, n):  # query at position m, key at position n
        return (apply_rope(q.expand(64, 16), cos, sin)[m] @ apply_rope(k.expand(64, 16), cos,
                                                                       sin)[n]).item()

    # Dot products of 16 rotated values of size ~1: fp32 rounding of the angles at position 60 stays
    # below 1e-5.
    assert score(5, 2) == pytest.approx(score(45, 42), abs=1e-4)
    assert score(7, 7) == pytest.approx(score(60, 60), abs=1e-4)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


def test_changing_future_tokens_never_changes_earlier_logits():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = torch.randint(0, 64, (2, 6))
    logits, _ = model(idx)
    logits_changed, _ = model(changed)
    assert logits.shape == (2, 16, 64)
    torch.testing.assert_close(logits_changed[:, :10], logits[:, :10])
    assert not torch.allclose(logits_changed[:, 10:], logits[:, 10:])


def test_gqa_shapes_and_equivalence_to_full_attention():
    torch.manual_seed(0)
    config = ModelConfig(**TINY)  # 4 query heads share 2 key/value heads
    gqa = Attention(config)
    assert gqa.wq.weight.shape == (32, 32) and gqa.wk.weight.shape == gqa.wv.weight.shape == (16,
                                                                                              32)
    # Full multi-head attention whose 4 kv heads are copies (0, 0, 1, 1) of the GQA module's 2 must
    # agree with it.
    mha = Attention(ModelConfig(**{**TINY, "n_kv_heads": 4}))
    mha.load_state_dict({name: w.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
                         if name in ("wk.weight",
                         "wv.weight") else w for name, w in gqa.state_dict().items()})
    x = torch.randn(3, 16, 32)
    cos, sin = rope_tables(8, 16, 10_000.0)
    out = gqa(x, cos, sin)
    assert out.shape == (3, 16, 32)
    # The same products, summed by kernels of other shapes: fp32's default tolerance (rtol 1.3e-6,
    # atol 1e-5).
    torch.testing.assert_close(out, mha(x, cos, sin))


def test_initial_loss_is_close_to_log_vocab_size():
    torch.manual_seed(0)
    model = Transformer(ModelConfig()).eval()  # the default model, vocabulary 8192
    idx, targets = torch.randint(0, 8192, (2, 2, 128))
    with torch.no_grad():
        _, loss = model(idx, targets)
    # ln 8192 = 9.01: every token about equally likely
    assert abs(loss.item() - math.log(8192)) < 0.3


def test_tiny_model_overfits_one_sequence():
    model = tiny_model().train()
    idx = torch.randint(0, 64, (1, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05


def test_bf16_autocast_forward_matches_fp32():
    model = tiny_model()
    idx, targets = torch.randint(0, 64, (2, 2, 16))
    with torch.no_grad():
        _, loss = model(idx, targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits_bf16, loss_bf16 = model(idx, targets)
    assert logits_bf16.dtype == torch.bfloat16 and loss_bf16.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa (0.4% per rounding); the loss itself is computed in fp32 from
    # bf16 logits.
    assert loss_bf16.item() == pytest.approx(loss.item(), abs=0.05)


def test_torch_compile_matches_eager():
    # Forward only (no autograd graph): it checks the model traces as one graph and halves the
    # ~30-60 s compile time.
    model = tiny_model()
    idx, targets = torch.randint(0, 64, (2, 2, 16))
    with torch.no_grad():
        _, loss = model(idx, targets)
        start = time.time()
        _, compiled_loss = torch.compile(model, fullgraph=True)(idx, targets)
    print(f"compiled in {time.time() - start:.1f} s")
    # Compiled kernels fuse and reorder fp32 sums: a few ulps of a loss near 4, far below 1e-4.
    assert compiled_loss.item() == pytest.approx(loss.item(), abs=1e-4)


# inside, past and over the window
@pytest.mark.parametrize("prompt_len, new_tokens", [(5, 8), (5, 30), (40, 6)])
def test_cached_and_uncached_greedy_generation_agree(prompt_len, new_tokens, monkeypatch):
    model = tiny_model()
    prompt = torch.randint(0, 64, (3, prompt_len))
    gaps = recording_top_two_gaps(monkeypatch)
    uncached = model.generate(prompt, new_tokens, temperature=0, use_cache=False)
    cached = model.generate(prompt, new_tokens, temperature=0)
    assert cached.shape == (3, prompt_len + new_tokens)
    # the whole prompt is returned, even when longer than 16
    assert torch.equal(cached[:, :prompt_len], prompt)
    # The two paths sum in other orders, so their logits agree to rounding (the next test). Every
    # step's best token led the second by more than that, so the same tokens are the only right
    # answer.
    assert min(gaps) > 2 * logit_tolerance(model(prompt[:, -16:])[0])
    assert torch.equal(cached, uncached)


def test_a_kv_cache_step_gives_the_logits_of_the_whole_context():
    model = tiny_model()
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        whole = model(idx)[0]
        caches = [model_py.KVCache(16) for _ in model.layers]
        steps = [model(idx[:, :5], caches=caches)[0]]  # a 5-token prompt, then one token at a time
        steps += [model(idx[:, t:t + 1], caches=caches, start_pos=t)[0] for t in range(5, 16)]
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=logit_tolerance(whole), rtol=0)


def test_kv_cache_runs_one_position_per_token_and_halves_a_full_window():
    model = tiny_model()  # max_seq_len 16
    lengths = []  # how many positions each forward pass runs
    model.layers[0].register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    model.generate(torch.zeros(1, 5, dtype=torch.long), 30, temperature=0)
    # The 5-token prompt, then one position per token until 17 tokens would not fit; then the newest
    # 8 are rerun.
    assert lengths == [5] + [1] * 11 + [8] + [1] * 8 + [8] + [1] * 8
    lengths.clear()
    model.generate(torch.zeros(1, 5, dtype=torch.long), 30, temperature=0, use_cache=False)
    # the same contexts, rerun in full every step
    assert lengths == list(range(5, 17)) + list(range(8, 17)) * 2


def test_cached_generation_works_under_bf16_autocast():
    model = tiny_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(torch.zeros(2, 3, dtype=torch.long), 20, top_k=10)
    assert out.shape == (2, 23) and out.max() < 64


def test_finished_rows_pad_with_eos_and_generation_stops_when_all_finish():
    model = tiny_model()
    prompt = torch.randint(0, 64, (2, 4))
    free = model.generate(prompt, 10, temperature=0)
    eos = free[0, 4].item()  # the first token row 0 produces
    out = model.generate(prompt, 10, temperature=0, eos_token=eos)
    assert (out[0, 4:] == eos).all()
    if (free[1, 4:] == eos).any():  # row 1 also reaches eos: stop right after it does
        stop = 5 + (free[1, 4:] == eos).nonzero()[0].item()
        assert torch.equal(out[1], free[1, :stop])
    else:
        assert torch.equal(out[1], free[1])
    both = model.generate(prompt[:1].repeat(2, 1), 10, temperature=0, eos_token=eos)
    assert both.shape == (2, 5)  # every row finished at the first step


def test_generation_stops_at_any_of_several_stop_tokens_and_streams_the_same_tokens():
    """A chat model stops at the end of its turn, a base model at <|endoftext|>: either id ends a
    row, and generate_tokens yields, one step at a time, the tokens generate returns."""
    model = tiny_model()
    prompt = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(0))
    free = model.generate(prompt, 10, temperature=0)[0, 4:].tolist()
    never = next(i for i in range(64) if i not in free)
    assert free[2] not in free[:2]  # this seed's third token is a new one
    stops = [never, free[2]]
    out = model.generate(prompt, 10, temperature=0, eos_token=stops)
    assert out[0, 4:].tolist() == free[:3]
    streamed = [t.item() for t in model.generate_tokens(prompt, 10, temperature=0, eos_token=stops)]
    assert streamed == free[:3]


def test_top_k_and_top_p_never_sample_outside_their_sets():
    torch.manual_seed(0)
    probs = torch.tensor([0.02, 0.30, 0.05, 0.25, 0.01, 0.20, 0.10, 0.07])
    logits = probs.log().expand(20_000, 8)
    top3 = set(sample(logits, top_k=3).unique().tolist())
    assert top3 == {1, 3, 5}
    # Sorted: 0.30 (1), 0.25 (3), 0.20 (5), 0.10 (6), ... 0.30 + 0.25 < 0.7 <= 0.30 + 0.25 + 0.20:
    # three tokens.
    assert set(sample(logits, top_p=0.7).unique().tolist()) == {1, 3, 5}
    assert set(sample(logits, top_p=0.25).unique().tolist()) == {1}
    # 0.30/0.75 = 0.4 < 0.5
    assert set(sample(logits, top_k=3, top_p=0.5).unique().tolist()) == {1, 3}
    assert torch.equal(sample(logits[:2], temperature=0), torch.tensor([[1], [1]]))
    counts = torch.bincount(sample(logits).flatten(), minlength=8) / 20_000
    # plain sampling follows the softmax
    torch.testing.assert_close(counts, probs, atol=0.015, rtol=0)


def test_invalid_sampling_settings_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.zeros(1, 1, dtype=torch.long), 2, top_p=1.5)
    # what sample.py turns into one line and exit status 2
    with pytest.raises(UserError, match="top_p"):
        load_config(["--top_p=1.5"], SampleConfig)
