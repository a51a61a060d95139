"""``peerctl``: the command-line client of the local peerd daemon.

    peerctl status                   this node, its advert and counters
    peerctl peers                    every peer's signed capacity advert
    peerctl submit task.toml --wait  submit a task and follow it
    peerctl result TASK -o out/      write the result bundle; peerctl verify out/

Exit codes: 0 ok, 1 error answer or failed task, 2 usage, 3 daemon not running, 4 permission.
"""

from __future__ import annotations

from pathlib import Path

import click

from peerd import __version__
from peerd.ctl import (
    CtlState,
    cancel,
    connect,
    explain,
    result,
    show,
    status,
    submit,
    tasks,
    top,
    verify,
    watch,
)
from peerd.ctl import id as id_command
from peerd.ctl import peer as peer_command
from peerd.ctl import peers as peers_command

EPILOG = """\b
Exit codes:
  0  ok (watch, submit --wait: the task ended done)
  1  the daemon answered with an error, or the task failed or was cancelled
  2  usage error, invalid task spec, unreadable file, unsafe socket directory
  3  the daemon is not running (no socket, or nothing listening on it)
  4  no permission to open the daemon's socket

\b
Docs: README.md; docs/tasks.md (task specs), docs/rpc.md (the socket API),
docs/config.md (peerd.toml), docs/metrics.md (metrics and `peerctl top`).
Run `peerctl COMMAND --help` for one command."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.option(
    "--socket",
    "socket_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="PEERD_SOCKET",
    help="The daemon's socket [env PEERD_SOCKET; default: node.socket from the config, "
    "or /run/peerd/peerd.sock for the system service].",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    envvar="PEERD_CONFIG",
    help="Config file to find the socket in [env PEERD_CONFIG; default /etc/peerd/peerd.toml].",
)
@click.version_option(__version__, prog_name="peerctl")
@click.pass_context
def main(ctx: click.Context, socket_path: Path | None, config_path: Path | None) -> None:
    """Talk to the local peerd daemon."""
    ctx.obj = CtlState(socket=socket_path, config=config_path)


for _module in (
    status,
    peers_command,
    peer_command,
    id_command,
    connect,
    submit,
    tasks,
    show,
    watch,
    result,
    cancel,
    explain,
    verify,
    top,
):
    main.add_command(_module.command)


if __name__ == "__main__":
    main()
