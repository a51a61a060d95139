"""``peerctl connect ADDR``: dial a peer by multiaddr (``network.connect``)."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from peerd.ctl import CtlState, call, json_option, pass_state
from peerd.ctl import render as r


def request(addr: str) -> tuple[str, dict[str, Any]]:
    addr = addr.strip()
    if not addr.startswith("/") or "/p2p/" not in addr:
        raise click.BadParameter(
            "expected a multiaddr ending in /p2p/<peer id>, e.g. /ip4/192.0.2.7/tcp/4001/p2p/12D3KooW...",
            param_hint="ADDR",
        )
    return "network.connect", {"addr": addr}


def render(result: dict[str, Any], console: Console) -> None:
    console.print(f"connected to {result.get('peer_id')}")


@click.command("connect")
@click.argument("addr")
@json_option
@pass_state
def command(state: CtlState, addr: str, as_json: bool) -> None:
    """Connect to a peer at ADDR (a multiaddr with /p2p/<peer id>)."""
    r.emit(call(state, *request(addr)), as_json, render)
