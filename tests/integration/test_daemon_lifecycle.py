"""The daemon as a process: signals, systemd's notify protocol, stale sockets, refusing to
start (issue 2 items 4, 8, 10, 11).

Shutdown times are measured and printed (``pytest -s``), not asserted: the issue's 5 s is
a budget for the benchmark report, and a loaded CI machine must not turn it into a flake.
Every wait is still bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import PEERD, TestNet

from peerd.rpc.client import RpcClient

pytestmark = pytest.mark.slow

#: Generous bound for "exits after SIGTERM" (the issue's target is 5 s; measured values are printed).
EXIT_CAP_S = 20.0


def run_peerd(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    return subprocess.run(
        [*PEERD, *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )


# --- SIGTERM ----------------------------------------------------------------------------------


def test_sigterm_exits_0_without_a_traceback_and_removes_the_socket(devnet: Any) -> None:
    net: TestNet = devnet(2)
    assert net.wait_peers(2, timeout=30)
    # The non-bootstrap peer first (it has a live connection to drop), then the last one.
    for i in (1, 0):
        sock = net.socket(i)
        assert sock.exists()
        rc, took = net.terminate(i, timeout=EXIT_CAP_S)
        print(f"\n[measure] node {i}: SIGTERM to exit {took:.2f} s")
        log = net.log(i)
        assert rc == 0, f"node {i} exited {rc}:\n{log[-3000:]}"
        assert "Traceback" not in log, log[-3000:]
        assert "received SIGTERM; shutting down" in log
        assert "peerd stopped" in log
        assert not sock.exists(), "the RPC socket file was left behind"


def test_sigint_is_a_clean_shutdown_too(devnet: Any) -> None:
    net: TestNet = devnet(1)
    t0 = time.monotonic()
    net.signal(0, signal.SIGINT)
    rc = net.wait_exit(0, timeout=EXIT_CAP_S)
    print(f"\n[measure] SIGINT to exit {time.monotonic() - t0:.2f} s")
    assert rc == 0
    assert "Traceback" not in net.log(0)
    assert not net.socket(0).exists()


# --- sd_notify --------------------------------------------------------------------------------


class NotifyListener:
    """Stands in for systemd: a datagram socket named by NOTIFY_SOCKET, recording every state."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.received: list[tuple[float, str]] = []

    def wait_for(self, state: str, timeout: float, *, prefix: bool = False) -> float:
        """Wait for a datagram with the line ``state`` (or a line starting with it, ``prefix``);
        returns when it arrived (monotonic)."""

        def match(text: str) -> bool:
            lines = text.splitlines()
            return any(line.startswith(state) for line in lines) if prefix else state in lines

        deadline = time.monotonic() + timeout
        for at, text in self.received:
            if match(text):
                return at
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {state} within {timeout} s; got {[t for _, t in self.received]}")
            self.sock.settimeout(left)
            try:
                text = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            at = time.monotonic()
            self.received.append((at, text))
            if match(text):
                return at

    def states(self) -> list[str]:
        return [line for _, text in self.received for line in text.splitlines()]

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_sd_notify_ready_watchdog_stopping(devnet: Any, abstract: bool) -> None:
    net: TestNet = devnet(1, start=False)
    if abstract:
        name = f"peerd-test-{os.getpid()}-{time.monotonic_ns()}"
        listener, env_value = NotifyListener(b"\0" + name.encode()), "@" + name
    else:
        path = net.dir / "notify.sock"
        listener, env_value = NotifyListener(str(path)), str(path)
    try:
        started = time.monotonic()
        # Not Devnet.start's environment: that one drops NOTIFY_SOCKET on purpose.
        net.start(0, env={"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": "1000000"})
        ready_at = listener.wait_for("READY=1", timeout=90)
        # READY=1 means "listening": the RPC socket must answer right now, not a moment later.
        with RpcClient(net.socket(0), timeout=10) as client:
            info = client.call("node.info")
        print(f"\n[measure] READY=1 {ready_at - started:.2f} s after the start")
        listener.wait_for("STATUS=", timeout=10, prefix=True)
        assert listener.states().count("READY=1") == 1
        status = [s for s in listener.states() if s.startswith("STATUS=")]
        assert any(info["peer_id"] in s for s in status), status
        # WATCHDOG_USEC=1 s: pings every 0.5 s (half the interval, as sd_watchdog_enabled(3) advises).
        listener.wait_for("WATCHDOG=1", timeout=10)
        assert "STOPPING=1" not in listener.states()

        t0 = time.monotonic()
        net.signal(0, signal.SIGTERM)
        stopping_at = listener.wait_for("STOPPING=1", timeout=EXIT_CAP_S)
        rc = net.wait_exit(0, timeout=EXIT_CAP_S)
        print(
            f"[measure] STOPPING=1 {stopping_at - t0:.3f} s after SIGTERM; exit {time.monotonic() - t0:.2f} s"
        )
        assert rc == 0
        states = listener.states()
        assert states.index("READY=1") < states.index("STOPPING=1")
        assert "Traceback" not in net.log(0)
    finally:
        listener.close()


