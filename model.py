"""A LLaMA-style decoder-only transformer in one file: the model, its size and cost, and text
generation.

Reading order: ModelConfig -> RMSNorm -> rotary embeddings (rope_tables, apply_rope) -> Attention
(with its KVCache) -> FeedForward (SwiGLU) -> Block -> Transformer -> sample.

It imports nothing but PyTorch and the standard library, so the file can be copied anywhere and used
on its own.
An impossible configuration raises ValueError with a message that says what to change.
"""
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The target id that is not learned: fine-tuning gives it to all but the assistant's tokens.
IGNORE = -1


@dataclass
class ModelConfig:
    """The model's shape. The defaults are train.py's: a 3M-parameter model that trains on a laptop
    CPU."""

    vocab_size: int = 8192  # number of distinct token ids (the tokenizer's vocabulary)
    max_seq_len: int = 256  # longest context the model is trained on and can attend over
    n_embd: int = 128  # width of the residual stream
    n_heads: int = 4  # query heads per attention layer
    n_kv_heads: int = 4  # key/value heads; fewer than n_heads gives grouped-query attention (GQA)
    n_layers: int = 4  # number of decoder blocks
    multiple_of: int = 128  # the feed-forward width is rounded up to a multiple of this
    eps: float = 1e-5  # added inside RMSNorm's square root so a zero vector does not divide by zero
    theta: float = 10_000.0  # RoPE base: sets how slowly the slowest position "clock" turns
    dropout: float = 0.0  # usually 0 for pretraining, where the data is never repeated
    tie_embeddings: bool = False  # the output projection reuses the token embedding (Transformer)

    @classmethod
    def from_dict(cls, values: dict, **overrides) -> "ModelConfig":
        """The model's fields among `values` (a training run's whole config, say), then
        `overrides`."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names} | overrides)

    def __post_init__(self):
        sizes = (self.vocab_size, self.max_seq_len, self.n_embd, self.n_heads, self.n_kv_heads,
                 self.n_layers)
        if min(sizes + (self.multiple_of,)) < 1:
            raise ValueError("vocab_size, max_seq_len, n_embd, n_heads, n_kv_heads, n_layers and "
                             "multiple_of "
                            "must all be positive integers")
        if self.n_embd % self.n_heads:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_heads={self.n_heads}; "
                            "choose n_heads that divides n_embd")
        if self.n_embd // self.n_heads % 2:
            raise ValueError(f"the head size n_embd/n_heads={self.n_embd // self.n_heads} must be "
                             "even, because rotary embeddings rotate pairs of dimensions; change "
                             "n_embd or n_heads")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of "
                             f"n_kv_heads={self.n_kv_heads}; each "
                            "key/value head must serve a whole group of query heads")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned per-channel gain.

    Unlike LayerNorm it neither subtracts the mean nor has a bias: cheaper, and works as well in
    practice."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Squares of bf16 values lose too much precision, so the statistic is taken in fp32.
        xf = x.float()
        return (xf
                * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim, max_seq_len, theta):
    """cos and sin of the rotary angle for every (position, frequency) pair, each of shape
    (max_seq_len, head_dim/2).

    Pair i turns by theta^(-2i/head_dim) radians per position: the first pairs spin fast and resolve
    nearby order, the last ones turn so slowly that they tell apart positions far away."""
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), freqs)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate x (B, heads, T, head_dim) by its position's angles; cos and sin are (T, head_dim/2).

    Dimension i is paired with dimension i + head_dim/2 (the "rotate-half" layout) and each pair is
    turned like a 2-D vector. A query at position m and a key at position n are turned by angles m*f
    and n*f, so their dot product only sees the difference m - n: attention learns relative
    positions, with no position vectors added."""
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class KVCache:
    """One layer's keys and values for every position seen so far; it lives only for one `generate`
    call.

    A token's key and value never change once computed, so caching them means each new token costs
    one position of work instead of re-running the whole prefix. Room for a full window is allocated
    on first use, in the dtype the layer actually computes in (bf16 under autocast)."""

    def __init__(self, max_seq_len):
        self.max_seq_len = max_seq_len
        self.k = self.v = None

    def update(self, k, v, start_pos):
        """Store k, v (B, kv_heads, T, head_dim) at positions start_pos.., return all keys and
        values up to them."""
        if self.k is None:
            shape = (k.shape[0], k.shape[1], self.max_seq_len, k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    """Causal self-attention: every position mixes in information from itself and the positions
    before it."""

    def __init__(self, config):
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.n_embd // config.n_heads
        self.dropout = config.dropout
        self.wq = nn.Linear(config.n_embd, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.n_embd, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.n_embd, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, config.n_embd, bias=False)

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, start_pos)
        if self.n_kv_heads < self.n_heads:
            # GQA: query head h reads key/value head h // group. Fewer kv heads shrink the KV cache
            # and the kv projections; the copy below only exists for the attention product itself.
            group = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        # Several queries only ever arrive together from position 0 (training, or a prompt), where
        # the usual lower-triangular mask is right; a single new query may look at every cached key,
        # so it needs no mask.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def ffn_width(n_embd, multiple_of):
    """SwiGLU's hidden width. A plain MLP uses 4*n_embd with two matrices; SwiGLU has three, so its
    width is 2/3 of that to keep the parameter count, then rounded up to a multiple of `multiple_of`
    (e.g. 2048 -> 5461 -> 5632)."""
    return multiple_of * math.ceil(int(2 * 4 * n_embd / 3) / multiple_of)


