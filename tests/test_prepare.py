"""prepare.py: raw text -> tokenizer + token shards + meta.json, and every way a user can get that
wrong."""
import hashlib
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken.load
from helpers import ROOT

import prepare
from configurator import UserError
from tokenizer import gpt2_tokenizer, load_tokenizer, read_ranks

UNICODE_SAMPLES = [
    "Hello, world!",
    "日本語のテキストと中文文本，还有한국어 문장。",
    "emoji 🙂🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin tone 👍🏽",
    "combining marks: e\u0301 a\u0308 n\u0303 \u0915\u094d\u0937 Z\u0351\u0358a\u0315l\u0360go",
    "odd  whitespace:\t\ttabs\r\nCRLF\u00a0nbsp\u2028line-sep\u3000ideographic"
    "\u200bzero-width\n\n\n",
    "   leading and trailing   ",
    "numbers 1234567890 and 3.14159, symbols <>{}[]\\|~`^",
    "a literal <|endoftext|> inside a text is just characters",
    "\x00control\x07chars\x7f",
    "",
]


@pytest.fixture(scope="module")
def plays() -> list[str]:
    return list(prepare.shakespeare_documents())


def build(out_dir: Path, *options: str) -> dict:
    """Run prepare.main into out_dir and return its meta.json."""
    prepare.main([f"--out_dir={out_dir}", *options])
    return json.loads((out_dir / "meta.json").read_text())


def documents_in(out_dir: Path, split: str) -> list[str]:
    """The documents of one split, decoded from its shards (they are separated by <|endoftext|>)."""
    tokenizer = load_tokenizer(out_dir)
    ids = np.concatenate([np.load(path) for path in sorted(out_dir.glob(f"{split}_*.npy"))])
    assert ids[
        -1] == tokenizer.eot_id, "every document, the last one included, ends with <|endoftext|>"
    ends = np.flatnonzero(ids == tokenizer.eot_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tokenizer.decode(ids[start:end]) for start, end in zip(starts, ends, strict=True)]


def write_jsonl(path: Path, texts: list[str], field: str = "text"):
    path.write_text("".join(json.dumps({field: text, "id": i}) + "\n" for i,
                            text in enumerate(texts)))


# --------------------------------------------------------------------------------------------------
# The default corpus


def test_shakespeare_becomes_plain_play_text(plays):
    assert len(plays) == 38
    text = "".join(plays)
    for markup in ("**", "_", "#", "\\"):
        assert markup not in text
    assert plays[0].startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I. Athens. The palace "
                               "of THESEUS.\n")
    assert "\nTHESEUS:\nNow, fair Hippolyta, our nuptial hour\nDraws on apace;" in plays[0]
    hamlet = next(play for play in plays if play.startswith("Hamlet"))
    assert re.search(r"^HAMLET:\nTo be, or not to be", hamlet, re.MULTILINE)
    assert len(re.findall(r"^[A-Z][A-Za-z' ]+:$", text, re.MULTILINE)) > 25_000  # one per speech


def test_default_dataset_layout(shakespeare_dir, monkeypatch):
    meta = json.loads((shakespeare_dir / "meta.json").read_text())
    assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 8192 and meta["dtype"] == "uint16"
    # <|endoftext|>, then conversation.py's chat tokens, at the end of the 8192 ids
    assert meta["special_tokens"] == {"<|endoftext|>": 8187, "<|system|>": 8188, "<|user|>": 8189,
                                      "<|assistant|>": 8190, "<|end|>": 8191}
    assert meta["train_bytes"] + meta["val_bytes"] == sum(len(p.encode())
                                                          for p in prepare.shakespeare_documents())
    # cut moved to a line end
    assert 0.0999 < meta["val_bytes"] / (meta["train_bytes"] + meta["val_bytes"]) <= 0.1
    tokenizer = load_tokenizer(shakespeare_dir)
    assert (tokenizer.name, tokenizer.vocab_size, tokenizer.eot_id) == ("bpe", 8192, 8187)
    # tiktoken's own loader reads the rank file (caching off, so the shared cache is left alone)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    ranks = tiktoken.load.load_tiktoken_bpe(str(shakespeare_dir / "tokenizer.tiktoken"))
    assert sorted(ranks.values()) == list(range(8187))
    assert all(tokenizer.encoding.decode_single_token_bytes(rank) == token for token,
               rank in ranks.items())


