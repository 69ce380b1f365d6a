"""Small helpers the CLI commands share: box-drawn tables and human-readable sizes.

No third-party imports (the tables mimic comfy_table's UTF8_FULL preset that mistral.rs prints).
Set ``MISTRALRS_ASCII_TABLES=1`` (or run with a non-UTF-8 stdout) for plain ASCII borders.
"""

from __future__ import annotations

import os
import sys
import unicodedata
from collections.abc import Sequence

_UTF8 = {"tl": "┌", "tm": "┬", "tr": "┐", "ml": "├", "mm": "┼", "mr": "┤", "bl": "└", "bm": "┴", "br": "┘",
         "h": "─", "v": "│"}
_ASCII = {"tl": "+", "tm": "+", "tr": "+", "ml": "+", "mm": "+", "mr": "+", "bl": "+", "bm": "+", "br": "+",
          "h": "-", "v": "|"}


def _use_ascii() -> bool:
    if os.environ.get("MISTRALRS_ASCII_TABLES", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    return bool(encoding) and encoding not in ("utf8", "utf16", "utf32")


def display_width(text: str) -> int:
    """Terminal columns a string takes (wide/emoji characters count 2, combining marks 0)."""
    width = 0
    for ch in text:
        if unicodedata.combining(ch) or ch in ("\ufe0f", "\u200d"):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, ascii: bool | None = None) -> str:
    """A bordered table, one row per line, cells padded to the widest entry of each column."""
    b = _ASCII if (_use_ascii() if ascii is None else ascii) else _UTF8
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(display_width(row[i]) for row in cells) for i in range(len(header))]

    def line(left: str, mid: str, right: str) -> str:
        return left + mid.join(b["h"] * (w + 2) for w in widths) + right

    def row_text(row: Sequence[str]) -> str:
        parts = [f" {c}{' ' * (w - display_width(c))} " for c, w in zip(row, widths)]
        return b["v"] + b["v"].join(parts) + b["v"]

    out = [line(b["tl"], b["tm"], b["tr"]), row_text(cells[0]), line(b["ml"], b["mm"], b["mr"])]
    out.extend(row_text(r) for r in cells[1:])
    out.append(line(b["bl"], b["bm"], b["br"]))
    return "\n".join(out)


def format_size(num_bytes: float) -> str:
    """Decimal units like mistral.rs: 8.5 GB, 120.3 MB, 4.0 KB, 12 B."""
    n = float(num_bytes)
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
