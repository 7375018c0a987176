"""Rewrite the README's config table from the config classes (`make docs`); --check only compares."""

import re
import sys
from pathlib import Path

from saeforge.cli import config_markdown

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- config-table:start -->\n).*?(<!-- config-table:end -->)", re.S)


def render(text: str) -> str:
    if not BLOCK.search(text):
        raise SystemExit("README.md lacks the <!-- config-table:start/end --> markers")
    return BLOCK.sub(lambda m: m.group(1) + config_markdown() + "\n" + m.group(2), text)


if __name__ == "__main__":
    text = README.read_text()
    new = render(text)
    if "--check" in sys.argv:
        sys.exit(0 if new == text else "README config table is stale: run `make docs`")
    README.write_text(new)
