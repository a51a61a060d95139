"""peerctl's shared formatting: numbers print as numbers; output that is not a terminal is not
cut at 80 columns (issue 12)."""

from __future__ import annotations

import io
import sys

import pytest

from peerd.ctl import render as r


@pytest.mark.parametrize(
    ("value", "digits", "expected"),
    [
        (10000.0, 4, "10000"),  # was "10,000.0000"
        (10000, 2, "10000"),
        (2900.3381, 3, "2900.338"),  # no thousands separator
        (0.5, 2, "0.50"),
        (-3.0, 2, "-3"),
        (None, 2, "∞"),
        (float("inf"), 2, "∞"),
        (float("nan"), 2, "-"),
        (True, 2, "True"),
        ("x", 2, "x"),
    ],
)
def test_numbers_print_as_numbers(value: object, digits: int, expected: str) -> None:
    assert r.num(value, digits) == expected


def test_tables_use_the_full_width_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    peer = "12D3KooW" + "x" * 44
    why = "not chosen: a cheaper set of bids covers R without it, and its load is above the mean " * 2
    t = r.table("peer", "why")
    t.add_row(peer, why)
    r.stdout().print(t)
    lines = out.getvalue().splitlines()
    assert any(peer in ln and why.strip() in ln for ln in lines), lines
    assert all(ln == ln.rstrip() or len(ln) < r.PIPE_WIDTH for ln in lines)  # not padded to the width


def test_columns_still_wins_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert r.stdout().width == 60
