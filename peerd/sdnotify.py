"""systemd's notify protocol (sd_notify(3)) without libsystemd.

With ``Type=notify`` systemd waits for ``READY=1`` before it considers peerd started, so
``systemctl start`` returns only once the RPC socket is listening. ``WatchdogSec=`` restarts a
daemon whose event loop stops pinging. Outside systemd ($NOTIFY_SOCKET unset) every call is a
cheap no-op returning False, so the daemon calls these unconditionally.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose stale trio stubs shadow trio's own annotations for
    # mypy and lack trio.TaskStatus; the protocol lives in trio_typing there.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

__all__ = ["notify", "ready", "status", "stopping", "watchdog", "watchdog_interval", "watchdog_loop"]


def _address(raw: str) -> str | bytes | None:
    if raw.startswith("@"):
        # Abstract namespace: a leading NUL instead of '@' (sd_notify(3)).
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock addresses and relative paths are not used for services; ignore them


def notify(state: str, *, env: Mapping[str, str] = os.environ) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``) to $NOTIFY_SOCKET. True if the datagram was sent."""
    raw = env.get("NOTIFY_SOCKET")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        log.debug("ignoring unsupported NOTIFY_SOCKET %r", raw)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            # Never block the event loop on a full receive queue: a lost status line is harmless,
            # and a missed watchdog ping is retried at the next interval.
            sock.setblocking(False)
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", state, exc)
        return False
    return True


def ready(*, env: Mapping[str, str] = os.environ) -> bool:
    return notify("READY=1", env=env)


def stopping(*, env: Mapping[str, str] = os.environ) -> bool:
    return notify("STOPPING=1", env=env)


def watchdog(*, env: Mapping[str, str] = os.environ) -> bool:
    return notify("WATCHDOG=1", env=env)


def status(text: str, *, env: Mapping[str, str] = os.environ) -> bool:
    # STATUS is one line of the "Status:" field of systemctl status; a newline would start a new
    # variable assignment in the datagram.
    return notify("STATUS=" + " ".join(text.split()), env=env)


def watchdog_interval(*, env: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between watchdog pings, or None if systemd does not expect them.

    Half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) recommends, so one late ping is not fatal.
    $WATCHDOG_PID, when set, must be our pid (the variable may have leaked to a child).
    """
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec:
        return None
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    if value <= 0:
        return None
    return value / 2 / 1_000_000


async def watchdog_loop(
    *, env: Mapping[str, str] = os.environ, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Ping the watchdog at :func:`watchdog_interval` until cancelled.

    It runs in the daemon's root nursery, so a wedged event loop stops the pings and systemd
    restarts the service. Without a watchdog it just waits to be cancelled.
    """
    interval = watchdog_interval(env=env)
    task_status.started()
    if interval is None:
        await trio.sleep_forever()
    while True:
        watchdog(env=env)
        await trio.sleep(interval)
