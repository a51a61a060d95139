"""A real ``peerd`` against local callers that attack it (issue 11, "Attacks that hurt the
daemon"): an over-deep JSON line on the socket, and a runtime directory another user made first.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from typing import Any

import pytest
from conftest import PEERD, TestNet

pytestmark = pytest.mark.slow

NOBODY = 65534


def run_peerd(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    return subprocess.run(
        [*PEERD, *args], capture_output=True, text=True, timeout=timeout, env=env, stdin=subprocess.DEVNULL
    )


def ask(path: str, data: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(15)  # a safety bound: the bug was "no reply, and the daemon is gone"
        s.connect(path)
        s.sendall(data)
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            assert chunk, "the daemon closed the connection without answering"
            buf += chunk
        return dict(json.loads(buf.partition(b"\n")[0]))


def test_a_2kb_line_of_brackets_gets_an_error_and_the_daemon_lives(devnet: Any) -> None:
    net: TestNet = devnet(1)
    for depth in (975, 990, 1200):
        reply = ask(str(net.socket(0)), b"[" * depth + b"]" * depth + b"\n")
        assert reply["error"]["code"] == -32700, reply
        assert f"nested {depth} levels deep" in reply["error"]["message"], reply
    assert net.pid(0) is not None, "the daemon process died"
    assert net.info(0)["peer_id"] == net.peer_id(0)


def test_a_runtime_dir_others_can_write_is_refused_with_exit_2(devnet: Any) -> None:
    net: TestNet = devnet(1, start=False)
    runtime = net.node_dir(0)  # the devnet's node.runtime_dir
    runtime.chmod(0o777)
    result = run_peerd("--config", str(runtime / "peerd.toml"))
    assert result.returncode == 2, result.stderr
    assert f"node.runtime_dir: unsafe socket directory {runtime}: " in result.stderr
    assert "mode 0777" in result.stderr and "Traceback" not in result.stderr
    assert not net.socket(0).exists(), "it must refuse before it listens"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_runtime_dir_owned_by_another_user_is_refused_with_exit_2(devnet: Any) -> None:
    net: TestNet = devnet(1, start=False)
    runtime = net.node_dir(0)
    os.chown(runtime, NOBODY, NOBODY)  # mode 0755: only its owner, "nobody", can write it
    try:
        result = run_peerd("--config", str(runtime / "peerd.toml"))
    finally:
        os.chown(runtime, 0, 0)
    assert result.returncode == 2, result.stderr
    assert f"node.runtime_dir: unsafe socket directory {runtime}: is owned by uid 65534" in result.stderr
    assert "Traceback" not in result.stderr
    assert not net.socket(0).exists()
