"""Measure prepare.py's encoding speed against the usual multiprocessing recipe, on the same corpus,
in one run.

    python bench_prepare.py  # 100 MB, jsonl + parquet + txt, a trained vocabulary and gpt2's
    python bench_prepare.py --megabytes=1000 --formats=jsonl --tokenizers=bpe

The corpus is built once per size from text already on this machine: Python source files from the
installed packages and Shakespeare's plays, one document each, cycled until the size is reached. It
is written three ways (one .jsonl file, one .parquet file laid out as Hugging Face datasets writes
them, a directory of .txt files) so the same documents go through every reader.

Two pipelines encode it with the same vocabulary:
- prepare.py itself (`--tokenizer=<dataset or gpt2>`: no BPE training, just the validation split and
  encoding);
- the recipe most nanoGPT-style repositories use for FineWeb: the main process reads documents and
  hands them to a multiprocessing.Pool whose workers each call encode_ordinary on one document
  (imap, in chunks), then the tokens are copied into a uint16 buffer that is saved as a shard
  whenever it fills up.
Each runs in a fresh subprocess, alternating, `--repeats` times; the median wall time is reported,
with the peak resident memory of the largest process and of the whole process tree (sampled every
100 ms).

A third figure is the tokenizer's own ceiling: encode_ordinary_batch on all cores over text already
in memory, so no reading, parsing or writing at all. How close prepare.py comes to it says what is
left to win.
"""
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from configurator import UserError, load_config, run_cli
from prepare import shakespeare_documents
from tokenizer import gpt2_tokenizer, load_tokenizer


@dataclass
class PrepareBenchConfig:
    megabytes: int = 100  # corpus size (UTF-8 bytes of document text)
    formats: str = "jsonl,parquet,txt"  # comma-separated: the corpus is written in each of these
    tokenizers: str = "bpe,gpt2"  # bpe = the trained 8192 vocabulary of data/shakespeare
    repeats: int = 3  # runs of each, alternating, in fresh processes (the median is reported)
    work_dir: str = "data/bench_prepare"  # corpora and outputs; deleted at the end unless keep=True
    keep: bool = False  # keep work_dir afterwards

    def __post_init__(self):
        if self.megabytes < 1 or self.repeats < 1:
            raise UserError("--megabytes and --repeats must be at least 1")
        if set(self.formats.split(",")) - {"jsonl", "parquet", "txt"}:
            raise UserError("--formats is a comma-separated list of jsonl, parquet and txt")
        if set(self.tokenizers.split(",")) - {"bpe", "gpt2"}:
            raise UserError("--tokenizers is a comma-separated list of bpe and gpt2")


def corpus_documents(megabytes: int):
    """Source files and plays, interleaved and cycled, until about `megabytes` MB of text."""
    site = sysconfig.get_paths()["purelib"]
    code = []
    for path in sorted(glob.glob(f"{site}/**/*.py", recursive=True)):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            code.append(text)
    plays = list(shakespeare_documents())
    total, i = 0, 0
    while total < megabytes * 10**6:
        text = plays[i % len(plays)] if i % 20 == 0 else code[i % len(code)]
        total += len(text.encode())
        i += 1
        yield text


# The parquet file is laid out as Hugging Face datasets (5.2) writes one with to_parquet or
# push_to_hub: row groups of up to 100 MB of text (datasets.config.MAX_ROW_GROUP_SIZE) in pages of
# 256 KiB to 1 MiB (content-defined chunking), with a page index. Row groups of 1000 of these
# documents, as this script wrote before, put each row group's column in one dictionary page of up
# to 18 MB (pyarrow checks a dictionary's size only every 1024 rows), which a reader has to hold
# whole.
PARQUET_ROW_GROUP_BYTES = 100_000_000


def build_corpus(root: Path, megabytes: int, formats: list[str]) -> dict[str, Path]:
    """The same documents as corpus.jsonl, corpus.parquet and txt/NNNNNN.txt under root (reused if
    present)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = {"jsonl": root / "corpus.jsonl", "parquet": root / "corpus.parquet",
             "txt": root / "txt"}
    if all(paths[f].exists() for f in formats):
        return {f: paths[f] for f in formats}
    root.mkdir(parents=True, exist_ok=True)
    paths["txt"].mkdir(exist_ok=True)
    writer = None
    if "parquet" in formats:
        writer = pq.ParquetWriter(paths["parquet"], pa.schema([("text", pa.string())]),
                                  use_content_defined_chunking=True, write_page_index=True)
    row_group, row_group_bytes = [], 0
    with open(paths["jsonl"] if "jsonl" in formats else os.devnull, "w") as jsonl:
        for i, text in enumerate(corpus_documents(megabytes)):
            jsonl.write(json.dumps({"text": text}) + "\n")
            if "txt" in formats:
                (paths["txt"] / f"{i:06d}.txt").write_text(text)
            if writer:
                row_group.append(text)
                row_group_bytes += len(text.encode())
                if row_group_bytes >= PARQUET_ROW_GROUP_BYTES:
                    writer.write_table(pa.table({"text": row_group}))  # one call, one row group
                    row_group, row_group_bytes = [], 0
    if writer:
        if row_group:
            writer.write_table(pa.table({"text": row_group}))
        writer.close()
    return {f: paths[f] for f in formats}


# --------------------------------------------------------------------------------------------------
# The recipe, run in its own process: `python bench_prepare.py --recipe INPUT TOKENIZER OUT_DIR`.
_encoding = None


def tiktoken_encoding(tokenizer: str):
    """The tiktoken Encoding both pipelines use: "gpt2", or a prepared dataset's directory."""
    return (gpt2_tokenizer() if tokenizer == "gpt2" else load_tokenizer(tokenizer)).encoding


