"""The docs stay true to the code: generated option tables are current, every subcommand is in the README, links resolve."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_config_tables_are_current():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "readme_config.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr + "\n(run `make docs` to regenerate docs/config.md's tables)"


def test_every_subcommand_is_documented():
    from saeforge.cli import build_parser

    readme = (ROOT / "README.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    missing = [name for name in sub.choices if f"saeforge {name}" not in readme]
    assert not missing, f"README does not mention: {missing}"


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)
    }


def test_relative_links_point_at_files_and_headings():
    """Every relative Markdown link in the README and docs/ names a file (and heading) that exists."""
    bad = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            path = (page.parent / file).resolve() if file else page
            if not path.exists() or (anchor and path.suffix == ".md" and anchor not in _anchors(path)):
                bad.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not bad, f"links to missing files or headings: {bad}"
