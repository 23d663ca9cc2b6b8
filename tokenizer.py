"""The tokenizer: text <-> token ids, trained, saved and loaded here, used by every script.

A dataset directory names its tokenizer in meta.json: "bpe" (a byte-level BPE trained by prepare.py
on the corpus, stored as tokenizer.tiktoken in tiktoken's rank-file format), "gpt2" (tiktoken's
GPT-2 vocabulary) or "hf" (a Hugging Face tokenizer.json, copied from a model directory).
load_tokenizer(dataset_dir) is the one way every script gets it; tokenizer_fingerprint identifies
it, so that a model is never trained on, or read with, another tokenizer's ids. Every document ends
with <|endoftext|> (EOT), and a prompt starts after one.

The special tokens come after the last mergeable token: EOT, then the chat tokens of
conversation.py (CHAT_TOKENS), which prepare.py reserves in every vocabulary it builds, so that a
pretrained model can be fine-tuned to chat without changing its shape. meta.json's special_tokens
lists them; a dataset prepared without the chat tokens has EOT alone and keeps working.
"""
import base64
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import rustbpe
import tiktoken

from configurator import UserError
from conversation import CHAT_TOKENS
from dataset import read_meta
from files import damaged, write_file

EOT = "<|endoftext|>"


# GPT-4's split pattern, except that numbers are chunked by at most 2 digits (as nanochat does):
# with only a few thousand tokens the vocabulary is better spent on words than on every 3-digit
# number.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)


class Tokenizer:
    """The tokenizer as the rest of the repo sees it: a tiktoken Encoding plus the facts train.py
    needs."""

    def __init__(self, encoding: tiktoken.Encoding, name: str, special_tokens: dict[str, int]):
        self.encoding = encoding
        self.name = name  # "bpe" or "gpt2"
        self.special_tokens = special_tokens  # name -> id: EOT, then the chat tokens if reserved
        self.eot_id = encoding.eot_token
        self.vocab_size = encoding.n_vocab
        self.pattern = encoding._pat_str  # tiktoken has no public getter for the split regex

    def encode(self, text: str) -> list[int]:
        # "ordinary": a literal "<|endoftext|>" inside a text is just characters, never the
        # separator token
        return self.encoding.encode_ordinary(text)

    def encode_array(self, text: str) -> np.ndarray:
        """encode() as a uint32 array. tiktoken hands the ids over as one buffer instead of a Python
        list of ints, which it would build while holding the GIL (and which would then be copied
        into an array anyway). With no special token allowed or disallowed, a literal
        "<|endoftext|>" is ordinary text here too."""
        return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # tiktoken releases the GIL while it encodes, so threads use every core
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            return list(pool.map(self.encode_array, texts))

    def decode(self, ids) -> str:
        # numpy and torch too
        return self.encoding.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids))


class HFTokenizer:
    """A Hugging Face tokenizer.json (a model directory's, e.g. one export.py wrote) with
    Tokenizer's interface."""

    def __init__(self, path: Path, eot_token: str):
        import tokenizers

        try:
            self.hf = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:
            raise UserError(f"cannot read {path} ({type(e).__name__}: {str(e)[:100]}); it is not a "
                            "valid tokenizer.json") from None
        # Like tiktoken's encode_ordinary: the text of a special token inside a document is just
        # characters.
        self.hf.encode_special_tokens = True
        self.path, self.name, self.pattern = path, "hf", None
        self.eot_id = self.hf.token_to_id(eot_token)
        if self.eot_id is None:
            raise UserError(f"{path} has no token {eot_token!r} (its eos_token); fix "
                            "tokenizer_config.json")
        self.vocab_size = max(self.hf.get_vocab(with_added_tokens=True).values()) + 1
        found = {name: self.hf.token_to_id(name) for name in CHAT_TOKENS}
        self.special_tokens = {eot_token: self.eot_id,
                               **{name: i for name, i in found.items() if i is not None}}

    def encode(self, text: str) -> list[int]:
        # no BOS/EOS: documents end with eot_id
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Rust threads encode the batch on every core (set TOKENIZERS_PARALLELISM=false to stop
        # them)
        return [e.ids for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode(ids.tolist() if hasattr(ids, "tolist") else list(ids),
                              skip_special_tokens=False)


def model_dir_tokenizer(model_dir: Path) -> HFTokenizer:
    """The tokenizer of a Hugging Face model directory; its eos_token is the document separator."""
    if not (model_dir / "tokenizer.json").exists():
        raise UserError(f"{model_dir} has no tokenizer.json; save the model's fast tokenizer there "
                        "(transformers' "
                        "AutoTokenizer(...).save_pretrained) or pass another --tokenizer")
    try:
        eos = json.loads((model_dir / "tokenizer_config.json").read_text())["eos_token"]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{model_dir}/tokenizer_config.json names no eos_token to end documents "
                        "with; add one") from None
    return HFTokenizer(model_dir / "tokenizer.json",
                       eos["content"] if isinstance(eos, dict) else eos)


def tiktoken_tokenizer(name: str, ranks: dict[bytes, int], pattern: str,
                       chat: bool) -> Tokenizer:
    """A byte-level BPE from its merge ranks; <|endoftext|> takes the id right after the last merge
    and the chat tokens (chat=True) the ids after it."""
    specials = [EOT, *CHAT_TOKENS] if chat else [EOT]
    special_tokens = {token: len(ranks) + i for i, token in enumerate(specials)}
    encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                                 special_tokens=special_tokens)
    return Tokenizer(encoding, name, special_tokens)


