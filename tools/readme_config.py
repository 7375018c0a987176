"""Rewrite the option tables in docs/config.md from the config classes (`make docs`); --check only compares.

Two generated blocks, each between its markers: every `saeforge train` config field
(saeforge.cli.config_markdown) and every `saeforge index` option (saeforge.viewer.config.IndexConfig).
The prose around the markers is written by hand.
"""

import dataclasses
import re
import sys
from pathlib import Path

from saeforge.cli import config_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "config.md"


def index_markdown() -> str:
    from saeforge.viewer.config import IndexConfig

    lines = ["| option | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(IndexConfig):
        lines.append(f"| `--{f.name.replace('_', '-')}` | `{f.default!r}` | {f.metadata['help']} |")
    return "\n".join(lines)


BLOCKS = {"config-table": config_markdown, "index-table": index_markdown}


def render(text: str) -> str:
    for name, make in BLOCKS.items():
        block = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", re.S)
        if not block.search(text):
            raise SystemExit(f"{DOC} lacks the <!-- {name}:start/end --> markers")
        table = make()
        text = block.sub(lambda m, table=table: m.group(1) + table + "\n" + m.group(2), text)
    return text


if __name__ == "__main__":
    text = DOC.read_text()
    new = render(text)
    if "--check" in sys.argv:
        sys.exit(0 if new == text else f"{DOC.name}'s option tables are stale: run `make docs`")
    DOC.write_text(new)
