"""Prometheus metrics and ``peerctl top`` against a real daemon on 127.0.0.1 (issue 12 item 3).

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
    n: TestNet = devnet_module(1, {"metrics": {"listen": "127.0.0.1:0"}, "offer": {"accept_kinds": ["echo"]}})
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
