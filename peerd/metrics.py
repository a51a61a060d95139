"""Prometheus metrics (``[metrics] listen``, docs/config.md; every metric in docs/metrics.md).

A service in the daemon's nursery serves ``GET /metrics`` in the text exposition format of
``prometheus_client``. Nothing is kept twice: at each scrape a custom collector reads what the
daemon already keeps, in the trio thread that owns it (the store's SQLite connection is not
shared with a server thread, which is why this is not ``prometheus_client.start_http_server``):

* every named counter (peerd/counters.py) as ``peerd_<name>_total`` (dots become ``_``), and the
  libp2p layer's counters as ``peerd_p2p_<name>_total``;
* gauges: peers connected and known, tasks by role and state, worker slots and jobs, the load
  ``L``, the age of this node's advert and of the oldest advert in the peer table;
* histograms computed from the task store: award latency (submit to first award) and round
  time (award or previous certificate to a round's certificate) from its events, shard run time
  from the results' ``shard-<i>.wall_seconds``, for tasks this node submitted.

The HTTP side is deliberately small: one request per connection, the request head bounded in
size and time, at most :data:`MAX_CLIENTS` at once; anything else is answered 4xx and closed.
A scraper is a local operator's tool, but the port may be reachable by others, so garbage never
reaches more than this parser.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from peerd.config import split_host_port
from peerd.inbox import wall_ms
from peerd.store import Store

if TYPE_CHECKING:
    from peerd.node import Node

log = logging.getLogger("peerd.metrics")

#: Concurrent scrapes served; more wait for a slot.
MAX_CLIENTS = 8
#: Largest request head read (request line and headers).
MAX_HEAD = 8192
#: Time a client has to send its request head.
HEAD_TIMEOUT_S = 10.0
#: After the reply, how long and how much unread request we drain before closing. Closing a
#: socket with unread input sends an RST, which can destroy the reply before the client reads
#: it (a 431 to an oversized head was lost this way in CI); a bounded "lingering close", as
#: HTTP servers do (RFC 9112 §9.6), lets the reply arrive first.
LINGER_S = 2.0
LINGER_BYTES = 256 * 1024

AWARD_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ROUND_BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: Tasks' states as the store keeps them (docs/rpc.md, task.list), always exported (0 included)
#: so a dashboard's series do not appear and vanish.
TASK_STATES = ("pending", "bidding", "running", "aggregating", "done", "failed", "cancelled")

# The submitter's event messages (peerd/submitter.py) that mark an award and a certified round.
_AWARDED = re.compile(r"^awarded \d+ shard")
_CERTIFIED = re.compile(r"^round (\d+)/\d+ certified")


def metric_name(counter: str, prefix: str = "peerd_") -> str:
    """``inbox.dropped.bad_sig`` → ``peerd_inbox_dropped_bad_sig`` (Prometheus' name charset)."""
    name = re.sub(r"[^a-zA-Z0-9_]", "_", counter)
    return prefix + re.sub(r"_+", "_", name).strip("_")


#: p2p.stats() entries that are gauges, not counters (peerd/p2p.py).
P2P_GAUGES = {
    "peers_connected": "Peers with an open libp2p connection.",
    "inbound_streams_open": "Inbound libp2p streams open now.",
    "dht_routing_table": "Entries in the DHT routing table.",
}


def histogram(
    name: str, doc: str, values: Iterable[float], buckets: tuple[float, ...]
) -> HistogramMetricFamily:
    vals = sorted(values)
    cumulative = [(repr(b), float(sum(1 for v in vals if v <= b))) for b in buckets]
    cumulative.append(("+Inf", float(len(vals))))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=float(sum(vals)))


_SHARD_WALL = re.compile(r"^shard-\d+\.wall_seconds$")


def shard_run_times(store: Store) -> list[float]:
    """Each shard's job wall time, from the results of plain tasks submitted here (the
    ``shard-<i>.wall_seconds`` metric each contractor reports in its signed result)."""
    out: list[float] = []
    for task in store.tasks(role="submitter", states=("done",)):
        metrics = (task.result or {}).get("metrics") or {}
        if not isinstance(metrics, dict):
            continue
        out += [
            float(v)
            for k, v in metrics.items()
            if _SHARD_WALL.match(k) and isinstance(v, int | float) and not isinstance(v, bool) and v >= 0
        ]
    return out


def task_timings(store: Store) -> tuple[list[float], list[float]]:
    """(award latencies, round times) in seconds, from the events of tasks submitted here."""
    events = store.submitted_events("awarded ", "round ")
    awards: list[float] = []
    rounds: list[float] = []
    last: dict[str, float] = {}  # task → time of its first award, then of its last certificate
    seen_rounds: set[tuple[str, int]] = set()
    for event, created_at in events:
        task_id, at, message = event.task_id, event.at, event.message
        if _AWARDED.match(message):
            if task_id not in last:
                awards.append(max(0.0, at - created_at))
                last[task_id] = at
            continue
        m = _CERTIFIED.match(message)
        if m and task_id in last and (task_id, int(m.group(1))) not in seen_rounds:
            seen_rounds.add((task_id, int(m.group(1))))
            rounds.append(max(0.0, at - last[task_id]))
            last[task_id] = at
    return awards, rounds


