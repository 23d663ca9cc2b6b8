"""Every script's options: the fields of a dataclass, set from config files and `--key=value` on the
command line.

    python train.py config/llama_1b3.py --batch_size=4 --compile=True
    python prepare.py --input=a.txt --input=notes/ --out_dir=data/mine --overwrite

A config file is plain Python that assigns some of the fields; `--key=value` values are Python
literals (a bare word such as --device=cpu is a string); they are applied in the order given, so
later ones win. A value must have its field's type, a list field (prepare.py's --input) collects
every value given, and a bool field may be given bare (--overwrite means --overwrite=True). A name
that is not a field is an error that lists the close ones.
`--help` (or `-h`) prints every field with its type, default and the comment beside it in the
source, and exits.

A mistake here, or anywhere a user can make one, is a UserError: the script prints its message as
one line and exits with status 2 (run_cli), never a traceback.
"""
import ast
import dataclasses
import difflib
import inspect
import io
import os
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix. run_cli prints its message as one line and exits with status 2.

    every_rank: the ranks of a torchrun job agreed on it (a collective told each of them) and all
    raise it at once."""

    exit_status = 2

    def __init__(self, message: str, every_rank: bool = False):
        super().__init__(message)
        self.every_rank = every_rank


def run_cli(main):
    """Run main(argv) as a script: a UserError becomes one line on stderr and exit status 2, not a
    traceback.

    Under torchrun the processes of one machine read the same options and files, so they meet the
    same mistake together: only the first of them (LOCAL_RANK 0) prints it, and every one exits with
    the error's status. Each machine that meets it says so, since machines may see different files.
    A mistake all the ranks agreed on (every_rank) is printed once, by rank 0: N machines would
    print N copies of it."""
    try:
        main(sys.argv[1:])
    except UserError as e:
        if int(os.environ.get("RANK" if e.every_rank else "LOCAL_RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_status)


def _check_type(name: str, value, annotation):
    """Reject a value whose type differs from the field's (ints are fine where floats are
    expected)."""
    allowed = typing.get_args(annotation) if isinstance(annotation,
                                                        types.UnionType) else (annotation,)
    if isinstance(value, bool) and bool not in allowed:
        ok = False  # bool is a subclass of int, but --n_layers=True is certainly a mistake
    else:
        ok = isinstance(value, allowed) or (float in allowed and isinstance(value, int))
    if not ok:
        expected = " or ".join(t.__name__ for t in allowed)
        raise UserError(f"--{name} expects {expected}, got {value!r}; fix the value")


def _parse(text: str, annotation):
    """A command-line value: the text itself for a str field (so --prompt=42 is "42"), else a Python
    literal."""
    if annotation is str:
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as --device=cpu is a string


def field_comments(cls) -> dict[str, str]:
    """Each field of the dataclass `cls` and the `# comment` at the end of its line in the source
    (or ""). A comment too long for the line goes on below it, each further line holding only a
    comment that starts in the same column. A subclass's fields (dpo.py's DPOConfig of train.py's
    TrainConfig) have the comments of the class that last defines them."""
    found = {}
    for base in reversed(cls.__mro__):
        if dataclasses.is_dataclass(base):
            found |= own_field_comments(base)
    return found


def own_field_comments(cls) -> dict[str, str]:
    """field_comments of the fields written in `cls`'s own source."""
    source = textwrap.dedent(inspect.getsource(cls))
    # The tokenizer, not a search for "#": a default such as "a#b" holds one without a comment.
    comments = {token.start[0]: (token.start[1], token.string[1:].strip(),
                                 token.line.lstrip()[0] == "#")
                for token in tokenize.generate_tokens(io.StringIO(source).readline)
                if token.type == tokenize.COMMENT}
    found = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign):
            row, text = node.end_lineno, []
            column = comments.get(row, (None,))[0]
            while row in comments and comments[row][0] == column and (not text or comments[row][2]):
                text.append(comments[row][1])
                row += 1
            found[node.target.id] = " ".join(text)
    return found


def help_text(*classes) -> str:
    """What --help prints: for each dataclass, every field as `--name: type = default  #
    comment`."""
    script = os.path.basename(sys.argv[0])
    lines = [f"usage: python {script} [config/x.py ...] [--key=value ...]"]
    for cls in classes:
        doc = ast.get_docstring(ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0])
        lines += ["", f"{cls.__name__}:" + (f" {doc.splitlines()[0]}" if doc else "")]
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            if f.name == "user_set":
                continue  # filled in by load_config, not a setting
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            big = isinstance(default, int) and not isinstance(default, bool) and default >= 10_000
            # 2_000_000 is a literal --key=value accepts too
            shown = f"{default:_}" if big else repr(default)
            kind = str(f.type) if typing.get_args(f.type) else f.type.__name__
            lines.append(f"  --{f.name}: {kind} = {shown}"
                         + (f"  # {comments[f.name]}" if comments[f.name] else ""))
    return "\n".join(lines)


def exit_if_help(argv: list[str], *classes):
    """`--help` or `-h` anywhere on the command line: print the settings of `classes` and exit with
    status 0."""
    if "--help" in argv or "-h" in argv:
        try:
            print(help_text(*classes), flush=True)
        except BrokenPipeError:  # `--help | head`: the reader stopped once it had what it wanted
            # Python flushes stdout again at exit, which would fail the same way: point it at
            # nothing.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)


def load_config(argv: list[str], cls):
    """A `cls` (a dataclass) built from `config/x.py` files and `--key=value` overrides, applied in
    the order given.

    If cls has a `user_set` field, it receives the names the user set (a tuple), so that a default
    can adapt to the machine where a value the user chose must not. `--help` prints cls's settings
    and exits (exit_if_help)."""
    exit_if_help(argv, cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "user_set"}
    values = {}

    def set_value(name, value, where):
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            hint = (f"did you mean {' or '.join(close)}?" if close
                    else f"the names are in {cls.__name__}")
            raise UserError(f"unknown config key '{name}' in {where}; {hint}")
        annotation = fields[name].type
        if typing.get_origin(annotation) is list:  # repeatable: every value given is kept, in order
            items = value if isinstance(value, list) else [value]
            for item in items:
                _check_type(name, item, typing.get_args(annotation)[0])
            values[name] = values.get(name, []) + items
            return
        _check_type(name, value, annotation)
        values[name] = value

    for arg in argv:
        if arg.startswith("--"):
            name, has_value, text = arg[2:].partition("=")
            annotation = fields[name].type if name in fields else None
            if not has_value and annotation is not bool:
                raise UserError(f"'{arg}' has no value; write it as {arg}=VALUE")
            element = (typing.get_args(annotation)[0] if typing.get_origin(annotation) is list
                       else annotation)
            set_value(name, _parse(text, element) if has_value else True, "the command line")
        else:
            if not os.path.isfile(arg):
                raise UserError(f"config file '{arg}' does not exist; pass a path such as "
                                "config/llama_1b3.py")
            scope = {}
            try:
                exec(Path(arg).read_text(), scope)
            except Exception as e:
                raise UserError(
                    f"config file '{arg}' raised {type(e).__name__}: {e}; fix the file") from None
            for name, value in scope.items():
                if not name.startswith(
                    "_") and not callable(value) and not isinstance(value, types.ModuleType):
                    set_value(name, value, arg)
    if "user_set" in {f.name for f in dataclasses.fields(cls)}:
        values["user_set"] = tuple(values)
    return cls(**values)
