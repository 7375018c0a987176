"""docs/python.md stays true: its imports import, its calls fit the functions' signatures, and what it names has
a docstring of its own.

The blocks are not run (they train on the bundled model); docs/tutorial.ipynb is run, by test_notebook.py.
A call is checked when what it calls is a name the block imported, or such a call with constant arguments
(``config_class("topk")(d_sae=...)``): its positional and keyword arguments must bind to the signature.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "python.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def check_block(code: str) -> list[str]:
    """Problems in one block: imports that fail, calls whose arguments do not bind, names without a docstring."""
    tree = ast.parse(code)
    ns: dict = {}
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            try:
                exec(compile(ast.Module([node], []), "<python.md>", "exec"), ns)
            except ImportError as e:
                problems.append(f"line {node.lineno}: {e}")
                continue
            for alias in node.names:
                obj = ns.get(alias.asname or alias.name)
                if getattr(obj, "__module__", "").startswith("saeforge") and not own_doc(obj):
                    problems.append(f"{alias.name} has no docstring")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(isinstance(a, ast.Starred) for a in node.args):
            continue
        target = callee(node.func, ns)
        if target is None:
            continue
        try:
            inspect.signature(target).bind_partial(*[None] * len(node.args), **{k.arg: None for k in node.keywords})
        except TypeError as e:
            problems.append(f"line {node.lineno}: {ast.unparse(node.func)}(...): {e}")
    return problems


def callee(func: ast.expr, ns: dict):
    """The object a call calls, when the block's imports alone say what it is; else None."""
    if isinstance(func, ast.Name):
        return ns.get(func.id)
    if isinstance(func, ast.Call) and isinstance(func.func, ast.Name) and func.func.id in ns:
        if all(isinstance(a, ast.Constant) for a in func.args) and not func.keywords:
            return ns[func.func.id](*[a.value for a in func.args])
    return None


def own_doc(obj) -> bool:
    doc = inspect.getdoc(obj) or ""
    # a dataclass without a docstring gets "Name(field: type, ...)" from dataclasses: not documentation
    return bool(doc) and not doc.startswith(f"{getattr(obj, '__name__', '')}(")


def test_the_page_is_linked_and_has_examples():
    assert "(docs/python.md)" in (ROOT / "README.md").read_text()
    assert len(python_blocks(DOC.read_text())) >= 6


@pytest.mark.parametrize("i", range(len(python_blocks(DOC.read_text()))))
def test_every_block_imports_and_calls_what_exists(i):
    block = python_blocks(DOC.read_text())[i]
    assert check_block(block) == []


def test_the_checker_catches_a_wrong_name_a_wrong_argument_and_a_missing_docstring():
    assert check_block("from saeforge.models import load_model\nlm = load_model('x', dtype='float32')\n") == []
    assert "cannot import name 'load_modle'" in check_block("from saeforge.models import load_modle\n")[0]
    (bad_kw,) = check_block("from saeforge.models import load_model\nload_model('x', dtyp='f')\n")
    assert "dtyp" in bad_kw
    (too_many,) = check_block(
        "from saeforge.saes.registry import config_class\nconfig_class('topk')(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13)\n"
    )
    assert "too many positional" in too_many
    # training.run.hook_points has a docstring; a dataclass whose doc is only its generated signature has none
    assert check_block("from saeforge.training.run import hook_points\n") == []
    assert not own_doc(type("Bare", (), {"__doc__": "Bare(a: int)"}))
