"""``peerctl peer unban ID``: take a peer's bids again (``peer.unban``).

Lifts a ban by hand, and forgives a ban the ``[policy]`` threshold made (the peer's failed,
timed-out and disagreeing counts go to zero; what it delivered is kept).
"""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from peerd.ctl import CtlState, call, json_option, pass_state
from peerd.ctl import render as r


def request(peer_id: str) -> tuple[str, dict[str, Any]]:
    return "peer.unban", {"peer_id": peer_id}


def render(result: dict[str, Any], console: Console) -> None:
    what = "unbanned" if result.get("changed") else "was not banned"
    console.print(r.short_peer(result.get("peer_id")), what)


@click.command("unban")
@click.argument("peer_id", metavar="ID")
@json_option
@pass_state
def command(state: CtlState, peer_id: str, as_json: bool) -> None:
    """Take the bids of peer ID again (lifts a ban by hand or by the policy threshold)."""
    r.emit(call(state, *request(peer_id)), as_json, render)