class NodeCollector:
    """Reads the daemon's state at each scrape (a ``prometheus_client`` custom collector)."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        for name, value in node.counters.snapshot().items():
            c = CounterMetricFamily(metric_name(name), f"peerd counter {name} (docs/metrics.md).")
            c.add_metric([], value)
            yield c
        for name, value in node.p2p.stats().items():
            if name in P2P_GAUGES:
                g = GaugeMetricFamily(metric_name(name, "peerd_p2p_"), P2P_GAUGES[name])
                g.add_metric([], value)
                yield g
            else:
                c = CounterMetricFamily(metric_name(name, "peerd_p2p_"), f"libp2p counter {name}.")
                c.add_metric([], value)
                yield c
        yield from self._gauges()
        awards, rounds = task_timings(node.store)
        yield histogram(
            "peerd_award_latency_seconds",
            "Time from submit to the first award, tasks submitted here.",
            awards,
            AWARD_BUCKETS,
        )
        yield histogram(
            "peerd_shard_run_seconds",
            "Wall time of each shard's job, as its contractor reported it, plain tasks submitted here.",
            shard_run_times(node.store),
            ROUND_BUCKETS,
        )
        yield histogram(
            "peerd_round_seconds",
            "Time from the award or the previous certificate to a round's certificate.",
            rounds,
            ROUND_BUCKETS,
        )

    def _gauges(self) -> Iterator[Metric]:
        node = self.node
        now = wall_ms()
        alive = node.table.alive(now)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            return g

        yield gauge(
            "peerd_peers_known", "Peers with an unexpired, verified advert (self included).", len(alive)
        )
        yield gauge(
            "peerd_peers_connected", "Peers with an open libp2p connection.", len(node.p2p.connected_peers())
        )
        tasks = GaugeMetricFamily(
            "peerd_tasks", "Tasks in the store by role and state.", labels=["role", "state"]
        )
        counts: dict[tuple[str, str], int] = {
            (role, st): 0 for role in ("submitter", "worker") for st in TASK_STATES
        }
        counts.update(node.store.task_counts())
        for (role, st), n in sorted(counts.items()):
            tasks.add_metric([role, st], n)
        yield tasks
        slots = node.pool.slots()
        yield gauge(
            "peerd_worker_slots", "Worker slots this node offers (one per GPU, or one for the CPU).", slots
        )
        yield gauge(
            "peerd_worker_jobs", "Jobs running or queued in the worker pool.", round(node.pool.load() * slots)
        )
        yield gauge("peerd_load", "This node's load L as advertised (docs/allocation.md).", node.load())
        me = node.table.get(node.peer_id, now)
        own_age = GaugeMetricFamily("peerd_advert_age_seconds", "Age of this node's own current advert.")
        if me is not None:
            own_age.add_metric([], max(0, now - me.advert.issued_at) / 1000)
        yield own_age
        yield gauge(
            "peerd_peers_advert_age_max_seconds",
            "Age of the oldest unexpired advert in the peer table.",
            max((max(0, now - e.advert.issued_at) / 1000 for e in alive), default=0.0),
        )


def registry_for(node: Node) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    return registry


class MetricsError(Exception):
    """The metrics endpoint cannot start (its address is taken or not ours); names the key."""


def _response(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class MetricsService:
    """``GET /metrics`` on ``listen`` ("host:port"), in the daemon's nursery."""

    def __init__(self, listen: str, node: Node) -> None:
        self.host, self.port = split_host_port(listen)
        self.registry = registry_for(node)
        self.limiter = trio.CapacityLimiter(MAX_CLIENTS)
        #: (host, port) actually bound; known once started (port 0 picks a free one).
        self.address: tuple[str, int] | None = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        except OSError as exc:
            raise MetricsError(
                f"metrics.listen: cannot listen on {self.host}:{self.port}: {exc.strerror or exc}"
            ) from None
        sockname = listeners[0].socket.getsockname()
        self.address = (sockname[0], sockname[1])
        log.info("metrics on http://%s:%d/metrics", *self.address)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._serve, listeners)
            task_status.started(self.address)

    async def _serve(self, stream: trio.SocketStream) -> None:
        try:
            async with self.limiter:
                await self._one(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # the scraper went away: nothing to answer
        finally:
            await trio.aclose_forcefully(stream)

    async def _one(self, stream: trio.SocketStream) -> None:
        head = b""
        with trio.move_on_after(HEAD_TIMEOUT_S):
            while b"\r\n\r\n" not in head and b"\n\n" not in head and len(head) <= MAX_HEAD:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                head += chunk
        line = head.split(b"\n", 1)[0].strip()
        parts = line.split(b" ")
        if len(head) > MAX_HEAD:
            reply = _response("431 Request Header Fields Too Large", b"request head too large\n")
        elif len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            reply = _response("400 Bad Request", b"bad request\n")
        elif parts[0] not in (b"GET", b"HEAD"):
            reply = _response("405 Method Not Allowed", b"only GET\n")
        elif parts[1].split(b"?", 1)[0] == b"/metrics":
            reply = _response("200 OK", self.render(), CONTENT_TYPE_LATEST)
        elif parts[1] == b"/":
            reply = _response("200 OK", b"peerd metrics: /metrics\n")
        else:
            reply = _response("404 Not Found", b"not found; try /metrics\n")
        if parts[0] == b"HEAD":
            reply = reply.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
        await stream.send_all(reply)
        await stream.send_eof()
        drained = 0
        with trio.move_on_after(LINGER_S):
            while drained < LINGER_BYTES:
                chunk = await stream.receive_some(16384)
                if not chunk:
                    break
                drained += len(chunk)


__all__ = [
    "MetricsError",
    "MetricsService",
    "NodeCollector",
    "metric_name",
    "registry_for",
    "shard_run_times",
    "task_timings",
]
