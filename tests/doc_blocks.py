"""The ```python blocks of the docs that a test runs for real: found by their first line, ``# softalign: NAME``."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def doc_block(doc: str, name: str) -> dict:
    """Execute the block of ``docs/<doc>`` that starts with ``# softalign: <name>``; returns its namespace."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if b.startswith(f"# softalign: {name}\n")]
    assert len(blocks) == 1, f"docs/{doc} has {len(blocks)} blocks named {name!r}"
    namespace: dict = {"__name__": f"docs_{name}"}
    exec(compile(blocks[0], f"docs/{doc}:{name}", "exec"), namespace)
    return namespace
