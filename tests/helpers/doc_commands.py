"""The commands of README.md and docs/, read out of their Markdown and checked.

What is checked, and how, is written for the docs' authors in docs/README.md ("Commands in
the docs are tested"): every command is parsed by what would run it (the real CLI's parser,
``make -n``, pyproject's extras, the files it names), and the blocks marked
``<!-- doc-test: run -->`` or ``<!-- doc-test: run on a local farm -->`` are executed by
tests/deploy/test_docs.py.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib
import importlib.util
import io
import re
import shlex
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FARM",
    "PARSE",
    "RUN",
    "Block",
    "blocks",
    "check",
    "check_inline",
    "check_python",
    "commands",
    "doc_files",
    "inline_commands",
    "links",
    "slugs",
]

ROOT = Path(__file__).resolve().parents[2]
#: How a block is checked: parsed only, executed here, executed against a local farm.
PARSE, RUN, FARM = "parse", "run", "farm"
MARKS = {"<!-- doc-test: run -->": RUN, "<!-- doc-test: run on a local farm -->": FARM}
SHELLS = ("console", "sh", "shell", "bash")
#: Where ray-cluster.yaml mounts this checkout on the cluster's nodes.
NODE_CHECKOUT = "~/rayfarm/"
FENCE = re.compile(r"^(`{3,})(\S*)\s*$")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
SEPARATORS = {"&&", "||", ";", "|"}


def doc_files() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@dataclass(frozen=True)
class Block:
    """A fenced code block: where it is, its language, its text and how it is checked."""

    path: Path
    line: int
    lang: str
    text: str
    mode: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks(path: Path) -> list[Block]:
    """The fenced code blocks of ``path``, each with the mode its marker line gives it (the
    last non-blank line before the fence; no marker: parsed only)."""
    found, lines = [], path.read_text().splitlines()
    i = 0
    while i < len(lines):
        opened = FENCE.match(lines[i])
        if not opened:
            i += 1
            continue
        before = next((x.strip() for x in reversed(lines[:i]) if x.strip()), "")
        if before.startswith("<!-- doc-test") and before not in MARKS:
            raise ValueError(f"{path}:{i + 1}: unknown marker {before}")
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == opened[1])
        text = "\n".join(lines[i + 1 : end])
        found.append(Block(path, i + 1, opened[2], text, MARKS.get(before, PARSE)))
        i = end + 1
    return found


def commands(block: Block) -> list[str]:
    """The commands of a shell block: ``$ `` lines of a console block (``\\`` continues
    one on the next line), every line of a sh/bash block."""
    out: list[str] = []
    pending = ""
    for raw in block.text.splitlines():
        line = raw.strip()
        if pending:
            line = pending + " " + line
        elif block.lang == "console":
            if not line.startswith("$ "):
                continue  # output
            line = line[2:]
        elif not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        pending = ""
        out.append(line)
    return out


def inline_commands(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of the inline code spans outside code blocks that are commands of
    ``rayfarm`` or ``make``."""
    fenced = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            continue
        for span in INLINE.findall(line):
            if re.match(r"(rayfarm|make) [a-z-]", span):
                yield number, span


def _split(text: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``&&``, ``||``, ``;``, ``|``), each
    without its leading ``NAME=value`` assignments; comments dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    parts: list[list[str]] = [[]]
    for token in lexer:
        if token in SEPARATORS:
            parts.append([])
        else:
            parts[-1].append(token)
    out = []
    for argv in parts:
        while argv and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", argv[0]):
            argv = argv[1:]
        if argv:
            out.append(argv)
    return out


def check(text: str) -> list[str]:
    """Parse every command of one shell line; what is wrong with it (nothing: [])."""
    problems = []
    for argv in _split(text):
        program = Path(argv[0]).name
        checker = _CHECKERS.get(re.sub(r"[0-9.]+$", "", program))
        if checker is None:
            problems.append(f"{program}: tests/helpers/doc_commands.py cannot check it")
            continue
        problems += [f"{' '.join(argv)}: {p}" for p in checker(argv[1:])]
    return problems


# -- one checker per program -------------------------------------------------------------


def _parse(parser: argparse.ArgumentParser, args: list[str]) -> list[str]:
    """What ``parser`` says of ``args`` (argparse exits on an error, and on --help)."""
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            parser.parse_args(args)
    except SystemExit as exc:
        if exc.code:
            return [err.getvalue().strip().splitlines()[-1]]
    return []


def _rayfarm_parser() -> argparse.ArgumentParser:
    """The CLI's parser, taking options by their whole names only: an abbreviation that
    works today stops working when an option sharing its start is added."""
    from rayfarm.cli import _parser

    parser = _parser()
    todo = [parser]
    while todo:
        current = todo.pop()
        current.allow_abbrev = False
        todo += _subcommands(current).values()
    return parser


def _rayfarm(args: list[str]) -> list[str]:
    return _parse(_rayfarm_parser(), args)


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_inline(text: str) -> list[str]:
    """An inline ``rayfarm ...`` / ``make ...`` span: its subcommands and options exist
    (required arguments may be left out: prose names a command, or one option of it)."""
    argv = shlex.split(text)
    if argv[0] == "make":
        return _make(argv[1:])
    parser, options = _rayfarm_parser(), set()
    for token in argv[1:]:
        options |= {o for a in parser._actions for o in a.option_strings}
        choices = _subcommands(parser)
        if token.startswith("-"):
            if token.split("=")[0] not in options:
                return [f"{text}: no option {token}"]
        elif choices:
            if token not in choices:
                return [f"{text}: no command {token}"]
            parser = choices[token]
    return []


