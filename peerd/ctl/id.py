"""``peerctl id``: print this node's peer ID."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console

from peerd.ctl import CtlState, call, json_option, pass_state
from peerd.ctl import render as r


def request() -> tuple[str, dict[str, Any]]:
    return "node.info", {}


def render(result: dict[str, Any], console: Console) -> None:
    # Plain print, no markup: this output is meant for $(peerctl id).
    console.print(result["peer_id"], markup=False, highlight=False, soft_wrap=True)


@click.command("id")
@json_option
@pass_state
def command(state: CtlState, as_json: bool) -> None:
    """Print this node's peer ID."""
    info = call(state, *request())
    r.emit({"peer_id": info.get("peer_id")}, as_json, render)
