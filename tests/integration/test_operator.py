"""What an operator sees, against a real daemon on 127.0.0.1 (issue 12): Prometheus metrics,
``peerctl top``, ``peerctl submit --wait``, quiet shutdown.

One daemon with ``[metrics] listen = "127.0.0.1:0"`` (the kernel picks the port; the daemon logs
where it listens) runs one echo task; the scrape must then show its counters, gauges and the
award-latency histogram, in a format ``prometheus_client``'s own parser reads.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import TestNet, wait_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = ("done", "failed", "cancelled")


def metrics_url(net: TestNet, i: int) -> str:
    found = wait_for(
        lambda: re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", net.log(i)),
        "the daemon to log its metrics address",
        timeout=30,
    )
    return found.group(1)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=15) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def peerctl(net: TestNet, i: int, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "peerd.ctl.main", "--socket", str(net.socket(i)), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
        check=False,
    )


@pytest.fixture(scope="module")
def net(devnet_module: Any) -> Iterator[TestNet]:
    n: TestNet = devnet_module(
        1, {"metrics": {"listen": "127.0.0.1:0"}, "offer": {"accept_kinds": ["echo", "sleep"]}}
    )
    task_id = n.rpc(0, "task.submit", {"spec": {"kind": "echo", "params": {"data": "metrics"}}})["task_id"]
    wait_for(
        lambda: n.rpc(0, "task.get", {"task_id": task_id})["state"] in TERMINAL,
        "the echo task to end",
        timeout=90,
    )
    assert n.rpc(0, "task.get", {"task_id": task_id})["state"] == "done"
    yield n


def test_a_scrape_shows_counters_gauges_and_award_latency(net: TestNet) -> None:
    samples = scrape(metrics_url(net, 0))
    counters = net.counters(0)
    # Every counter the daemon keeps is exported under its name (at least as large: it only grows).
    for name in ("tasks.submitted", "tasks.done", "bids.received", "adverts.published"):
        assert counters.get(name, 0) >= 1, counters
        exported = samples[("peerd_" + name.replace(".", "_") + "_total", ())]
        assert exported >= counters[name]
    assert samples[("peerd_tasks", (("role", "submitter"), ("state", "done")))] == 1
    assert samples[("peerd_tasks", (("role", "submitter"), ("state", "failed")))] == 0
    assert samples[("peerd_peers_known", ())] == 1
    assert samples[("peerd_worker_slots", ())] == 1
    assert samples[("peerd_worker_jobs", ())] == 0
    assert 0 <= samples[("peerd_advert_age_seconds", ())] <= 10  # adverts.ttl_s of the devnet
    assert samples[("peerd_award_latency_seconds_count", ())] == 1
    assert samples[("peerd_award_latency_seconds_bucket", (("le", "+Inf"),))] == 1
    assert samples[("peerd_round_seconds_count", ())] == 0  # echo has no rounds
    assert samples[("peerd_shard_run_seconds_count", ())] == 1  # one shard
    assert ("peerd_p2p_peers_connected", ()) in samples


def test_the_endpoint_answers_only_get_metrics_and_survives_garbage(net: TestNet) -> None:
    url = metrics_url(net, 0)
    host, port = re.match(r"http://([\d.]+):(\d+)/", url).groups()  # type: ignore[union-attr]
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url.replace("/metrics", "/nope"), timeout=15)
    assert err.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(url, data=b"x", method="POST"), timeout=15)
    assert err.value.code == 405
    for garbage in (b"\x00\xff garbage\r\n\r\n", b"GET " + b"a" * 20_000 + b"\r\n\r\n", b""):
        with socket.create_connection((host, int(port)), timeout=15) as s:
            s.sendall(garbage)
            s.shutdown(socket.SHUT_WR)
            reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 4"), reply[:80]
    assert scrape(url)[("peerd_peers_known", ())] == 1
    assert net.pid(0) is not None


def test_a_taken_metrics_port_is_refused_naming_the_key(devnet: Any) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        n: TestNet = devnet(1, {"metrics": {"listen": f"127.0.0.1:{port}"}}, start=False)
        n.start(0)
        rc = n.wait_exit(0, timeout=60)
    assert rc == 1
    assert f"peerd: metrics.listen: cannot listen on 127.0.0.1:{port}" in n.log(0)
    assert "Traceback" not in n.log(0)


def test_peerctl_top_shows_this_node_over_the_socket(net: TestNet) -> None:
    peer = net.peer_id(0)
    task = net.rpc(0, "task.list")["tasks"][0]
    out = peerctl(net, 0, "top", "--iterations", "2", "--interval", "0.2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("messages/s") == 2  # two refreshes, printed one after the other
    assert "(next refresh)" in out.stdout  # the first has no rates yet
    assert "in (all) " in out.stdout  # the second has
    assert peer in out.stdout and "(self)" in out.stdout
    assert task["task_id"] in out.stdout and "done" in out.stdout
    assert "worker slots 0/1 busy" in out.stdout
    assert "Traceback" not in out.stderr


def test_peerctl_top_without_a_daemon_exits_3(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-m", "peerd.ctl.main", "--socket", str(tmp_path / "none.sock"), "top", "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert out.returncode == 3
    assert "--socket" in out.stderr


def test_submit_wait_prints_a_small_text_output(net: TestNet) -> None:
    out = peerctl(net, 0, "submit", str(ROOT / "examples/echo.toml"), "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("submitted ")
    assert "outputs/shard-0/stdout:" in lines
    assert lines[lines.index("outputs/shard-0/stdout:") + 1] == "hello from peerd"
    assert "writes them to DIR/outputs/shard-<i>/<name>" in out.stdout
    assert "━" not in out.stdout, "no progress bar frames in a pipe"


def test_a_spec_error_the_daemon_finds_is_the_same_line_and_exit_2(net: TestNet, tmp_path: Path) -> None:
    spec = tmp_path / "task.toml"
    spec.write_text('kind = "python"\n[inputs]\nscript = "missing.py"\n')
    out = peerctl(net, 0, "submit", str(spec))
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.startswith("peerctl: invalid task spec: inputs.script: cannot read "), out.stderr
    assert "error -32602" not in out.stderr and "Usage:" not in out.stderr


def test_a_peer_that_hangs_up_mid_handshake_logs_no_error(net: TestNet) -> None:
    # What a daemon sees when its peers shut down: a dial whose other end closes during the
    # security handshake. libp2p logs that at ERROR; for us it is ordinary churn, reported as a
    # TransportError (the connect fails) and logged at DEBUG.
    import threading

    from protocol.envelope import Signer

    other = Signer(os.urandom(32)).peer_id
    stop = threading.Event()
    hung_up = []
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]

        def hang_up() -> None:
            while not stop.is_set():
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                conn.close()
                hung_up.append(1)

        t = threading.Thread(target=hang_up, daemon=True)
        t.start()
        try:
            out = peerctl(net, 0, "connect", f"/ip4/127.0.0.1/tcp/{port}/p2p/{other}", timeout=60)
        finally:
            stop.set()
            t.join(timeout=10)
    assert hung_up, "the daemon never dialled"
    assert out.returncode == 1, out.stdout + out.stderr
    assert "cannot connect" in out.stderr
    errors = [ln for ln in net.log(0).splitlines() if " ERROR " in ln]
    assert not any("failed to upgrade security" in ln for ln in errors), errors


def test_the_grafana_dashboard_uses_only_metrics_the_daemon_exports(net: TestNet) -> None:
    import json

    exported = {name for name, _ in scrape(metrics_url(net, 0))}
    # tasks.<state> is counted as each task ends (peerd/submitter.py); this net's task ended done.
    exported |= {f"peerd_tasks_{state}_total" for state in TERMINAL}
    # A family such as peerd_dropped_*_total appears once something is dropped: it must at least
    # match counters the daemon's code increments.
    counted = {
        "peerd_" + re.sub(r"\{[^}]*\}", "x", name).replace(".", "_") + "_total"
        for f in (*ROOT.glob("peerd/**/*.py"), *ROOT.glob("protocol/**/*.py"))
        for name in re.findall(r'counters\.inc\(f?"([a-z_.{}]+)"', f.read_text())
    }
    dashboard = json.loads((ROOT / "contrib/grafana/peerd.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    for expr in exprs:
        for pattern in re.findall(r'__name__=~"([^"]+)"', expr):
            assert any(re.fullmatch(pattern, n) for n in exported | counted), (pattern, expr)
        for name in re.findall(r"\b(peerd_[a-z0-9_]+)\b", re.sub(r'"[^"]*"', '""', expr)):
            assert name in exported, (name, expr)


def test_a_cancelled_tasks_shards_are_not_left_awarded(net: TestNet) -> None:
    spec = {"kind": "sleep", "params": {"seconds": 60}, "deadline_s": 120}
    task_id = net.rpc(0, "task.submit", {"spec": spec})["task_id"]
    wait_for(
        lambda: net.rpc(0, "task.get", {"task_id": task_id})["shards"],
        "the sleep task to be awarded",
        timeout=60,
    )
    assert net.rpc(0, "task.cancel", {"task_id": task_id})["state"] == "cancelled"
    task = wait_for(
        lambda: (t := net.rpc(0, "task.get", {"task_id": task_id}))["state"] == "cancelled" and t,
        "the task to end cancelled",
        timeout=30,
    )
    assert [s["state"] for s in task["shards"]] == ["cancelled"], task["shards"]