def _python(args: list[str]) -> list[str]:
    if args[:1] == ["-m"] and len(args) > 1:
        module, rest = args[1], args[2:]
        if module in ("rayfarm", "rayfarm.cli"):
            return _rayfarm(rest)
        if module == "pytest":
            return _pytest(rest)
        if importlib.util.find_spec(module) is None:
            return [f"no module {module}"]
        if module == "rayfarm.cluster.render_job":
            from rayfarm.cluster.render_job import _parser

            return _parse(_parser(), rest)
        return []
    return [] if args and (ROOT / args[0]).is_file() else [f"no script {args[:1]}"]


@functools.cache
def _make_target(target: str) -> str:
    done = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    return "" if done.returncode == 0 else done.stderr.strip()


def _make(args: list[str]) -> list[str]:
    targets = [a for a in args if not a.startswith("-") and "=" not in a]
    return [f"make {t}: {_make_target(t)}" for t in targets if _make_target(t)]


def _extras() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["optional-dependencies"])


def _pip(args: list[str]) -> list[str]:
    if args[:1] != ["install"]:
        return [f"pip {args[:1]}: only pip install is known"]
    problems = []
    for arg in args[1:]:
        if arg.startswith("-"):
            continue
        named = re.fullmatch(r"(rayfarm|\.)(?:\[([a-z,]+)\])?", arg)
        if named is None:
            problems.append(f"{arg}: not rayfarm or this checkout")
        elif named[2] and not set(named[2].split(",")) <= _extras():
            problems.append(f"{arg}: pyproject.toml's extras are {sorted(_extras())}")
    return problems


def _exists(path: str) -> list[str]:
    local = path.replace(NODE_CHECKOUT, "", 1) if path.startswith(NODE_CHECKOUT) else path
    return [] if (ROOT / local).exists() else [f"no file {path}"]


def _ray(args: list[str]) -> list[str]:
    if args[:2] == ["job", "submit"]:
        inner = args[args.index("--") + 1 :] if "--" in args else []
        return check(shlex.join(inner)) if inner else ["ray job submit without -- COMMAND"]
    if args[:1] in (["up"], ["down"], ["attach"], ["exec"]):
        positional = [a for a in args[1:] if not a.startswith("-")]
        problems = _exists(positional[0])
        if args[0] == "exec":
            problems += check(positional[-1])  # the command run on the head
        return problems
    return [f"ray {args[:1]}: not a command the docs use"]


def _serve(args: list[str]) -> list[str]:
    if args[:1] != ["deploy"]:
        return [f"serve {args[:1]}: only serve deploy is known"]
    return _exists(args[-1])


def _kubectl(args: list[str]) -> list[str]:
    if "-f" in args:
        return _exists(args[args.index("-f") + 1])
    return []  # other kubectl commands name nothing of this checkout


def _grpcurl(args: list[str]) -> list[str]:
    proto = (ROOT / "cluster" / "proto" / "rayfarm.proto").read_text()
    package = re.search(r"^package (\S+);", proto, re.M)[1]  # type: ignore[index]
    service, _, method = args[-1].rpartition("/")
    if service != f"{package}.RayfarmService" or f"rpc {method}(" not in proto:
        return [f"{args[-1]} is not in cluster/proto/rayfarm.proto"]
    return []


def _pytest(args: list[str]) -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]
    markers = {m.split(":")[0] for m in config["ini_options"]["markers"]}
    problems, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "-m":
            named = set(re.findall(r"[a-z_]+", rest.pop(0))) - {"not", "and", "or"}
            problems += [f"no marker {m}" for m in named - markers]
        elif not arg.startswith("-"):
            problems += _exists(arg.split("::")[0])
    return problems


def _tool(args: list[str]) -> list[str]:
    return []  # ruff, mypy, curl: present in the dev environment; their use is run or read


_CHECKERS = {
    "rayfarm": _rayfarm,
    "python": _python,
    "make": _make,
    "pip": _pip,
    "ray": _ray,
    "serve": _serve,
    "kubectl": _kubectl,
    "grpcurl": _grpcurl,
    "pytest": _pytest,
    "ruff": _tool,
    "mypy": _tool,
    "curl": _tool,
}


def check_python(block: Block) -> list[str]:
    """A Python block compiles, its imports import, and each ``rayfarm.NAME`` it uses
    exists."""
    try:
        tree = ast.parse(block.text)
    except SyntaxError as exc:
        return [f"{block.where}: {exc}"]
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            try:
                exec(compile(ast.Module([node], []), block.where, "exec"), {})
            except ImportError as exc:
                problems.append(f"{block.where}: {exc}")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "rayfarm"
            and not hasattr(importlib.import_module("rayfarm"), node.attr)
        ):
            problems.append(f"{block.where}: rayfarm.{node.attr} does not exist")
    return problems


# -- links -------------------------------------------------------------------------------


def slugs(path: Path) -> set[str]:
    """The anchors GitHub gives the headings of ``path``."""
    found = set()
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def links(path: Path) -> Iterator[tuple[str, Path, str]]:
    """(link, file it names, anchor) of each relative link in ``path``."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a URL
        name, _, anchor = target.partition("#")
        yield target, (path.parent / name) if name else path, anchor
