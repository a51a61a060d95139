"""Formatting shared by peerctl's subcommands: consoles, numbers, ages, states, JSON output.

Consoles are created per call rather than at import so that output follows whatever
``sys.stdout`` is at that moment (click's test runner swaps it). They have rich markup turned
off: task messages, reasons and names come from the daemon and from other peers, and a
``[...]`` in them must print as it is; styling is applied with ``Text`` objects instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

STATE_STYLES = {
    "pending": "yellow",
    "bidding": "yellow",
    "running": "cyan",
    "aggregating": "magenta",
    "done": "green",
    "failed": "red",
    "cancelled": "dim",
}


#: Width of output that is not a terminal (a pipe, a file, a test): rich's default of 80 columns
#: split peer IDs and cut reasons; a line is as long as its content, never padded to this.
PIPE_WIDTH = 1000


def _width(file: TextIO) -> int | None:
    """None (rich decides: the terminal's width, or $COLUMNS) unless ``file`` is not a terminal."""
    if os.environ.get("COLUMNS"):
        return None
    try:
        return None if file.isatty() else PIPE_WIDTH
    except (AttributeError, ValueError):
        return PIPE_WIDTH


def stdout() -> Console:
    return Console(file=sys.stdout, highlight=False, markup=False, width=_width(sys.stdout))


def stderr() -> Console:
    return Console(file=sys.stderr, highlight=False, markup=False, width=_width(sys.stderr))


def emit_json(obj: Any) -> None:
    """Machine output: indented JSON on stdout (``--json``)."""
    sys.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def emit_json_line(obj: Any) -> None:
    """One JSON document per line, for streams (``watch --json``)."""
    sys.stdout.write(json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def emit(result: Any, as_json: bool, render: Callable[[Any, Console], None]) -> None:
    if as_json:
        emit_json(result)
    else:
        render(result, stdout())


# --- values -------------------------------------------------------------------------------------


def short_peer(peer_id: str | None, *, is_self: bool = False) -> str:
    """``12D3KooW…x7Qa9c``: the common prefix tells nothing, the tail tells peers apart."""
    if not peer_id:
        return "-"
    text = peer_id if len(peer_id) <= 20 else f"{peer_id[:8]}…{peer_id[-6:]}"
    return text + " (self)" if is_self else text


def num(value: Any, digits: int = 2) -> str:
    """A number for a table cell; ``null`` is an unbounded value (docs/rpc.md) and prints as ∞."""
    if value is None:
        return "∞"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, float) and math.isinf(value):
        return "∞" if value > 0 else "-∞"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "-"
    if value.is_integer() and abs(value) < 1e15:
        # A whole number is shown whole (10000, not 10,000.0000): metrics such as a sample
        # count arrive as JSON floats. No thousands separator: a number pastes as a number.
        return str(int(value))
    return f"{value:.{digits}f}"


def megabytes(mb: Any) -> str:
    if not isinstance(mb, int | float) or isinstance(mb, bool):
        return "-"
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def size(nbytes: Any) -> str:
    if not isinstance(nbytes, int):
        return "-"
    value = float(nbytes)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{nbytes} B"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or math.isnan(seconds):
        return "-"
    s = int(max(seconds, 0))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def timestamp(at: Any, *, now: float | None = None) -> str:
    """Unix seconds as local time; the date is shown only when it is not today."""
    if not isinstance(at, int | float) or isinstance(at, bool) or not math.isfinite(at):
        return "-"
    now = time.time() if now is None else now
    lt = time.localtime(at)
    same_day = time.localtime(now)[:3] == lt[:3]
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", lt)


def ago(at: Any, *, now: float | None = None) -> str:
    if not isinstance(at, int | float) or isinstance(at, bool):
        return "-"
    now = time.time() if now is None else now
    return duration(now - at) + " ago"


def state(value: Any) -> Text:
    text = str(value or "-")
    return Text(text, style=STATE_STYLES.get(text, ""))


def yes_no(value: Any) -> str:
    return "yes" if value else "no"


def styled(text: str, style: str) -> Text:
    return Text(text, style=style)


# --- layouts ------------------------------------------------------------------------------------


def key_values(rows: Iterable[tuple[str, Any]]) -> Table:
    """Two aligned columns, ``key  value``, for single-object views (status, show)."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, value if isinstance(value, Text | Table) else Text(str(value)))
    return grid


def table(*columns: str, title: str | None = None, right: Iterable[str] = ()) -> Table:
    t = Table(title=title, title_justify="left", header_style="bold", box=None, pad_edge=False)
    right_cols = set(right)
    for col in columns:
        t.add_column(col, justify="right" if col in right_cols else "left", overflow="fold")
    return t
