"""The error messages docs/troubleshooting.md shows, as patterns a real error must match word for word."""

from __future__ import annotations

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[2] / "docs" / "troubleshooting.md"


def documented(title: str) -> str:
    """The first code block after ``title`` in the troubleshooting page, on one line."""
    text = DOC.read_text()
    section = text[text.index(title):]
    block = section[section.index("```") + 3:]
    return " ".join(block[:block.index("```")].split())


def pattern(text: str) -> re.Pattern[str]:
    """``text`` as a regex: ``...`` stands for anything, ``xxh3_128:<hex>`` for any digest."""
    parts = re.split(r"(\.\.\.|xxh3_128:[0-9a-f]{32})", text)
    regex = "".join(".*" if p == "..." else r"xxh3_128:[0-9a-f]{32}" if p.startswith("xxh3_128:") else re.escape(p)
                    for p in parts)
    return re.compile(regex)
