"""``peerctl peer``: what this node does about one peer (subcommands ``ban``, ``unban``)."""

from __future__ import annotations

import click

from peerd.ctl import peer_ban, peer_unban


@click.group("peer")
def command() -> None:
    """Ban or unban a peer: a banned peer's bids for this node's tasks are refused."""


command.add_command(peer_ban.command)
command.add_command(peer_unban.command)