def gpt2_tokenizer(chat: bool = True) -> Tokenizer:
    """GPT-2's vocabulary (ids 0 .. 50256, the last one <|endoftext|>), the chat tokens after it."""
    try:
        # r50k_base is GPT-2's vocabulary
        gpt2 = tiktoken.get_encoding("r50k_base")
    except Exception as e:
        raise UserError(f"cannot load GPT-2's vocabulary ({type(e).__name__}); connect to the "
                        "network or point TIKTOKEN_CACHE_DIR at a tiktoken cache holding "
                        "r50k_base (../shared/tiktoken_cache)") from None
    return tiktoken_tokenizer("gpt2", gpt2._mergeable_ranks, gpt2._pat_str, chat)


def train_bpe(texts, vocab_size: int) -> Tokenizer:
    """Learn byte-level tokens (256 bytes + merges) from texts, leaving room for the special tokens
    so that the vocabulary has vocab_size ids in all: <|endoftext|> and the chat tokens are the
    last ones."""
    merged = vocab_size - 1 - len(CHAT_TOKENS)
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(texts, merged, pattern=SPLIT_PATTERN)
    if trainer.vocab_size != merged:
        supported = vocab_size - merged + trainer.vocab_size
        raise UserError(f"the training text only supports {supported} tokens, not "
                        f"--vocab_size={vocab_size}; lower --vocab_size or add text")
    return tiktoken_tokenizer("bpe",
                              {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()},
                              SPLIT_PATTERN, chat=True)


def save_tokenizer(tokenizer: Tokenizer, path: Path, fix: str):
    """tiktoken's rank file: one "base64(token bytes) rank" line per token, in rank order (`fix`:
    what to do when the disk is full)."""
    lines = [f"{base64.b64encode(tokenizer.encoding.decode_single_token_bytes(rank)).decode()} "
             f"{rank}\n"
             for rank in range(tokenizer.eot_id)]
    write_file(path, "".join(lines).encode(), fix)


def read_ranks(path: Path) -> dict[bytes, int]:
    # tiktoken.load.load_tiktoken_bpe reads this format too, but it caches files by path under
    # TIKTOKEN_CACHE_DIR, so after a dataset is rebuilt it would hand back the old vocabulary.
    ranks = {}
    for line in path.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def load_tokenizer(dataset_dir, meta: dict | None = None) -> Tokenizer | HFTokenizer:
    """The tokenizer a dataset directory was prepared with (or a Hugging Face model directory's):
    the one way every script gets its tokenizer. meta: the dataset's meta.json, when the caller has
    read it already."""
    root = Path(dataset_dir)
    if (root / "config.json").exists() and not (root / "meta.json").exists():
        return model_dir_tokenizer(Path(dataset_dir))
    meta = meta or read_meta(dataset_dir)
    # a dataset prepared before the chat tokens were reserved lists EOT alone
    chat = all(token in meta["special_tokens"] for token in CHAT_TOKENS)
    if meta["tokenizer"] == "gpt2":
        return gpt2_tokenizer(chat)
    if meta["tokenizer"] == "hf":  # special_tokens' one entry is the document separator
        return HFTokenizer(Path(dataset_dir) / "tokenizer.json", next(iter(meta["special_tokens"])))
    path = Path(dataset_dir) / "tokenizer.tiktoken"
    try:
        ranks = read_ranks(path)
        # A file cut short loses tokens or repeats one; tiktoken would not say which file, it would
        # panic.
        specials = len(meta["special_tokens"])
        if (len(ranks) != meta["vocab_size"] - specials
                or sorted(ranks.values()) != list(range(len(ranks)))):
            raise ValueError(f"{len(ranks) + specials} tokens, meta.json says {meta['vocab_size']}")
    except (OSError, ValueError) as e:
        raise damaged(path, e) from None
    return tiktoken_tokenizer("bpe", ranks, meta["pattern"], chat)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """The ids a prompt reaches the model as: <|endoftext|>, then the text. In the shards every
    document starts right after an <|endoftext|>, so a prompt that starts the same way reads as the
    start of a text, which the model predicts better than text with nothing before it
    (docs/benchmarks.md, "The prompt"). sample.py, the Hugging Face tokenizer export.py writes and
    its GGUF file (add_bos_token) all begin a prompt this way."""
    return [tokenizer.eot_id, *tokenizer.encode(text)]


def tokenizer_fingerprint(dataset_dir, meta: dict | None = None) -> str:
    """Identifies a dataset's vocabulary, so that a model is never trained on, or read with, another
    tokenizer's ids. meta: as in load_tokenizer."""
    meta = meta or read_meta(dataset_dir)
    files = [Path(dataset_dir) / name for name in ("tokenizer.tiktoken", "tokenizer.json")]
    files = [p for p in files if p.exists()]
    digest = hashlib.sha256(files[0].read_bytes()).hexdigest()[:16] if files else meta["tokenizer"]
    return f"{meta['tokenizer']}-{meta['vocab_size']}-{digest}"
