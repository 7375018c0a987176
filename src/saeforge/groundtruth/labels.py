"""Exact per-character labels of Python source from ``tokenize`` and ``ast``, mapped to LM tokens.

Every character of a parseable source string gets a row of binary code properties (PROPERTIES[1:]);
a prose document (a pydoc topic, id ``pydoc:...``) gets only ``prose``. An LM token takes the labels
of ONE character, by this boundary rule: the first non-whitespace character inside the token's
character span (its first character when the token is all whitespace). So a byte-level BPE token
such as ``"):"`` is labelled as its ``)`` and ``" foo"`` as its ``f``; a property of a later
character in a merged token is not seen. Bracket characters sit at the depth outside them: ``(`` and
``)`` are at depth 0 in ``f(a)``, ``a`` at depth 1.

Choices worth knowing:
- f-strings: Python 3.11's tokenize gives an f-string as one STRING token, so all of it, the
  ``{...}`` included, is ``cat_string``. (3.12 splits it; its FSTRING_* pieces are labelled string too.)
- Indentation level is the INDENT depth of the logical line, so continuation lines inside brackets
  keep their statement's level; blank and comment-only lines keep the level before them.
- ``line_start`` marks the first non-whitespace character of every physical line, lines inside
  multi-line strings included.
- ``in_def`` / ``in_class`` / ``in_import`` are the spans of the ast nodes (``def`` through the end
  of the body; decorators are not inside); ``in_decorator`` is ``@`` through the decorator's end.
"""

from __future__ import annotations

import ast
import io
import keyword
import tokenize
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from saeforge.config import UserError

CATEGORIES = ("name", "keyword", "string", "docstring", "comment", "number", "operator")
CODE_PROPERTIES = (
    *(f"cat_{c}" for c in CATEGORIES),
    "in_string",  # string or docstring, f-strings included
    *(f"depth_{d}" for d in ("0", "1", "2", "3plus")),
    *(f"indent_{d}" for d in ("0", "1", "2", "3plus")),
    "in_def",
    "in_class",
    "in_import",
    "in_decorator",
    "def_name",
    "attribute",
    "line_start",
)
PROPERTIES = ("prose", *CODE_PROPERTIES)
_P = {name: i for i, name in enumerate(PROPERTIES)}
_OPEN, _CLOSE = "([{", ")]}"
_WS = " \t\n\r\f\v"


class OffsetsError(UserError, ValueError):
    """The tokenizer gives no character offsets, so LM tokens cannot be labelled."""


class NoPythonError(UserError, ValueError):
    """The held-out documents hold no parseable Python to label."""


@dataclass
class DocLabels:
    """Character labels of one document: ``chars_PC`` bool [len(PROPERTIES), n_chars]; ``code`` False = prose."""

    chars_PC: np.ndarray
    code: bool


def prose_labels(text: str) -> DocLabels:
    chars_PC = np.zeros((len(PROPERTIES), len(text)), dtype=bool)
    chars_PC[_P["prose"]] = True
    return DocLabels(chars_PC, code=False)


def label_source(text: str) -> DocLabels | None:
    """Per-character labels of Python source, or None when ``ast`` or ``tokenize`` rejects it."""
    try:
        tree = ast.parse(text)
        toks = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (SyntaxError, ValueError, RecursionError, tokenize.TokenError, MemoryError):
        return None
    lines = text.split("\n")
    starts = np.cumsum([0] + [len(line) + 1 for line in lines])  # char offset of each physical line

    def pos(row: int, col: int) -> int:  # tokenize positions: 1-based rows, character columns
        return int(min(starts[row - 1] + col, len(text)))

    def ast_pos(row: int, col_bytes: int) -> int:  # ast columns count UTF-8 bytes
        line = lines[row - 1] if row - 1 < len(lines) else ""
        return pos(row, len(line.encode()[:col_bytes].decode(errors="ignore")))

    n = len(text)
    out = np.zeros((len(PROPERTIES), n), dtype=bool)
    docstrings = _docstring_starts(tree)
    depth = np.zeros(n, dtype=np.int64)
    level = np.zeros(n, dtype=np.int64)
    d = lvl = prev_end = 0
    after_def = False
    for tok in toks:
        a, b = pos(*tok.start), pos(*tok.end)
        depth[prev_end:a] = d
        if tok.type == tokenize.INDENT:
            lvl += 1
            level[a:] = lvl
        elif tok.type == tokenize.DEDENT:
            lvl -= 1
            level[pos(tok.start[0], 0) :] = lvl
        if tok.type == tokenize.OP and tok.string in _OPEN:
            depth[a:b] = d
            d += 1
        elif tok.type == tokenize.OP and tok.string in _CLOSE:
            d = max(d - 1, 0)
            depth[a:b] = d
        else:
            depth[a:b] = d
        prev_end = max(prev_end, b)
        cat = _category(tok, docstrings)
        if cat is not None:
            out[_P[f"cat_{cat}"], a:b] = True
        if tok.type == tokenize.NAME and after_def:
            out[_P["def_name"], a:b] = True
        if tok.type not in (tokenize.NL, tokenize.COMMENT):
            after_def = tok.type == tokenize.NAME and tok.string == "def"
    depth[prev_end:] = d
    out[_P["in_string"]] = out[_P["cat_string"]] | out[_P["cat_docstring"]]
    for i, name in enumerate(("0", "1", "2", "3plus")):
        out[_P[f"depth_{name}"]] = np.minimum(depth, 3) == i
        out[_P[f"indent_{name}"]] = np.minimum(level, 3) == i
    for node in ast.walk(tree):
        span = None
        if hasattr(node, "end_lineno") and node.end_lineno is not None:
            span = ast_pos(node.lineno, node.col_offset), ast_pos(node.end_lineno, node.end_col_offset)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[_P["in_def"], span[0] : span[1]] = True
        elif isinstance(node, ast.ClassDef):
            out[_P["in_class"], span[0] : span[1]] = True
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out[_P["in_import"], span[0] : span[1]] = True
        elif isinstance(node, ast.Attribute):
            out[_P["attribute"], max(span[1] - len(node.attr), 0) : span[1]] = True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for dec in node.decorator_list:
                a, b = ast_pos(dec.lineno, dec.col_offset), ast_pos(dec.end_lineno, dec.end_col_offset)
                at = text.rfind("@", 0, a)  # the '@' before the expression (whitespace may sit between)
                out[_P["in_decorator"], (at if at >= 0 else a) : b] = True
    for start in starts[:-1]:
        j = _first_non_space(text, int(start))
        if j is not None:
            out[_P["line_start"], j] = True
    return DocLabels(out, code=True)