@pytest.mark.parametrize("which", ["bpe", "gpt2"])
def test_decode_inverts_encode_on_any_unicode(which, shakespeare_dir):
    tokenizer = load_tokenizer(shakespeare_dir) if which == "bpe" else gpt2_tokenizer()
    for text in UNICODE_SAMPLES:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert [tokenizer.decode(ids)
            for ids in tokenizer.encode_batch(UNICODE_SAMPLES)] == UNICODE_SAMPLES
    assert tokenizer.eot_id not in tokenizer.encode(
        "<|endoftext|>"), "only prepare.py inserts the separator"


# --------------------------------------------------------------------------------------------------
# Training the BPE, splitting, sharding


@pytest.mark.parametrize("vocab_size", [300, 600])
def test_bpe_has_exactly_the_requested_vocabulary(vocab_size, plays, tmp_path):
    (tmp_path / "plays.txt").write_text(plays[0])
    meta = build(tmp_path / "data", f"--input={tmp_path / 'plays.txt'}",
                 f"--vocab_size={vocab_size}")
    tokenizer = load_tokenizer(tmp_path / "data")
    assert meta["vocab_size"] == tokenizer.vocab_size == vocab_size
    assert list(meta["special_tokens"].values()) == list(range(vocab_size - 5, vocab_size))
    assert len(read_ranks(tmp_path / "data" / "tokenizer.tiktoken")) == vocab_size - 5
    # no text encodes to a chat token: the highest id in the shards is <|endoftext|>
    assert max(np.load(path).max() for path in (tmp_path / "data").glob("*.npy")) == vocab_size - 5


def test_validation_is_the_final_fraction_cut_at_a_line_and_unseen_by_the_bpe(plays, tmp_path):
    # words frequent only in the final fifth: a BPE that had seen validation text would have merged
    # them
    texts = [plays[0], plays[1], plays[2] + "\n".join(["zyzzyva quokka"] * 3000)]
    write_jsonl(tmp_path / "corpus.jsonl", texts)
    meta = build(tmp_path / "data", f"--input={tmp_path / 'corpus.jsonl'}", "--vocab_size=500",
                 "--val_fraction=0.2")
    train, val = documents_in(tmp_path / "data", "train"), documents_in(tmp_path / "data", "val")
    # nothing lost, nothing duplicated: the straddling document is cut in two at a line break
    assert (len(train), len(val)) == (3, 1)
    assert train[:2] == texts[:2] and train[2] + val[0] == texts[2] and train[2].endswith("\n")
    total = sum(len(t.encode()) for t in texts)
    assert (meta["train_bytes"], meta["val_bytes"]) == (len("".join(train).encode()),
                                                        len(val[0].encode()))
    # off by at most the rest of one short line
    assert 0.2 - 15 / total < meta["val_bytes"] / total <= 0.2
    # 3 if the BPE had seen it
    assert len(load_tokenizer(tmp_path / "data").encode(" zyzzyva quokka")) > 8


def test_shards_have_the_requested_size_and_meta_counts_them(plays, tmp_path):
    (tmp_path / "a.txt").write_text(plays[0])
    meta = build(tmp_path / "data", f"--input={tmp_path / 'a.txt'}", "--vocab_size=400",
                 "--shard_tokens=5_000")
    files = sorted(p.name for p in (tmp_path / "data").glob("*.npy"))
    assert files == sorted(
        meta["shards"]) and files[0] == "train_000000.npy" and "val_000000.npy" in files
    arrays = {name: np.load(tmp_path / "data" / name) for name in files}
    assert {name: len(array) for name, array in arrays.items()} == meta["shards"]
    assert all(array.dtype == np.uint16 for array in arrays.values())
    for split in ("train", "val"):
        # in shard order
        sizes = [len(array) for name, array in arrays.items() if name.startswith(split)]
        assert len(sizes) >= 2 and all(size == 5_000
                                       for size in sizes[:-1]) and 0 < sizes[-1] <= 5_000
        assert sum(sizes) == meta[f"{split}_tokens"]


# --------------------------------------------------------------------------------------------------
# Other inputs and tokenizers