# --- the RPC socket file ------------------------------------------------------------------------


def test_a_stale_socket_from_a_killed_daemon_is_replaced(devnet: Any) -> None:
    net: TestNet = devnet(1)
    sock = net.socket(0)
    peer_id = net.info(0)["peer_id"]
    assert net.kill(0) == -signal.SIGKILL
    assert sock.exists(), "SIGKILL cannot clean up, so the socket file must still be there"
    probe = socket.socket(socket.AF_UNIX)
    with pytest.raises(ConnectionRefusedError):
        probe.connect(str(sock))
    probe.close()

    net.start(0)
    info = net.wait_ready(0)
    assert info["peer_id"] == peer_id
    assert "removing stale socket" in net.log(0)
    assert oct(sock.stat().st_mode & 0o777) == oct(0o660)
    assert "Traceback" not in net.log(0)


def test_a_live_daemons_socket_is_never_taken_over(devnet: Any) -> None:
    net: TestNet = devnet(1)
    first = net.info(0)
    second = run_peerd("--config", str(net.node_dir(0) / "peerd.toml"), timeout=90)
    assert second.returncode != 0
    out = second.stdout + second.stderr
    assert "already running" in out, out[-3000:]
    assert "Traceback" not in out, f"a clear one-line refusal, not a traceback:\n{out[-3000:]}"
    # The first daemon still owns and serves its socket.
    assert net.info(0)["peer_id"] == first["peer_id"]
    assert net.pid(0) is not None


# --- refusing to start --------------------------------------------------------------------------

BAD_CONFIGS = [
    (
        "unknown-key",
        '[network]\nlisten_addrs = ["/ip4/127.0.0.1/tcp/0"]\n',
        ["network.listen_addrs", "unknown key"],
    ),
    ("unknown-section", "[netwrok]\nmdns = false\n", ["netwrok", "unknown section"]),
    ("wrong-type", '[adverts]\ninterval_s = "fast"\n', ["adverts.interval_s", "fast"]),
    ("wrong-type-in-array", '[network]\nlisten = ["/ip4/127.0.0.1/tcp/0", 4001]\n', ["network.listen[1]"]),
    ("bad-toml", '[node]\nlog_level = "info"\nstate_dir = \n', ["line 3"]),
    ("unclosed-table", "[node\n", ["line 1"]),
]


@pytest.mark.parametrize(
    ("text", "expected"), [(t, e) for _, t, e in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS]
)
def test_config_errors_exit_2_naming_the_key_or_line(tmp_path: Path, text: str, expected: list[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    result = run_peerd("--config", str(config))
    assert result.returncode == 2, result.stderr
    for needle in expected:
        assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert str(config) in result.stderr  # which file, too


def test_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_peerd("--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "nope.toml" in result.stderr and "Traceback" not in result.stderr


def test_an_identity_key_readable_by_others_is_refused(devnet: Any) -> None:
    net: TestNet = devnet(1, start=False)
    key = net.node_dir(0) / "state" / "identity.key"
    key.chmod(0o644)
    result = run_peerd("--config", str(net.node_dir(0) / "peerd.toml"), timeout=90)
    out = result.stderr
    assert result.returncode not in (0, 2), out  # 2 is for config errors
    assert str(key) in out and "chmod 600" in out, out
    assert "Traceback" not in out, f"a clear message, not a traceback:\n{out[-3000:]}"
    assert not net.socket(0).exists(), "it must refuse before it listens"
    # Nothing was rewritten: the key is the operator's to fix.
    assert oct(key.stat().st_mode & 0o777) == oct(0o644)
    # After the fix it starts, with the same identity.
    key.chmod(0o600)
    expected_id = net.peer_id(0)
    net.start(0)
    assert net.wait_ready(0)["peer_id"] == expected_id
