"""peerctl: the command-line client of peerd's local socket.

Layout (after tailscale's ``cmd/tailscale/cli``): one module per subcommand, each with a pure
``request(...) -> (method, params)`` tested without a daemon, a ``render(result, console)``
for humans, and the click ``command``. This file holds what they share: where the socket
is, how errors map to exit codes, and the call helper. peerctl talks to the daemon only
through :mod:`peerd.rpc.client` and never imports trio, libp2p, numpy or TensorFlow.

Exit codes (``peerctl --help`` lists them too): 0 ok; 1 the daemon answered with an error (or
the task failed); 2 usage or input-file errors, an invalid task spec (whoever found it), or a
socket directory another user could control; 3 the daemon is not running; 4 no permission to
open its socket.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from peerd.rpc.client import (
    DaemonNotRunning,
    RpcCallError,
    RpcClient,
    RpcClientError,
    SocketPermissionDenied,
    UnsafeSocket,
)

#: Where systemd's RuntimeDirectory=peerd puts the service's socket.
SYSTEM_SOCKET = Path("/run/peerd/peerd.sock")

F = TypeVar("F", bound=Callable[..., Any])


class ExitCode(IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_RUNNING = 3
    PERMISSION = 4


def resolve_socket(
    explicit: Path | None, config: Path | None, *, env: Mapping[str, str] = os.environ, uid: int | None = None
) -> Path:
    """The socket to use: ``--socket``/$PEERD_SOCKET, else the config's ``node.socket``.

    A normal user's default runtime dir is under $XDG_RUNTIME_DIR, but the system service's
    socket is in /run/peerd; when the computed default does not exist and the system one
    does, the system one is meant.
    """
    from peerd.config import ConfigError, default_socket_path, load_config

    if explicit is not None:
        return explicit
    try:
        candidate = load_config(config, env=env, uid=uid).node.socket
    except ConfigError:
        if config is not None:
            raise  # asked for explicitly: its errors matter
        # /etc/peerd/peerd.toml is often unreadable to users (mode 0640); fall back.
        candidate = default_socket_path(env, uid)
    if not candidate.exists() and SYSTEM_SOCKET.exists():
        return SYSTEM_SOCKET
    return candidate


@dataclass
class CtlState:
    """The group's options, shared with every subcommand through click's context."""

    socket: Path | None = None
    config: Path | None = None

    def socket_path(self) -> Path:
        from peerd.config import ConfigError

        try:
            return resolve_socket(self.socket, self.config)
        except ConfigError as exc:
            fail(str(exc), ExitCode.USAGE)

    def client(self, *, timeout: float | None = 60.0) -> RpcClient:
        return RpcClient(self.socket_path(), timeout=timeout)


pass_state = click.make_pass_decorator(CtlState, ensure=True)


def json_option(f: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")(f)


def fail(message: str, code: ExitCode = ExitCode.ERROR) -> NoReturn:
    """One line on stderr, then exit with ``code``."""
    click.echo(f"peerctl: {message}", err=True)
    raise SystemExit(int(code))


@contextmanager
def rpc_errors() -> Iterator[None]:
    """Turn client errors into one clear line and the documented exit code."""
    try:
        yield
    except DaemonNotRunning as exc:
        fail(f"{exc}; start peerd, or point --socket or $PEERD_SOCKET at its socket", ExitCode.NOT_RUNNING)
    except UnsafeSocket as exc:
        fail(str(exc), ExitCode.USAGE)
    except SocketPermissionDenied as exc:
        fail(str(exc), ExitCode.PERMISSION)
    except RpcCallError as exc:
        fail(f"{exc.message} (error {exc.code})", ExitCode.ERROR)
    except RpcClientError as exc:
        fail(str(exc), ExitCode.ERROR)


def call(state: CtlState, method: str, params: Mapping[str, Any]) -> Any:
    with rpc_errors(), state.client() as rpc:
        return rpc.call(method, params)


__all__ = [
    "SYSTEM_SOCKET",
    "CtlState",
    "ExitCode",
    "call",
    "fail",
    "json_option",
    "pass_state",
    "resolve_socket",
]