def test_a_directory_of_txt_md_jsonl_and_parquet(shakespeare_dir, tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "nested").mkdir(parents=True)
    (corpus / "a.txt").write_text("First file.\nIt has two lines.\n")
    (corpus / "b.md").write_text("# A markdown file\n\nkept as it is\n")
    write_jsonl(corpus / "nested" / "c.jsonl", ["json one", "", "json two ✓"], field="body")
    table = pa.table({"body": ["parquet row 1", None, "parquet row 2 — 東京"], "n": [1, 2, 3]})
    pq.write_table(table, corpus / "nested" / "d.parquet")
    (corpus / "notes.csv").write_text("ignored,because,csv\n")
    (corpus / ".hidden.txt").write_text("ignored because hidden\n")
    build(tmp_path / "data", f"--input={corpus}", f"--tokenizer={shakespeare_dir}",
          "--text_field=body",
          "--val_fraction=0.2")
    documents = documents_in(tmp_path / "data", "train") + documents_in(tmp_path / "data", "val")
    assert "".join(documents) == ("First file.\nIt has two lines.\n# A markdown file\n\nkept as it "
                                  "is\njson onejson two ✓parquet row 1parquet row 2 — 東京")
    assert len(documents) == 6  # empty and missing texts are skipped
    reused = (tmp_path / "data" / "tokenizer.tiktoken").read_bytes()
    assert reused == (shakespeare_dir / "tokenizer.tiktoken").read_bytes()


def test_gpt2_vocabulary(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", ["Hello world\n" * 20, "Hello again\n" * 20])
    meta = build(tmp_path / "data", f"--input={tmp_path / 'c.jsonl'}", "--tokenizer=gpt2")
    assert (meta["tokenizer"], meta["vocab_size"], meta["dtype"]) == ("gpt2", 50261, "uint16")
    assert meta["special_tokens"] == {"<|endoftext|>": 50256, "<|system|>": 50257,
                                      "<|user|>": 50258, "<|assistant|>": 50259, "<|end|>": 50260}
    assert not (tmp_path / "data" / "tokenizer.tiktoken").exists()
    tokenizer = load_tokenizer(tmp_path / "data")
    assert tokenizer.name == "gpt2" and tokenizer.encode("Hello world") == [15496, 995]
    assert np.load(tmp_path / "data" / "train_000000.npy")[:2].tolist() == [15496, 995]


def test_hf_streaming_on_local_files(shakespeare_dir, tmp_path):
    pytest.importorskip("datasets")
    texts = [f"document {i}\nwith a second line" for i in range(20)]
    (tmp_path / "jsonl").mkdir()
    write_jsonl(tmp_path / "jsonl" / "part.jsonl", texts)
    meta = build(tmp_path / "data", f"--hf_dataset={tmp_path / 'jsonl'}",
                 f"--tokenizer={shakespeare_dir}",
                 "--val_fraction=0.25")
    # a stream's length is unknown, so every 4th document (for val_fraction 0.25) is validation
    assert documents_in(tmp_path / "data", "val") == texts[3::4]
    assert documents_in(tmp_path / "data", "train") == [t for i,
                                                        t in enumerate(texts) if i % 4 != 3]
    assert meta["source"] == str(tmp_path / "jsonl")
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.table({"content": texts}), tmp_path / "parquet" / "part.parquet")
    assert list(prepare.hf_documents(str(tmp_path / "parquet"), "", "content")) == texts


