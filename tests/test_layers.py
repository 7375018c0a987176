"""The import layers hold, and the check really fails when a module imports one above it or closes a cycle."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(tree: Path) -> subprocess.CompletedProcess:
    """lint-imports over the saeforge package under ``tree``/src with the repository's contracts."""
    return subprocess.run(
        [str(LINT), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=tree,
        env={"PYTHONPATH": str(tree / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture()
def tree_copy(tmp_path):
    shutil.copytree(
        ROOT / "src" / "saeforge",
        tmp_path / "src" / "saeforge",
        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"),
    )
    return tmp_path


def test_the_tree_keeps_its_layers_and_has_no_cycles():
    out = lint(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 kept, 0 broken" in out.stdout


def plant(tree: Path, module: str, line: str) -> None:
    path = tree / "src" / Path(*module.split(".")).with_suffix(".py")
    path.write_text(path.read_text() + f"\n\ndef _planted():\n    {line}\n")


def test_an_import_from_a_layer_above_breaks_the_layers_even_inside_a_function(tree_copy):
    plant(tree_copy, "saeforge.models.layout", "from saeforge.cli import main  # models -> cli")
    out = lint(tree_copy)
    assert out.returncode == 1
    assert "Pipeline layers (cli on top, config at the bottom) BROKEN" in out.stdout
    assert "saeforge.models.layout -> saeforge.cli" in out.stdout


def test_a_cycle_between_two_modules_of_a_package_breaks_the_acyclic_contract(tree_copy):
    plant(tree_copy, "saeforge.evals.setup", "from saeforge.evals.saved import evaluate_saved  # saved imports setup")
    out = lint(tree_copy)
    assert out.returncode == 1
    assert "No import cycles between the modules of a package BROKEN" in out.stdout
    assert "No cycles are allowed in saeforge.evals" in out.stdout