def _first_non_space(text: str, start: int) -> int | None:
    j = start
    while j < len(text) and text[j] in " \t\f\v\r":
        j += 1
    return j if j < len(text) and text[j] != "\n" else None


def _docstring_starts(tree: ast.AST) -> set[tuple[int, int]]:
    """(line, byte column) of every docstring: a string constant opening a module, class or function body."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                found.add((first.value.lineno, first.value.col_offset))
    return found


def _category(tok: tokenize.TokenInfo, docstrings: set[tuple[int, int]]) -> str | None:
    if tok.type == tokenize.NAME:
        return "keyword" if keyword.iskeyword(tok.string) else "name"
    if tok.type == tokenize.STRING or tok.type in _FSTRING_TYPES:
        row, col = tok.start
        col_bytes = len(tok.line[:col].encode())
        return "docstring" if (row, col_bytes) in docstrings else "string"
    if tok.type == tokenize.COMMENT:
        return "comment"
    if tok.type == tokenize.NUMBER:
        return "number"
    if tok.type == tokenize.OP:
        return "operator"
    return None


_FSTRING_TYPES = {
    getattr(tokenize, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(tokenize, n)
}


def document_labels(doc_id: str, text: str) -> DocLabels | None:
    """Labels of a corpus document: pydoc topics are prose, other documents Python (None: does not parse)."""
    if doc_id.startswith("pydoc:"):
        return prose_labels(text)
    return label_source(text)


def check_offsets(tokenizer: object, model_name: str = "") -> None:
    """Raise OffsetsError unless ``tokenizer`` returns character offsets (fast tokenizers do).

    Asked by trying: a Python ("slow") tokenizer of transformers 5 ignores return_offsets_mapping silently.
    """
    try:
        has = "offset_mapping" in tokenizer("x = 1", add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        has = False
    if not has:
        raise OffsetsError(
            f"the tokenizer of {model_name or 'this model'} ({type(tokenizer).__name__}) is a slow tokenizer with no "
            "character offsets, which ground-truth labels need. Use a model folder that has a tokenizer.json "
            "(a fast tokenizer), e.g. save one with AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(DIR)."
        )


def token_labels(labels: DocLabels, offsets: Sequence[tuple[int, int]], text: str) -> np.ndarray:
    """bool [n_tokens, len(PROPERTIES)]: each token's labels by the boundary rule in the module docstring."""
    n = len(text)
    if not len(offsets):
        return np.zeros((0, len(PROPERTIES)), dtype=bool)
    # next_ns[i] = first index >= i whose character is not whitespace (n when none)
    is_ns = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) if n else np.zeros(0, np.uint32)
    ws = np.isin(is_ns, np.frombuffer(_WS.encode("utf-32-le"), dtype=np.uint32))
    idx = np.where(~ws, np.arange(n), n)
    next_ns = np.minimum.accumulate(idx[::-1])[::-1] if n else idx
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    s = np.clip(off[:, 0], 0, max(n - 1, 0))
    e = off[:, 1]
    first = next_ns[s] if n else s
    char = np.where(first < e, first, s)
    if not n:
        return np.zeros((len(off), len(PROPERTIES)), dtype=bool)
    return labels.chars_PC[:, char].T.copy()
