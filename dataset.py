"""The dataset format prepare.py writes and train.py reads: meta.json and the shards of token ids,
and the loader that serves them as (x, y) batches.

A dataset directory holds train_000000.npy, ..., val_000000.npy (numpy arrays of token ids,
documents separated by <|endoftext|>), the tokenizer (see tokenizer.py) and meta.json, which records
the vocabulary, the dtype, the token and byte counts of both splits and every shard's length. A run
reads meta.json once (read_meta) and passes it on: to the tokenizer, to each split's shards and to
the bits-per-byte of its evaluations.

A fine-tuning dataset (sft.py writes one) also holds a loss mask beside each shard,
mask_train_000000.npy, ...: 1 where the token is one to learn. Its conversations are laid out in
whole rows of meta["row_tokens"] tokens, so that a batch row never starts inside one. Its
train_tokens and val_tokens count the learned tokens, the ones the loss is over, and train_bytes and
val_bytes their text; the shards' lengths (split_tokens) count all.
"""
import json
from pathlib import Path

import numpy as np
import torch

from configurator import UserError
from files import REBUILD, damaged
from model import IGNORE

# What every reader may rely on: prepare.py writes all of these.
META_KEYS = ("vocab_size", "tokenizer", "pattern", "special_tokens", "dtype", "train_tokens",
             "val_tokens",
             "train_bytes", "val_bytes", "shards")


def read_meta(dataset_dir) -> dict:
    """meta.json of a prepared dataset, with every field the format has (META_KEYS). A directory
    without one was never prepared; one that does not parse, or lacks a field, is damaged."""
    path = Path(dataset_dir) / "meta.json"
    if not path.is_file():
        raise UserError(f"{dataset_dir} is not a prepared dataset (no meta.json); build one with "
                        "`python prepare.py`")
    try:
        meta = json.loads(path.read_text())
        missing = [key for key in META_KEYS if key not in meta]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except (OSError, ValueError, TypeError) as e:
        raise damaged(path, e) from None
    return meta


def split_tokens(meta: dict, split: str) -> int:
    """Tokens in a split's shards: what a pass over it reads."""
    return sum(n for name, n in meta["shards"].items() if name.startswith(split + "_"))