class FeedForward(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). The w3 branch gates, per channel, what the w1
    branch lets through."""

    def __init__(self, config):
        super().__init__()
        hidden = ffn_width(config.n_embd, config.multiple_of)
        self.w1 = nn.Linear(config.n_embd, hidden, bias=False)
        self.w3 = nn.Linear(config.n_embd, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """One decoder layer, pre-norm: x + attention(norm(x)), then x + feed_forward(norm(x)).

    Normalising only the branch input leaves the residual stream an untouched sum, which keeps
    gradients healthy in deep stacks."""

    def __init__(self, config):
        super().__init__()
        self.attention_norm = RMSNorm(config.n_embd, config.eps)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.n_embd, config.eps)
        self.feed_forward = FeedForward(config)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache=None, start_pos=0):
        x = x + F.dropout(self.attention(self.attention_norm(x), cos, sin, cache, start_pos),
                          self.dropout,
                          self.training)
        return x + F.dropout(self.feed_forward(self.ffn_norm(x)), self.dropout, self.training)


class Transformer(nn.Module):
    """Token embedding -> n_layers Blocks -> RMSNorm -> linear map to one logit per vocabulary
    entry."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.n_embd, config.eps)
        self.output = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # one matrix, one gradient, counted once
            self.output.weight = self.tok_embeddings.weight
        # The rotary tables are derived from the config, so they are buffers but not saved in
        # checkpoints.
        cos, sin = rope_tables(config.n_embd // config.n_heads, config.max_seq_len, config.theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Initialisation: every matrix ~ N(0, 0.02) as in GPT-2, except the two projections that
        # write into the residual stream (attention.wo, feed_forward.w2), shrunk by 1/sqrt(2 *
        # n_layers) so that the stream, a sum of 2 * n_layers branch outputs, starts at a size
        # independent of depth. The logits then start small (std about 0.02 * sqrt(n_embd)), every
        # token about equally likely, and the loss near ln(vocab_size).
        # The output projection is not tied to the embedding by default (as in LLaMA): reading a
        # token and predicting the next one are different jobs, each with a matrix of its own. With
        # tie_embeddings=True (common in small open models, e.g. one imported with train.py's
        # --init_from) the two share one matrix: named_parameters() lists it once, as
        # tok_embeddings.weight, so it is drawn once.
        for name, p in self.named_parameters():
            if p.dim() == 2:  # every matrix; the RMSNorm gains stay at 1
                residual_out = name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
                nn.init.normal_(p, mean=0.0,
                                std=0.02 / math.sqrt(2 * config.n_layers) if residual_out else 0.02)

    def forward(self, idx, targets=None, caches=None, start_pos=0):
        """idx (B, T) token ids -> (logits (B, T, vocab), mean cross-entropy against targets (B, T)
        or None). A target of IGNORE is not learned (fine-tuning learns only the assistant's
        tokens): the mean is over the other targets, and 0 when there are none.

        `caches` (one KVCache per layer) and `start_pos` (position of idx[:, 0]) are used by
        `generate`."""
        T = idx.shape[1]
        if start_pos + T > self.config.max_seq_len:
            raise ValueError(f"positions up to {start_pos + T} exceed "
                             f"max_seq_len={self.config.max_seq_len}")
        cos, sin = self.rope_cos[start_pos:start_pos + T], self.rope_sin[start_pos:start_pos + T]
        x = self.tok_embeddings(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[i], start_pos)
        logits = self.output(self.norm(x))
        if targets is None:
            return logits, None
        # In fp32 even under bf16 autocast: the log-sum-exp over 8192 logits is where low precision
        # hurts most.
        # Summed, then divided by the targets that count (at least one): cross_entropy's own mean
        # would divide 0 by 0, a NaN, for a batch with nothing to learn. Never a host sync.
        losses = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                 ignore_index=IGNORE, reduction="sum")
        return logits, losses / (targets != IGNORE).sum().clamp(min=1)

    def num_params(self):
        """Number of parameters; a tensor shared by two modules (tied embeddings) is counted
        once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), the usual estimate used for MFU (PaLM,
        nanoGPT).

        6N: each weight of a matrix multiply costs 2 FLOPs per token forward (multiply + add) and 4
        backward. N counts exactly the nn.Linear weights (including the output projection); the
        embedding table is a lookup, not a matmul, and the RMSNorm gains are elementwise, so neither
        is in N.
        12 * n_layers * n_embd * max_seq_len: the attention scores q.k and the weighted sum of v
        each cost 2 * n_embd FLOPs per (query, key) pair forward, times 3 for backward; like PaLM we
        count all max_seq_len keys (ignoring that the causal mask skips half of them)."""
        c = self.config
        n = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return 6 * n + 12 * c.n_layers * c.n_embd * c.max_seq_len

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_token=None,
                 use_cache=True):
        """Extend every row of idx (B, T) by up to max_new_tokens tokens; returns (B, T + number
        generated). The tokens are generate_tokens'; see it for the rules."""
        return torch.cat([idx, *self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p,
                                                     eos_token, use_cache)], dim=1)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                        eos_token=None, use_cache=True):
        """Yield the next token of every row of idx (B, T), a (B, 1) tensor, up to max_new_tokens
        times: a chat prints each one as it comes.

        - All rows are decoded together, so the prompts must have equal length (there is no padding
          mask); group prompts of the same length, or generate one at a time.
        - A prompt longer than max_seq_len is cut to its last max_seq_len tokens before the model
          runs (the returned tensor still starts with the whole prompt).
        - temperature 0 is greedy decoding; otherwise see `sample` for temperature, top_k and top_p.
        - eos_token: an id, or a list of ids (a chat model stops at the end of its turn, a base
          model at <|endoftext|>). A row that has produced one keeps emitting the first as padding,
          and generation stops as soon as every row has produced one.
        - The model sees at most max_seq_len tokens. When the sequence outgrows that window, its
          oldest half is dropped and the model continues from the newest max_seq_len // 2 tokens,
          growing the context again.
          (A cache cannot just slide by one token: deeper layers' keys were computed while the
          dropped token was still visible.) Halving costs one prompt-style pass over half a window,
          then that many cheap steps, so a token never costs more than about two positions of work
          on average.
        - use_cache=True keeps a KV cache, so after the prompt each step runs only the newest token;
          use_cache=False reruns the whole context every step (a reference for tests and
          benchmarks). Both see the same context, so they produce the same tokens.
        """
        check_sampling(temperature, top_k, top_p)
        window = self.config.max_seq_len
        caches = [KVCache(window) for _ in self.layers] if use_cache else None
        start = max(0, idx.shape[1] - window)  # the model's context is idx[:, start:]
        cached = 0  # positions of that context whose keys and values are in the caches
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        stops = torch.tensor([eos_token] if isinstance(eos_token, int) else eos_token or [],
                             dtype=torch.long, device=idx.device)
        for _ in range(max_new_tokens):
            # the context outgrew the window: keep its newest half
            if idx.shape[1] - start > window:
                start, cached = idx.shape[1] - max(1, window // 2), 0
            if use_cache and cached > 0:  # only the newest token is new work
                logits, _ = self(idx[:, -1:], caches=caches, start_pos=cached)
            # first step, no cache, or a freshly halved context: run the whole context from position
            # 0
            else:
                logits, _ = self(idx[:, start:], caches=caches)
            cached = idx.shape[1] - start
            next_token = sample(logits[:, -1], temperature, top_k, top_p)
            if len(stops):
                next_token = next_token.masked_fill(finished[:, None], stops[0])
                finished |= torch.isin(next_token[:, 0], stops)
            idx = torch.cat((idx, next_token), dim=1)
            yield next_token
            if finished.all():
                break


def check_sampling(temperature, top_k, top_p):
    """A ValueError for settings `sample` cannot draw with."""
    if (temperature < 0 or (top_k is not None and top_k < 1)
            or (top_p is not None and not 0 < top_p <= 1)):
        raise ValueError("sampling needs temperature >= 0, top_k >= 1 and 0 < top_p <= 1 "
                         f"(got temperature={temperature}, top_k={top_k}, top_p={top_p})")


def sample(logits, temperature=1.0, top_k=None, top_p=None):
    """Draw one token id per row of logits (B, vocab) -> (B, 1).

    temperature divides the logits: below 1 sharpens the distribution, above 1 flattens it, 0 means
    argmax.
    top_k keeps only the k highest-scoring tokens. top_p ("nucleus") keeps the smallest set of best
    tokens whose probabilities add up to at least top_p, so the cut adapts to how confident the
    model is."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the better tokens before it already cover top_p; the best token always
        # stays.
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)
