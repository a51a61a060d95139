"""``peerctl peer ban ID [--reason TEXT]``: refuse a peer's bids (``peer.ban``).

A banned peer's bids for this node's tasks are dropped and counted (``dropped.banned``);
docs/allocation.md "Caps". The ban lasts until ``peerctl peer unban``.
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from peerd.ctl import CtlState, call, json_option, pass_state
from peerd.ctl import render as r


def request(peer_id: str, reason: str | None = None) -> tuple[str, dict[str, Any]]:
    params: dict[str, Any] = {"peer_id": peer_id}
    if reason:
        params["reason"] = reason
    return "peer.ban", params


def render(result: dict[str, Any], console: Console) -> None:
    what = "banned" if result.get("changed") else "was already banned"
    console.print(r.short_peer(result.get("peer_id")), what)


@click.command("ban")
@click.argument("peer_id", metavar="ID")
@click.option("--reason", default=None, help="Why (shown by `peerctl peers --json`).")
@json_option
@pass_state
def command(state: CtlState, peer_id: str, reason: str | None, as_json: bool) -> None:
    """Refuse the bids of peer ID for this node's tasks."""
    r.emit(call(state, *request(peer_id, reason)), as_json, render)