def open_shards(dataset_dir, split: str, meta: dict, prefix: str = "") -> list[np.ndarray]:
    """Memory-map a split's shards after checking them against meta.json (read_meta's): count,
    dtype, length. prefix "mask_": the loss masks of a fine-tuning dataset's shards instead."""
    root = Path(dataset_dir)
    names = sorted(prefix + name for name in meta["shards"] if name.startswith(split + "_"))
    on_disk = sorted(p.name for p in root.glob(f"{prefix}{split}_*.npy"))
    if not names or names != on_disk:
        raise UserError(f"{dataset_dir}: the {split} shards on disk do not match meta.json; "
                        f"{REBUILD}")
    shards = []
    for name in names:
        try:  # a truncated file (an interrupted copy, a disk error) cannot be mapped
            shard = np.load(root / name, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise damaged(root / name, e) from None
        dtype = np.uint8 if prefix else np.dtype(meta["dtype"])
        if shard.dtype != dtype or len(shard) != meta["shards"][name.removeprefix(prefix)]:
            raise UserError(f"{root / name} does not match meta.json (dtype or length); {REBUILD}")
        shards.append(shard)
    return shards


# --------------------------------------------------------------------------------------------------
# The loader: shards of token ids -> (x, y) batches, with every rank reading its own slices.
class DatasetLoader:
    """Serves (x, y) batches from a split, y being x shifted by one token.

    The shards are read in order through memory maps, so memory use does not grow with the dataset.
    With W ranks, one "group" of W batches is taken per step: rank r reads at offset + r*B*T, and
    offset advances by B*T*W, so ranks never read the same tokens. A shard that cannot fill another
    whole group is left (its tail, less than one batch per rank, is skipped) and the next shard
    starts; after the last shard the loader wraps around.
    A shard is read as T-token windows (each with the one token after it, for the target). The first
    pass takes them in order, as the guide's loader does. Each pass after it enters every shard a
    fraction of a window further in (see pass_start), so the text is cut into different windows,
    and takes the windows in an order of its own (see window_order).
    The position (shard, offset, passes) is all the state there is, and it goes into checkpoints. It
    counts tokens, not batches, so a run resumed on another number of ranks carries on from the same
    token: the first group then starts at offset, whatever the group size was before.
    """

    def __init__(self, dataset_dir, split, batch_size, seq_len, rank=0, world_size=1, device="cpu",
                 vocab_size=None, meta=None):
        self.B, self.T, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.device = device
        # meta: the dataset's meta.json, when the caller has read it already (a run reads it once)
        meta = meta or read_meta(dataset_dir)
        shards = open_shards(dataset_dir, split, meta)
        # a fine-tuning dataset's masks, or None
        masks = open_shards(dataset_dir, split, meta, "mask_") if "row_tokens" in meta else None
        if masks is not None and meta["row_tokens"] != seq_len:
            raise UserError(f"{dataset_dir} holds conversations in rows of {meta['row_tokens']} "
                            f"tokens, not max_seq_len={seq_len}; pass --max_seq_len="
                            f"{meta['row_tokens']}")
        group = batch_size * seq_len * world_size
        # Each shard must feed at least one whole group (+1 token for the shifted target), or it is
        # skipped.
        kept = [i for i, s in enumerate(shards) if len(s) >= group + 1]
        self.shards = [shards[i] for i in kept]
        self.masks = None if masks is None else [masks[i] for i in kept]
        if not self.shards:
            raise UserError(f"no {split} shard in {dataset_dir} holds "
                            "batch_size*max_seq_len*world_size+1 = "
                            f"{group + 1} tokens; lower batch_size or max_seq_len")
        self.vocab_size = vocab_size
        self.checked = set()  # shards whose token ids were checked against vocab_size
        self.shard, self.offset, self.passes = 0, 0, 0
        self.order_key, self.order = None, None  # window_order's permutation, kept for its pass

    def batches_per_shard(self, index: int) -> int:
        return (len(self.shards[index]) - 1) // (self.B * self.T * self.world_size)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        shard = self.shard
        data = self.shards[shard]
        if self.vocab_size is not None and self.shard not in self.checked:
            if int(data.max()) >= self.vocab_size:  # one pass per shard, the first time it is used
                raise UserError(f"the dataset holds token id {int(data.max())} but the model's "
                                f"vocabulary has {self.vocab_size} ids; use a dataset made with "
                                "the same tokenizer")
            self.checked.add(self.shard)
        # this rank's B windows: the next ones of the pass, after those of the ranks before it
        first = (self.offset - self.origin()) // self.T + self.rank * self.B
        starts = self.origin() + self.T * self.window_order()[first:first + self.B]
        positions = starts[:, None] + np.arange(self.T + 1)
        rows = torch.from_numpy(data[positions].astype(np.int64))
        x, y = rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
        if self.masks is not None:  # a fine-tuning dataset: only the marked targets are learned
            learned = torch.from_numpy(self.masks[shard][positions[:, 1:]].astype(bool))
            y = y.masked_fill(~learned, IGNORE)
        self.offset += self.B * self.T * self.world_size
        self.skip_short_tail()
        if str(self.device).startswith("cuda"):
            # Page-locked memory lets the copy run asynchronously, overlapping with the GPU's work.
            x, y = (t.pin_memory().to(self.device, non_blocking=True) for t in (x, y))
        return x, y

    def pass_start(self) -> int:
        """Where each shard is entered on this pass: token 0 on the first pass, then 0.618 * T
        tokens further (mod T) on each new one. A small corpus is read many times; cut at the same
        places, it would show the model the very same windows every pass, and the model would
        memorise them (docs/defaults.md). Stepping by the golden ratio keeps the cuts of successive
        passes far apart. A fine-tuning dataset's rows each start a conversation: always token 0."""
        if self.masks is not None:
            return 0
        return int(self.passes * 0.6180339887 * self.T) % self.T

    def origin(self) -> int:
        """Where this pass's first window in the current shard starts: pass_start, or token 0 in a
        shard too short to give up those tokens and still feed one whole group."""
        start = self.pass_start()
        group = self.B * self.T * self.world_size
        return start if start + group + 1 <= len(self.shards[self.shard]) else 0

    def window_order(self) -> np.ndarray:
        """The order in which this pass takes the current shard's windows: as they lie on the first
        pass, shuffled on each later one. Read in the same order every pass, the model would always
        end a pass on the shard's last pages; their text would weigh most in the weights it ends
        with, and the validation loss, measured on the corpus's last tenth, would rise and fall
        with the position in the pass. The shuffle is seeded by (pass, shard) alone, so every rank
        and every resume draws the same order."""
        key = (self.shard, self.passes)
        if self.order_key != key:  # drawn once per shard and pass, when it is entered
            windows = (len(self.shards[self.shard]) - 1 - self.origin()) // self.T
            self.order_key = key
            self.order = (np.arange(windows) if self.passes == 0
                          else np.random.default_rng(key).permutation(windows))
        return self.order

    def skip_short_tail(self):
        """Move to the next shard when what is left of this one cannot fill another whole group."""
        group = self.B * self.T * self.world_size
        if self.offset + group + 1 > len(self.shards[self.shard]):
            self.shard = (self.shard + 1) % len(self.shards)
            self.passes += self.shard == 0
            self.offset = self.origin()

    def state_dict(self) -> dict:
        return {"shard": self.shard, "offset": self.offset, "passes": self.passes}

    def load_state_dict(self, state: dict):
        self.shard, self.offset, self.passes = state["shard"], state["offset"], state["passes"]
        # a position saved with fewer ranks may leave too little for this many
        self.skip_short_tail()
