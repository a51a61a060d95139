"""peerd/sdnotify.py through a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from peerd import sdnotify


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify"
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield sock, {"NOTIFY_SOCKET": str(path)}
    finally:
        sock.close()


def drain(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_ready_stopping_watchdog_and_status_reach_the_socket(
    notify_socket: tuple[socket.socket, dict[str, str]],
) -> None:
    sock, env = notify_socket
    assert sdnotify.ready(env=env)
    assert sdnotify.status("listening on\n/run/peerd/peerd.sock", env=env)
    assert sdnotify.watchdog(env=env)
    assert sdnotify.stopping(env=env)
    assert drain(sock) == ["READY=1", "STATUS=listening on /run/peerd/peerd.sock", "WATCHDOG=1", "STOPPING=1"]


def test_abstract_socket_names_are_supported() -> None:
    name = f"peerd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        assert sdnotify.ready(env={"NOTIFY_SOCKET": "@" + name})
        assert drain(sock) == ["READY=1"]


def test_without_notify_socket_nothing_is_sent() -> None:
    assert sdnotify.ready(env={}) is False
    assert sdnotify.notify("READY=1", env={"NOTIFY_SOCKET": ""}) is False


def test_a_dead_notify_socket_is_not_an_error(tmp_path: Path) -> None:
    assert sdnotify.ready(env={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert sdnotify.ready(env={"NOTIFY_SOCKET": "relative/path"}) is False


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(env: dict[str, str], expected: float | None) -> None:
    assert sdnotify.watchdog_interval(env=env) == expected


async def test_watchdog_loop_pings_at_half_the_interval(
    notify_socket: tuple[socket.socket, dict[str, str]], autojump_clock: trio.testing.MockClock
) -> None:
    sock, env = notify_socket
    env = {**env, "WATCHDOG_USEC": "2000000"}  # 2 s → a ping every 1 s
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: sdnotify.watchdog_loop(env=env, task_status=task_status))
        await trio.sleep(3.5)
        nursery.cancel_scope.cancel()
    assert drain(sock) == ["WATCHDOG=1"] * 4  # at t = 0, 1, 2, 3


async def test_watchdog_loop_without_watchdog_sends_nothing(
    notify_socket: tuple[socket.socket, dict[str, str]], autojump_clock: trio.testing.MockClock
) -> None:
    sock, env = notify_socket
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: sdnotify.watchdog_loop(env=env, task_status=task_status))
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    assert drain(sock) == []