def fake_stream(monkeypatch, texts: list[str]):
    """datasets.load_dataset streaming `texts` as rows, afresh for each pass, as the Hub would."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config, split,
                        streaming: ({"text": t} for t in texts))


def test_a_stream_holds_out_val_tokens_not_a_fraction_of_itself(
        shakespeare_dir, tmp_path, monkeypatch):
    texts = [f"streamed document {i}:" + " words" * (i % 7) for i in range(400)]
    fake_stream(monkeypatch, texts)
    meta = build(tmp_path / "data", "--hf_dataset=HuggingFaceFW/fineweb-edu",
                 f"--tokenizer={shakespeare_dir}",
                 "--val_fraction=0.25", "--val_tokens=300")
    # every 4th document from the start is validation until the split holds 300 tokens; the rest of
    # the stream trains
    tokenizer = load_tokenizer(shakespeare_dir)
    held, val = 0, []
    for text in texts[3::4]:
        if held >= 300:
            break
        val.append(text)
        held += len(tokenizer.encode(text)) + 1  # and its <|endoftext|>
    assert 300 <= meta["val_tokens"] == held < 300 + 20 and len(val) < len(texts[3::4]) / 2
    assert documents_in(tmp_path / "data", "val") == val
    assert documents_in(tmp_path / "data", "train") == [t for t in texts if t not in val]


def test_the_bpe_never_sees_a_document_a_stream_could_hold_out(tmp_path, monkeypatch):
    texts = [f"streamed document {i}: " + "some words and more " * (i % 5 + 1) for i in range(200)]
    fake_stream(monkeypatch, texts)
    seen, train_bpe = [], prepare.train_bpe

    def recording(texts, vocab_size):
        seen.extend(texts)
        return train_bpe(seen, vocab_size)

    monkeypatch.setattr(prepare, "train_bpe", recording)
    build(tmp_path / "data", "--hf_dataset=HuggingFaceFW/fineweb-edu", "--vocab_size=300",
          "--val_tokens=50")
    # not even those that ended up training
    assert seen == [t for i, t in enumerate(texts) if i % 10 != 9]
    assert len(documents_in(tmp_path / "data", "val")) < len(texts[9::10])


def test_hf_without_the_package_is_one_sentence(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    with pytest.raises(UserError, match="pip install datasets"):
        list(prepare.hf_documents("HuggingFaceFW/fineweb-edu", "sample-10BT", "text"))


def test_hf_without_a_network_is_one_sentence(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):  # what load_dataset raises, after its retries, with no network
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub "
                              "(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="Couldn't reach .* check the name, --hf_config and the "
                       "network connection"):
        list(prepare.hf_documents("HuggingFaceFW/fineweb-edu", "sample-10BT", "text"))


def test_overwrite_replaces_only_a_finished_dataset(shakespeare_dir, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", ["one line\n" * 50, "other line\n" * 50])
    meta = build(tmp_path / "data", f"--input={tmp_path / 'c.jsonl'}",
                 f"--tokenizer={shakespeare_dir}")
    (tmp_path / "tiny.txt").write_text("no line break to cut at")
    with pytest.raises(UserError, match="validation"):
        build(tmp_path / "data", f"--input={tmp_path / 'tiny.txt'}",
              f"--tokenizer={shakespeare_dir}", "--overwrite")
    assert json.loads((tmp_path / "data" / "meta.json").read_text()) == meta
    # no temporary dirs left (the lock file stays: see test_faults.py)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".data.lock", "c.jsonl", "data", "tiny.txt"]
    meta = build(tmp_path / "data", f"--input={tmp_path / 'c.jsonl'}", "--tokenizer=gpt2",
                 "--overwrite=True")
    assert meta["tokenizer"] == "gpt2" and not (tmp_path / "data" / "tokenizer.tiktoken").exists()


# --------------------------------------------------------------------------------------------------
# Mistakes a user can make: one sentence, exit status 2


@pytest.mark.parametrize("argv, message", [
    (["--out_dir=x", "--input=nowhere.txt"], "does not exist"),
    (["--out_dir=x", "--input=empty_dir"], "holds no .txt, .md, .jsonl or .parquet files"),
    (["--out_dir=x", "--input=only.csv"], "is not a .txt, .md, .jsonl or .parquet file"),
    (["--out_dir=x", "--input=blank.txt", "--input=blank.jsonl"], "the corpus is empty"),
    (["--out_dir=x", "--input=latin1.txt"], "latin1.txt is not UTF-8"),
    (["--out_dir=x", "--input=broken.parquet"], "broken.parquet is not a readable parquet file"),
    (["--out_dir=x", "--input=good.txt", "--vocab_size=256"], "at least 261"),
    (["--out_dir=x", "--input=good.txt", "--vocab_size=5000"], "lower --vocab_size"),
    (["--out_dir=x", "--input=tiny.txt", "--tokenizer=gpt2"],
     "too small to hold out a validation split"),
    (["--out_dir=x", "--input=good.txt", "--text_field=body", "--input=good.jsonl"],
     "pass --text_field"),
    (["--out_dir=existing", "--input=good.txt"], "already exists; pass --overwrite"),
    (["--input=good.txt"], "pass --out_dir"),
    (["--vocab_sise=300"],
     "unknown config key 'vocab_sise' in the command line; did you mean vocab_size?"),
    (["--vocab_size"], "'--vocab_size' has no value"),
    (["--vocab_size=big"], "--vocab_size expects int, got 'big'"),
    (["--val_fraction=1.5"], "between 0 and 1"),
    (["--out_dir=x", "--input=good.txt", "--val_tokens=1000"],
     "local text is split by --val_fraction"),
    (["--val_tokens=0"], "--val_tokens must be a positive number"),
    (["--out_dir=x", "--input=good.txt", "--tokenizer=not_a_dataset"], "`python prepare.py`"),
])
def test_bad_input_is_a_user_error(argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "existing").mkdir()
    (tmp_path / "only.csv").write_text("a,b\n")
    (tmp_path / "blank.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    (tmp_path / "latin1.txt").write_bytes("café crème\n".encode("latin-1"))
    (tmp_path / "good.txt").write_text("a small but valid corpus\n" * 40)
    (tmp_path / "good.jsonl").write_text('{"text": "no body field"}\n')
    (tmp_path / "tiny.txt").write_text("no line break to cut at")
    (tmp_path / "broken.parquet").write_text("not parquet at all")
    with pytest.raises(UserError, match=re.escape(message)):
        prepare.main(argv)
    assert not (tmp_path / "x").exists()


def test_load_tokenizer_names_the_fix(tmp_path):
    with pytest.raises(UserError, match=re.escape("build one with `python prepare.py`")):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("argv", [["--vocab_sise=300"], ["--out_dir={tmp}", "--input={tmp}"]])
def test_cli_exits_2_with_one_line(argv, tmp_path):
    argv = [arg.format(tmp=tmp_path) for arg in argv]
    result = subprocess.run([sys.executable, str(ROOT / "prepare.py"), *argv], capture_output=True,
                            text=True,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1


# --------------------------------------------------------------------------------------------------
# The encoding pipeline is pure speed: the same input and flags give the same files, byte for byte


def write_mixed_corpus(root: Path):
    """A fixed, seeded corpus in every format: one jsonl, one parquet, a directory of .txt and .md
    files."""
    rng = random.Random(1234)
    words = ["the", "king", "def", "return", "x", "=", "()", "{", "}", "东京", "🙂", "naïve",
             "e\u0301", "\t", "\n",
             "  ", "1234567", "3.14", "<|endoftext|>", "Hamlet:", "print(x)", "\r\n", "über", "—"]
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 400)))
                 for _ in range(300)]
    documents += UNICODE_SAMPLES
    (root / "txt").mkdir(parents=True)
    for i, text in enumerate(documents[:100]):
        (root / "txt" / f"{i:03d}.{'md' if i % 3 else 'txt'}").write_text(text, encoding="utf-8",
                                                                          newline="")
    write_jsonl(root / "b.jsonl", documents[100:220])
    pq.write_table(pa.table({"text": documents[220:]}), root / "c.parquet")


# One sha256 over the names and bytes of every file prepare.py wrote for this corpus (shards,
# tokenizer.tiktoken, meta.json). The pipeline as it was before it was made faster (commit a46bbaf)
# gave the first pins; reserving the chat tokens (which changes the vocabulary, so every file)
# gave these, which pin the output against any change that should leave it alone.
BEFORE = {"bpe": "95c5d8cc560e9f2c", "shakespeare": "870f37a944adf745", "gpt2": "452655b75da124b8"}


def digest(out_dir: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(out_dir.iterdir()):
        sha.update(path.name.encode() + b"\0" + path.read_bytes())
    return sha.hexdigest()[:16]


@pytest.mark.parametrize("tokenizer", ["bpe", "shakespeare", "gpt2"])
def test_output_is_byte_identical_to_the_previous_pipeline(tokenizer, shakespeare_dir, tmp_path):
    write_mixed_corpus(tmp_path)
    flags = {"bpe": ["--vocab_size=400"], "shakespeare": [f"--tokenizer={shakespeare_dir}"],
             "gpt2": ["--tokenizer=gpt2"]}[tokenizer]
    # Relative paths, so meta.json's "source" does not depend on where the test runs.
    subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--input=txt", "--input=b.jsonl",
                    "--input=c.parquet",
                    "--out_dir=out", "--shard_tokens=25000", *flags], cwd=tmp_path, check=True,
                   capture_output=True)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert sum(name.startswith("train_")
               for name in meta["shards"]) >= 3 and "val_000000.npy" in meta["shards"]
    assert digest(tmp_path / "out") == BEFORE[tokenizer]
