"""A WAN between the daemons of one machine's devnet: a user-space link emulator.

``scripts/devnet up N --wan`` (docs/devnet.md) starts this as one process,
``python -m peerd.wanlink DIR``, before the daemons. Why user space: the kernels these
devnets run on have no ``netem`` qdisc.

How every daemon-to-daemon byte goes through it: daemon *j* listens on a private port
``L_j`` and announces (``network.announce``, docs/config.md) only the relay port ``R_j``
that this process listens on, so identify, signed peer records, the DHT and adverts only
ever carry relay addresses; bootstrap addresses are relay addresses too. A connection
accepted on ``R_j`` is forwarded to ``L_j``. The dialling daemon *i* is found by the
socket's owner (the daemon process whose TCP socket has the connection's source address),
so each connection belongs to one link {i, j}: its delay, loss and rate, and whether a
partition cuts it.

What one direction of a link does with each chunk the relay reads (docs/devnet.md says
what this models and what it does not):

* rate: the chunk leaves after the link's previous chunk has been serialised
  (``len × 8 / rate``);
* delay: it arrives ``delay ± jitter`` (uniform) after it left, never before an earlier
  chunk of the same connection (TCP delivers in order);
* loss: each ~1448-byte segment is lost with probability ``loss``. TCP hides the loss and
  the receiver sees a stall: the bytes from the first lost segment on arrive one
  retransmission after they were due, ``max(200 ms, 2·delay + 4·jitter)`` (Linux's RTO
  floor), or one RTT after when at least three segments follow it in the same chunk (fast
  retransmit). Stalls in one flight overlap, as SACK recovers them side by side;
* partition: bytes on a cut link are held (and then no more are read, so the sender's TCP
  window fills), like a black hole; a new connection across the cut is accepted but not
  forwarded. ``heal`` releases what was held.

Control: ``DIR/wan.json`` (written by peerd.devnet) holds the link parameters, the nodes'
ports and the partition groups; SIGHUP re-reads the groups and the relay answers by
writing the file's ``generation`` to ``DIR/wan.applied``. Counters go to ``DIR/wan.stats.json``
about twice a second.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    # As in peerd/p2p.py: trio-typing's stubs shadow trio's own for mypy.
    from trio_typing import TaskStatus

#: Bytes per TCP segment on a 1500-byte MTU path (what a lost packet takes with it).
MSS = 1448
#: Linux's lower bound on the retransmission timeout (TCP_RTO_MIN).
RTO_MIN_S = 0.2
_CHUNK = 64 * 1024
#: Chunks one direction of a connection may hold; then the relay stops reading (TCP window).
_QUEUE = 64
UNKNOWN = -1


@dataclass(frozen=True)
class LinkParams:
    delay_s: float = 0.040
    jitter_s: float = 0.010
    loss: float = 0.01
    rate_bps: float = 100e6  # 0: unlimited

    def __post_init__(self) -> None:
        if not (self.delay_s >= 0 and self.jitter_s >= 0 and self.rate_bps >= 0):
            raise ValueError("delay, jitter and rate must be >= 0")
        if self.jitter_s > self.delay_s:
            raise ValueError("jitter must not exceed delay")
        if not 0 <= self.loss < 1:
            raise ValueError("loss must be in [0, 1)")

    @property
    def rtt_s(self) -> float:
        return 2 * self.delay_s

    @property
    def rto_s(self) -> float:
        return max(RTO_MIN_S, self.rtt_s + 4 * self.jitter_s)


# --- parsing the CLI's units (scripts/devnet up N --wan --delay 40ms ...) ------------------------


def parse_duration(text: str) -> float:
    """``"40ms"``, ``"0.04s"``, ``"40"`` (ms) → seconds."""
    t = text.strip().lower()
    scale = 1e-3
    if t.endswith("ms"):
        t = t[:-2]
    elif t.endswith("us"):
        t, scale = t[:-2], 1e-6
    elif t.endswith("s"):
        t, scale = t[:-1], 1.0
    value = float(t) * scale
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a duration: {text!r}")
    return value


def parse_percent(text: str) -> float:
    """``"1%"`` → 0.01; ``"0.01"`` (no %) → 0.01."""
    t = text.strip()
    value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    if not 0 <= value < 1:
        raise ValueError(f"not a loss rate in [0, 100%): {text!r}")
    return value


def parse_rate(text: str) -> float:
    """``"100mbit"``, ``"1gbit"``, ``"500kbit"``, ``"0"`` (unlimited) → bits per second."""
    t = text.strip().lower()
    scale = 1.0
    for suffix, factor in (("gbit", 1e9), ("mbit", 1e6), ("kbit", 1e3), ("bit", 1.0)):
        if t.endswith(suffix):
            t, scale = t[: -len(suffix)], factor
            break
    value = float(t) * scale
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"not a rate: {text!r}")
    return value


# --- state file -----------------------------------------------------------------------------------


def state_path(directory: Path) -> Path:
    return directory / "wan.json"


def write_state(
    directory: Path,
    params: LinkParams,
    nodes: dict[int, dict[str, int]],
    groups: list[list[int]],
    generation: int,
) -> None:
    tmp = directory / "wan.json.tmp"
    tmp.write_text(
        json.dumps(
            {
                "params": asdict(params),
                "nodes": {str(i): v for i, v in nodes.items()},
                "groups": groups,
                "generation": generation,
            }
        )
    )
    os.replace(tmp, state_path(directory))


def read_state(directory: Path) -> dict[str, Any]:
    return dict(json.loads(state_path(directory).read_text()))


# --- the relay ------------------------------------------------------------------------------------


class Links:
    """Partition state: which pairs of nodes may exchange bytes."""

    def __init__(self) -> None:
        self._group: dict[int, int] = {}
        self.changed = trio.Event()

    def set_groups(self, groups: list[list[int]]) -> None:
        self._group = {n: g for g, members in enumerate(groups) for n in members}
        self.changed.set()
        self.changed = trio.Event()

    def up(self, a: int, b: int) -> bool:
        if not self._group:
            return True
        # Nodes no group names form one more group; an unidentified dialler is cut off.
        if a == UNKNOWN or b == UNKNOWN:
            return False
        return self._group.get(a, -1) == self._group.get(b, -1)

    async def wait_up(self, a: int, b: int) -> None:
        while not self.up(a, b):
            await self.changed.wait()


class Relay:
    def __init__(self, directory: Path, *, seed: int | None = None) -> None:
        self.dir = directory
        state = read_state(directory)
        self.params = LinkParams(**state["params"])
        self.nodes = {int(i): v for i, v in state["nodes"].items()}
        self.links = Links()
        self.links.set_groups(state["groups"])
        self._rng = random.Random(seed)
        self._tx_free: dict[tuple[int, int], float] = {}
        self.stats: dict[str, Any] = {
            "connections": {},
            "bytes": {},
            "segments_lost": 0,
            "unknown_sources": 0,
            "held_now": 0,
        }
        self._stats_dirty = True

    # -- who dialled -----------------------------------------------------------------------------
    def _pid(self, i: int) -> int | None:
        try:
            return int((self.dir / f"node-{i}" / "peerd.pid").read_text())
        except (OSError, ValueError):
            return None

    def owner(self, addr: tuple[str, int]) -> int:
        """The node whose daemon holds the TCP socket bound to ``addr`` (a relay client's source)."""
        import psutil

        for i in self.nodes:
            pid = self._pid(i)
            if pid is None:
                continue
            try:
                conns = psutil.Process(pid).net_connections(kind="tcp")
            except (psutil.Error, OSError):
                continue
            if any(c.laddr and (c.laddr.ip, c.laddr.port) == addr for c in conns):
                return i
        return UNKNOWN

    async def _identify(self, addr: tuple[str, int]) -> int:
        for _ in range(5):
            who = await trio.to_thread.run_sync(self.owner, addr)
            if who != UNKNOWN:
                return who
            await trio.sleep(0.02)
        self.stats["unknown_sources"] += 1
        return UNKNOWN

    # -- one link direction ----------------------------------------------------------------------
    def schedule(self, data: bytes, now: float, a: int, b: int, last: float) -> list[tuple[float, bytes]]:
        """When each part of ``data`` (read at ``now`` on a→b) is delivered; see the module doc."""
        p = self.params
        key = (a, b)
        tx = max(now, self._tx_free.get(key, now))
        if p.rate_bps > 0:
            tx += len(data) * 8 / p.rate_bps
        self._tx_free[key] = tx
        due = tx + p.delay_s + (self._rng.uniform(-p.jitter_s, p.jitter_s) if p.jitter_s else 0.0)
        arrive = max(due, last)
        if p.loss <= 0:
            return [(arrive, data)]
        nseg = -(-len(data) // MSS)
        for k in range(nseg):
            if self._rng.random() < p.loss:
                self.stats["segments_lost"] += 1
                penalty = p.rtt_s if nseg - k - 1 >= 3 else p.rto_s
                cut = k * MSS
                head = [(arrive, data[:cut])] if cut else []
                # One recovery after the segment was *due*, not after an earlier stall ended:
                # losses in one flight are retransmitted side by side (SACK), so a burst with
                # several losses stalls about once, not once per loss.
                return [*head, (max(due + penalty, arrive), data[cut:])]
        return [(arrive, data)]

    async def _pipe(
        self,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        a: int,
        b: int,
        cancel: trio.CancelScope,
    ) -> None:
        send, recv = trio.open_memory_channel[tuple[float, bytes]](_QUEUE)
        name = f"{a}>{b}"
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._deliver, recv, dst, a, b, name)
                last = 0.0
                async with send:
                    while True:
                        data = await src.receive_some(_CHUNK)
                        if not data:
                            break
                        for t, piece in self.schedule(data, trio.current_time(), a, b, last):
                            last = t
                            await send.send((t, piece))
        except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            cancel.cancel()

    async def _deliver(
        self,
        recv: trio.MemoryReceiveChannel[tuple[float, bytes]],
        dst: trio.SocketStream,
        a: int,
        b: int,
        name: str,
    ) -> None:
        async with recv:
            async for t, piece in recv:
                await trio.sleep_until(t)
                if not self.links.up(a, b):
                    self.stats["held_now"] += 1
                    self._stats_dirty = True
                    try:
                        await self.links.wait_up(a, b)
                    finally:
                        self.stats["held_now"] -= 1
                await dst.send_all(piece)
                self.stats["bytes"][name] = self.stats["bytes"].get(name, 0) + len(piece)
                self._stats_dirty = True
        await dst.send_eof()

    async def _serve(self, target: int, client: trio.SocketStream) -> None:
        async with client:
            peer = client.socket.getpeername()
            src = await self._identify((str(peer[0]), int(peer[1])))
            pair = f"{src}>{target}"
            self.stats["connections"][pair] = self.stats["connections"].get(pair, 0) + 1
            self._stats_dirty = True
            # A cut link drops the SYN: nothing reaches the daemon until the link is up again.
            await self.links.wait_up(src, target)
            try:
                upstream = await trio.open_tcp_stream("127.0.0.1", self.nodes[target]["daemon"])
            except OSError:
                return
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, upstream, src, target, nursery.cancel_scope)
                nursery.start_soon(self._pipe, upstream, client, target, src, nursery.cancel_scope)

    async def _listen(self, target: int, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.nodes[target]["relay"], host="127.0.0.1")
        task_status.started()

        async def handler(stream: trio.SocketStream) -> None:
            try:
                await self._serve(target, stream)
            except* (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # one side went away: the other is closed with it

        await trio.serve_listeners(handler, listeners)

    async def _control(self) -> None:
        with trio.open_signal_receiver(signal.SIGHUP) as signals:
            async for _ in signals:
                try:
                    state = read_state(self.dir)
                    self.links.set_groups(state["groups"])
                    (self.dir / "wan.applied").write_text(str(state["generation"]))
                except (OSError, ValueError, KeyError) as exc:
                    print(f"wanlink: bad {state_path(self.dir)}: {exc!r}", file=sys.stderr, flush=True)

    async def _write_stats(self) -> None:
        path, tmp = self.dir / "wan.stats.json", self.dir / "wan.stats.json.tmp"
        while True:
            if self._stats_dirty:
                self._stats_dirty = False
                tmp.write_text(json.dumps(self.stats))
                os.replace(tmp, path)
            await trio.sleep(0.5)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._control)
            for i in self.nodes:
                await nursery.start(self._listen, i)
            nursery.start_soon(self._write_stats)
            (self.dir / "wan.applied").write_text(str(read_state(self.dir)["generation"]))
            (self.dir / "wan.ready").write_text(str(os.getpid()))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m peerd.wanlink DEVNET_DIR", file=sys.stderr)
        return 2
    relay = Relay(Path(args[0]))
    trio.run(relay.run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
