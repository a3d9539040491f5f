"""A plain-text table: columns as wide as their widest cell, no dependencies."""

from __future__ import annotations

from typing import Any


def table(head: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(c) for c in head]] + [[("" if c is None else str(c)) for c in r] for r in rows]
    width = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(head))]
    lines = ["  ".join(c.ljust(width[i]) for i, c in enumerate(r)).rstrip() for r in cells]
    return "\n".join(lines)
