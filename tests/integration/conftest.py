"""Shared fixtures for the integration tier: real ``peerd`` daemons on 127.0.0.1.

``devnet`` (one test) and ``devnet_module`` (one test module) are *factories*::

    def test_something(devnet):
        net = devnet(3)                                    # 3 daemons, started and answering RPC
        net = devnet(2, {"adverts": {"ttl_s": 4.0}})       # config overrides, per section
        net = devnet(1, start=False)                       # configured only: net.start(0) yourself
        net.peers(0)                                       # {peer_id: peers.list entry}
        net.kill(2)                                        # SIGKILL, returns the exit status

Every net lives in the test's ``tmp_path`` (or a shorter /tmp directory when the socket path
would not fit a ``sun_path``) and is always torn down: SIGTERM, then SIGKILL for whatever is
left, also when the test fails. On a failure the tail of every daemon's log is printed.

:class:`TestNet` is :class:`peerd.devnet.Devnet` (the same code ``scripts/devnet`` and the
demo use) plus what tests need: the child's ``Popen`` (so exit statuses are real, not
guessed), extra environment for one start (``NOTIFY_SOCKET``), RPC shortcuts and logs.

Helpers for the other files: :func:`wait_for` (blocking, bounded polling) and
:func:`eventually` (the same inside a trio test). Neither asserts on how long anything took;
tests measure and print durations, assert only bounded waits.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from peerd.devnet import Devnet
from peerd.rpc.client import RpcClient
from peerd.wanlink import LinkParams

T = TypeVar("T")

#: The daemon as a command line: the same interpreter and module ``peerd.devnet`` starts.
PEERD = [sys.executable, "-m", "peerd.daemon"]
#: sockaddr_un.sun_path holds 107 bytes plus NUL; leave room for node-<i>/peerd.sock.
_MAX_DIR = 80


# --- polling ------------------------------------------------------------------------------------


def wait_for(
    probe: Callable[[], T | None],
    what: str,
    *,
    timeout: float = 10.0,
    interval: float = 0.1,
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call ``probe`` until it returns something truthy (returned) or ``timeout`` passes (AssertionError).

    Exceptions listed in ``ignore`` count as "not yet" (e.g. a daemon that is not listening yet).
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except ignore as exc:
            last = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}{detail}")
        time.sleep(interval)


async def eventually(
    probe: Callable[[], Awaitable[T | None]], what: str, *, timeout: float = 10.0, interval: float = 0.1
) -> T:
    """:func:`wait_for` for trio tests: ``probe`` is awaited, the event loop keeps running."""
    import trio

    with trio.move_on_after(timeout):
        while True:
            value = await probe()
            if value:
                return value
            await trio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


# --- the devnet ---------------------------------------------------------------------------------


class TestNet(Devnet):
    """A :class:`peerd.devnet.Devnet` that keeps its children's ``Popen`` handles."""

    __test__ = False  # not a test class, whatever its name says

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    # -- processes -------------------------------------------------------------------------
    def start(self, i: int, *, env: dict[str, str] | None = None) -> int:
        """Start node ``i`` like ``Devnet.start`` (log appended to ``node-<i>/peerd.log``).

        ``env`` adds to (or, with a value of ``""``, removes from) the environment of this start
        only; NOTIFY_SOCKET is dropped unless ``env`` sets it, as the devnet does.
        """
        d = self.node_dir(i)
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        child_env.pop("NOTIFY_SOCKET", None)
        for key, value in (env or {}).items():
            if value == "":
                child_env.pop(key, None)
            else:
                child_env[key] = value
        with open(d / "peerd.log", "ab") as log:
            proc = subprocess.Popen(
                [*PEERD, "--config", str(d / "peerd.toml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=child_env,
                start_new_session=True,
            )
        self.procs[i] = proc
        (d / "peerd.pid").write_text(str(proc.pid))
        return proc.pid

    def pid(self, i: int) -> int | None:
        # Devnet.pid reaps zombies with waitpid(), which would steal the exit status from Popen.
        proc = self.procs.get(i)
        if proc is None:
            return super().pid(i)
        return proc.pid if proc.poll() is None else None

    def wait_exit(self, i: int, timeout: float) -> int:
        """Wait for node ``i`` to exit; its exit status (negative: killed by that signal)."""
        return self.procs[i].wait(timeout=timeout)

    def signal(self, i: int, sig: int) -> None:
        self.procs[i].send_signal(sig)

    def kill(self, i: int) -> int:
        """SIGKILL node ``i`` (no cleanup at all, like a crash or OOM kill) and reap it."""
        self.signal(i, signal.SIGKILL)
        return self.wait_exit(i, timeout=10)

    def terminate(self, i: int, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM node ``i``; (exit status, seconds it took). Raises if it outlives ``timeout``."""
        t0 = time.monotonic()
        self.signal(i, signal.SIGTERM)
        rc = self.wait_exit(i, timeout)
        return rc, time.monotonic() - t0

    def close(self) -> None:
        """Stop everything this net started: SIGTERM, then SIGKILL after 10 s. Never raises."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # -- talking to the daemons ------------------------------------------------------------
    def rpc(self, i: int, method: str, params: dict[str, Any] | None = None, *, timeout: float = 15.0) -> Any:
        with RpcClient(self.socket(i), timeout=timeout) as client:
            return client.call(method, params or {})

    def info(self, i: int) -> dict[str, Any]:
        return dict(self.rpc(i, "node.info"))

    def counters(self, i: int) -> dict[str, int]:
        return dict(self.info(i)["counters"])

    def peers(self, i: int) -> dict[str, dict[str, Any]]:
        """Node ``i``'s peer table (verified, unexpired adverts, itself included) by peer ID."""
        return {p["peer_id"]: p for p in self.rpc(i, "peers.list")["peers"]}

    def ids(self) -> dict[int, str]:
        return {i: self.peer_id(i) for i in self.nodes()}

    def log(self, i: int) -> str:
        try:
            return (self.node_dir(i) / "peerd.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tails(self, lines: int = 40) -> str:
        out = []
        for i in self.nodes():
            tail = self.log(i).splitlines()[-lines:]
            out.append(f"----- node-{i} ({self.node_dir(i) / 'peerd.log'}) -----\n" + "\n".join(tail))
        return "\n".join(out)


def _net_dir(base: Path, owned: list[Path]) -> Path:
    if len(str(base)) <= _MAX_DIR:
        return base
    # A long --basetemp or test name: fall back to a short private directory we remove ourselves.
    short = Path(tempfile.mkdtemp(prefix="peerd-it-"))
    owned.append(short)
    return short


class _Factory:
    def __init__(self, base: Callable[[str], Path]) -> None:
        self._base = base
        self.nets: list[TestNet] = []
        self._owned: list[Path] = []

    def __call__(
        self,
        n: int,
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        start: bool = True,
        timeout: float = 90.0,
        wan: LinkParams | None = None,
    ) -> TestNet:
        net = TestNet(_net_dir(self._base(f"net{len(self.nets)}"), self._owned))
        self.nets.append(net)
        if start:
            net.up(n, overrides, timeout=timeout, wan=wan)
        else:
            net.configure(n, overrides, wan)
            if wan is not None:
                net.start_wan(timeout)
        return net

    def close(self, failed: bool) -> None:
        for net in self.nets:
            if failed:
                print(f"\n===== devnet {net.dir}: log tails =====\n{net.log_tails()}")
            net.close()
            net.stop_wan()
        for path in self._owned:
            shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Remember each phase's outcome on the item so fixtures can tell whether the test failed.
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)


def _failed(node: Any) -> bool:
    return any(getattr(getattr(node, f"rep_{w}", None), "failed", False) for w in ("setup", "call"))


@pytest.fixture
def devnet(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[_Factory]:
    """Factory: ``devnet(n, overrides=None, *, start=True) -> TestNet``; torn down after the test."""
    factory = _Factory(lambda name: tmp_path / name)
    try:
        yield factory
    finally:
        factory.close(_failed(request.node))


@pytest.fixture(scope="module")
def devnet_module(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[_Factory]:
    """Like ``devnet``, shared by one test module (compare counters as deltas there)."""
    factory = _Factory(lambda name: tmp_path_factory.mktemp(name))
    try:
        yield factory
    finally:
        module = request.module
        failed = any(_failed(it) for it in request.session.items if getattr(it, "module", None) is module)
        factory.close(failed)
