"""The docs stay true to the code: generated option tables are current, every subcommand is in the README."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_config_tables_are_current():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "readme_config.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr + "\n(run `make docs` to regenerate docs/config.md's tables)"


def test_every_subcommand_is_documented():
    from saeforge.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [name for name in sub.choices if f"saeforge {name}" not in readme]
    assert not missing, f"README does not mention: {missing}"

