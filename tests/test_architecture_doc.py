"""docs/ARCHITECTURE.md stays true to the tree: every path, name and signature it writes exists, and every module has a line.

The page states its conventions at the top; in short:
- a backticked dotted name that starts with a saeforge module (``training.run.train``, ``models.load_model``,
  or the same with ``saeforge.`` in front) must import and resolve by getattr;
- a backticked call ``name(arg, arg=..., ...)`` of such a name is a signature: the written parameter names must
  be the real ones, in order, and without ``...`` every parameter without a default must be written;
- a path ``pkg/module.py`` is relative to src/saeforge (``tests/``, ``tools/``, ``src/`` ones to the repository);
- the fenced block that starts with ``src/saeforge/`` is the tree: one line per .py file, each with a description,
  listing exactly the files under src/saeforge.
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "src" / "saeforge"
DOC = ROOT / "docs" / "ARCHITECTURE.md"
DOC_NAME = "docs/ARCHITECTURE.md"

# The top-level modules and packages of saeforge: a backticked name starting with one of these is checked.
TOP = sorted(
    p.stem if p.is_file() else p.name
    for p in PKG.iterdir()
    if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())
)
FILE_SUFFIXES = (".py", ".json", ".jsonl", ".pt", ".safetensors", ".md", ".html", ".toml", ".db", ".txt", ".parquet")

DOTTED = re.compile(r"(?:saeforge\.)?(?P<name>(?:" + "|".join(TOP) + r")(?:\.\w+)*)")
CALL = re.compile(DOTTED.pattern + r"\((?P<args>.*)\)(?:\s*->.*)?")
PATH = re.compile(r"(?<![\w/.])(?P<path>(?:src/|tests/|tools/)?[a-z_][a-z0-9_]*(?:/[a-z_][a-z0-9_]*)+\.py)\b")


def doc_text() -> str:
    return DOC.read_text()


def line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def prose(text: str) -> str:
    """The page with fenced code blocks blanked out (same length, same line numbers)."""
    return re.sub(r"^```.*?^```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text, flags=re.M | re.S)


def backticked(text: str) -> list[tuple[int, str]]:
    """(line, content) of every inline code span outside fenced blocks; spans may not cross a blank line."""
    return [(line_of(text, m.start()), m.group(1)) for m in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)*)`", prose(text))]


def tree_block(text: str) -> tuple[int, list[str]]:
    """The fenced block whose first line is ``src/saeforge/``: (line number of that line, its lines)."""
    for m in re.finditer(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S):
        lines = m.group(1).splitlines()
        if lines and lines[0].strip() == "src/saeforge/":
            return line_of(text, m.start(1)), lines
    pytest.fail(
        f"{DOC_NAME} has no tree: add a fenced block whose first line is `src/saeforge/`, "
        "then one indented line per folder and .py file"
    )


def tree_files(text: str) -> tuple[dict[str, int], list[str]]:
    """Files the tree lists (path relative to src/saeforge -> line) and problems with its lines."""
    first, lines = tree_block(text)
    files: dict[str, int] = {}
    problems: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, folder) of the open folders
    for i, line in enumerate(lines[1:], start=first + 1):
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        entry, _, description = line.strip().partition(" ")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if entry.endswith("/"):
            stack.append((indent, entry.rstrip("/")))
            continue
        path = "/".join([folder for _, folder in stack] + [entry])
        files[path] = i
        if not entry.endswith(".py"):
            problems.append(f"line {i}: `{entry}` in the tree is not a .py file or a folder (folders end with /)")
        elif not description.strip():
            problems.append(f"line {i}: `{path}` has no description: write what the module does after its name")
    return files, problems


def resolve(dotted: str):
    """Import the longest importable module prefix of saeforge.``dotted`` and getattr the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = "saeforge." + ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and not module_name.startswith(e.name) and e.name != module_name:
                raise  # a missing dependency of a real module, not a wrong name
            continue
        for i, attr in enumerate(parts[cut:], start=cut):
            if not hasattr(obj, attr):
                raise AttributeError(f"saeforge.{'.'.join(parts[:i])} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(f"no module saeforge.{parts[0]}")


def split_args(args: str) -> list[str]:
    """Split at top-level commas (not inside brackets or quotes)."""
    out, depth, quote, cur = [], 0, "", ""
    for ch in args:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(cur)
            cur = ""
            continue
        cur += ch
    if cur.strip():
        out.append(cur)
    return [a.strip() for a in out]


def written_params(args: str) -> tuple[list[str], bool]:
    """(parameter names written, whether ``...`` leaves some out)."""
    names, open_ended = [], False
    for a in split_args(args):
        if a == "...":
            open_ended = True
        elif a in ("*", "/"):
            continue
        else:
            m = re.match(r"\*{0,2}(\w+)", a)
            if m is None:
                raise ValueError(f"cannot read the parameter {a!r}")
            names.append(m.group(1))
    return names, open_ended


def signature_problem(obj, args: str) -> str | None:
    """What is wrong with the written parameters ``args`` of ``obj``, or None."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return f"has no signature to check (a {type(obj).__name__}); write it without parentheses"
    params = [p for p in sig.parameters.values() if p.name not in ("self", "cls")]
    real = [p.name for p in params]
    try:
        written, open_ended = written_params(args)
    except ValueError as e:
        return str(e)
    unknown = [n for n in written if n not in real]
    if unknown:
        return f"has no parameter(s) {unknown}; its parameters are ({', '.join(real)})"
    if written != sorted(written, key=real.index):
        return f"parameters written out of order {written}; the real order is ({', '.join(real)})"
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    missing = [n for n in required if n not in written]
    if missing and not open_ended:
        return f"leaves out the required parameter(s) {missing}: write them, or add `...`"
    return None


def test_the_tree_lists_every_module_and_only_modules_that_exist():
    files, problems = tree_files(doc_text())
    on_disk = {p.relative_to(PKG).as_posix() for p in PKG.rglob("*.py")}
    for path in sorted(on_disk - set(files)):
        problems.append(
            f"src/saeforge/{path} is not in the tree: add a line for it under its folder, saying what it does"
        )
    for path in sorted(set(files) - on_disk):
        problems.append(
            f"line {files[path]}: the tree lists `{path}`, but src/saeforge/{path} does not exist: "
            "fix the name or remove the line"
        )
    assert not problems, f"{DOC_NAME}:\n" + "\n".join(problems)


def test_every_module_path_the_page_names_exists():
    text = doc_text()
    problems = []
    for m in PATH.finditer(text):
        path = m.group("path")
        full = ROOT / path if path.split("/")[0] in ("src", "tests", "tools") else PKG / path
        if not full.is_file():
            problems.append(
                f"line {line_of(text, m.start())}: `{path}` does not exist ({full.relative_to(ROOT)}): "
                "fix the path (module paths are relative to src/saeforge/)"
            )
    assert not problems, f"{DOC_NAME}:\n" + "\n".join(problems)


def test_every_backticked_saeforge_name_resolves():
    problems = []
    checked = 0
    for line, span in backticked(doc_text()):
        span = " ".join(span.split())
        m = CALL.fullmatch(span) or DOTTED.fullmatch(span)
        if m is None or span.endswith(FILE_SUFFIXES):
            continue
        checked += 1
        try:
            resolve(m.group("name"))
        except (ImportError, AttributeError) as e:
            problems.append(
                f"line {line}: `{span}` does not resolve ({e}): rename it to what the code calls it "
                "(names are relative to saeforge: `pkg.module.Symbol`)"
            )
    assert checked > 50, f"only {checked} saeforge names found in {DOC_NAME}: is the convention still followed?"
    assert not problems, f"{DOC_NAME}:\n" + "\n".join(problems)


def test_written_signatures_match_the_code():
    problems = []
    checked = 0
    for line, span in backticked(doc_text()):
        span = " ".join(span.split())
        m = CALL.fullmatch(span)
        if m is None:
            continue
        try:
            obj = resolve(m.group("name"))
        except (ImportError, AttributeError):
            continue  # reported by test_every_backticked_saeforge_name_resolves
        checked += 1
        problem = signature_problem(obj, m.group("args"))
        if problem:
            problems.append(f"line {line}: `{span}` {problem}")
    assert checked > 30, f"only {checked} signatures found in {DOC_NAME}: is the convention still followed?"
    assert not problems, f"{DOC_NAME}:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "args, problem",
    [
        ("cfg, resume=None, evaluate=True, progress=True, lm=None", None),
        ("cfg, ...", None),
        ("cfg, lm=None", None),
        ("config, resume=None", "has no parameter(s) ['config']"),
        ("cfg, lm=None, resume=None", "out of order"),
        ("resume=None", "leaves out the required parameter(s) ['cfg']"),
    ],
)
def test_the_signature_check_tells_right_from_wrong(args, problem):
    from saeforge.training.run import train

    got = signature_problem(train, args)
    assert (got is None) if problem is None else (got is not None and problem in got), got


def test_a_wrong_name_is_caught():
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        resolve("training.run.trian")
    with pytest.raises(ModuleNotFoundError):
        resolve("trainingx.run")
    assert resolve("models.load_model") is resolve("models.loading.load_model")