def _recipe_init(tokenizer: str):
    global _encoding
    _encoding = tiktoken_encoding(tokenizer)


def _recipe_encode(text: str) -> np.ndarray:
    ids = [_encoding.eot_token]  # the recipe puts the separator before each document
    ids.extend(_encoding.encode_ordinary(text))
    return np.array(ids, dtype=np.uint16)


def _recipe_documents(path: Path):
    if path.is_dir():
        for file in sorted(path.glob("*.txt")):
            yield file.read_text(encoding="utf-8")
    elif path.suffix == ".jsonl":
        with open(path) as f:
            for line in f:
                yield json.loads(line)["text"]
    else:
        import pyarrow.parquet as pq

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text"]):
            yield from batch.column(0).to_pylist()


def run_recipe(path: str, tokenizer: str, out_dir: str, shard_tokens: int = 100_000_000):
    import multiprocessing

    os.makedirs(out_dir, exist_ok=True)
    buffer, filled, shard = np.empty(shard_tokens, dtype=np.uint16), 0, 0
    with multiprocessing.Pool(os.cpu_count(), initializer=_recipe_init,
                              initargs=(tokenizer,)) as pool:
        for ids in pool.imap(_recipe_encode, _recipe_documents(Path(path)), chunksize=16):
            while len(ids):
                n = min(len(ids), shard_tokens - filled)
                buffer[filled:filled + n] = ids[:n]
                filled, ids = filled + n, ids[n:]
                if filled == shard_tokens:
                    np.save(f"{out_dir}/shard_{shard:06d}.npy", buffer)
                    shard, filled = shard + 1, 0
    if filled:
        np.save(f"{out_dir}/shard_{shard:06d}.npy", buffer[:filled])


# --------------------------------------------------------------------------------------------------
def timed_process(command: list[str]) -> tuple[float, float, float]:
    """Run command; return (wall seconds, peak RSS of its largest process, peak RSS of its whole
    tree), in MiB."""
    import psutil

    start = time.perf_counter()
    proc = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    largest = tree = 0
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in (proc, *proc.children(recursive=True))]
            largest, tree = max(largest, *rss), max(tree, sum(rss))
        except psutil.Error:  # a process ended while we looked
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise UserError(f"{' '.join(command)} failed: {proc.stderr.read().decode()[-500:]}")
    return wall, largest / 2**20, tree / 2**20


def tokenizer_ceiling(corpus: Path, tokenizer: str) -> float:
    """MB/s of encode_ordinary_batch on all cores over the whole corpus, read into memory first."""
    enc = tiktoken_encoding(tokenizer)
    texts = list(_recipe_documents(corpus))
    size = sum(len(t.encode()) for t in texts)
    start = time.perf_counter()
    enc.encode_ordinary_batch(texts, num_threads=os.cpu_count())
    return size / 1e6 / (time.perf_counter() - start)


def main(argv: list[str]):
    cfg = load_config(argv, PrepareBenchConfig)
    # GPT-2's vocabulary offline, as the tests find it (a machine with a network needs nothing)
    shared_cache = Path(__file__).resolve().parent.parent / "shared" / "tiktoken_cache"
    if shared_cache.is_dir():
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(shared_cache))
    root = Path(cfg.work_dir)
    if not (Path("data/shakespeare") / "meta.json").exists():
        raise UserError("the trained vocabulary comes from data/shakespeare; run `python "
                        "prepare.py` first")
    corpora = build_corpus(root / f"{cfg.megabytes}mb", cfg.megabytes, cfg.formats.split(","))
    print("| corpus | vocabulary | pipeline | MB/s | tokens/s | peak RSS, largest process / tree "
          "(MiB) |")
    print("|---|---|---|---|---|---|")
    for fmt, corpus in corpora.items():
        for tok in cfg.tokenizers.split(","):
            tokenizer = "data/shakespeare" if tok == "bpe" else "gpt2"
            ours_dir, recipe_dir = root / "out_ours", root / "out_recipe"
            commands = {
                "prepare.py": [sys.executable, "prepare.py", f"--input={corpus}",
                               f"--tokenizer={tokenizer}",
                               f"--out_dir={ours_dir}", "--overwrite"],
                "recipe": [sys.executable, __file__, "--recipe", str(corpus), tokenizer,
                           str(recipe_dir)],
            }
            results = {name: [] for name in commands}
            for _ in range(cfg.repeats):
                for name, command in commands.items():
                    results[name].append(timed_process(command))
            meta = json.loads((ours_dir / "meta.json").read_text())
            text_mb = (meta["train_bytes"] + meta["val_bytes"]) / 1e6
            tokens = meta["train_tokens"] + meta["val_tokens"]
            for name, runs in results.items():
                wall = statistics.median(r[0] for r in runs)
                largest, tree = max(r[1] for r in runs), max(r[2] for r in runs)
                print(f"| {fmt} {cfg.megabytes} MB | {tok} | {name} | {text_mb / wall:.1f} | "
                      f"{tokens / wall:,.0f} | {largest:.0f} / {tree:.0f} |", flush=True)
            shutil.rmtree(ours_dir, ignore_errors=True)
            shutil.rmtree(recipe_dir, ignore_errors=True)
    for tok in cfg.tokenizers.split(","):
        tokenizer = "data/shakespeare" if tok == "bpe" else "gpt2"
        print(f"ceiling ({tok}): encode_ordinary_batch on {os.cpu_count()} threads, text in "
              f"memory: {tokenizer_ceiling(next(iter(corpora.values())), tokenizer):.1f} MB/s")
    if not cfg.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--recipe"]:
        run_recipe(*sys.argv[2:5])
    else:
        run_cli(main)
