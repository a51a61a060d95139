"""The daemon's side of the local JSON-RPC API (docs/rpc.md is the contract).

Handlers are plain async functions bound by name to :data:`peerd.rpc.CONTRACT`, which
carries each method's permission and params schema; this module only turns daemon state
into the documented JSON shapes.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import trio

from peerd import __version__
from peerd.adverts import AdvertService
from peerd.inbox import wall_ms
from peerd.node import Node
from peerd.records import TaskRecord
from peerd.reputation import PeerTrust
from peerd.rpc import PEERS_PAGE_DEFAULT
from peerd.rpc.jsonrpc import ErrorCode, RpcError
from peerd.rpc.server import CallContext, Handler
from peerd.submitter import TERMINAL, SubmitError, Submitter
from peerd.taskbook import TaskBook, TaskView
from protocol.allocation import demand
from protocol.awards import allocate, net_params, usable_bids
from protocol.errors import ProtocolError

#: Shard states that are final, and what a shard still open shows once its task has ended
#: ("stopped": the task failed, this shard did not finish, and is not the one to blame).
SHARD_FINAL = frozenset({"done", "failed", "cancelled", "stopped"})
SHARD_END = {"done": "done", "cancelled": "cancelled", "failed": "stopped"}

#: Largest chunk ``blob.read`` returns (JSON + base64 keeps replies under the 1 MiB line cap).
MAX_READ = 512 * 1024


class Api:
    def __init__(
        self, node: Node, book: TaskBook, submitter: Submitter, adverts: AdvertService, started_at: float
    ) -> None:
        self.node = node
        self.book = book
        self.submitter = submitter
        self.adverts = adverts
        self.started_at = started_at

    def handlers(self) -> dict[str, Handler]:
        return {
            "node.info": self.node_info,
            "peers.list": self.peers_list,
            "network.connect": self.network_connect,
            "task.submit": self.task_submit,
            "task.list": self.task_list,
            "task.get": self.task_get,
            "task.watch": self.task_watch,
            "task.cancel": self.task_cancel,
            "task.explain": self.task_explain,
            "task.bundle": self.task_bundle,
            "blob.read": self.blob_read,
            "peer.ban": self.peer_ban,
            "peer.unban": self.peer_unban,
        }

    # -- node ---------------------------------------------------------------------------
    async def node_info(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        now = wall_ms()
        me = self.node.table.get(self.node.peer_id, now)
        report = self.node.pool.sandbox_report
        counters = {
            **self.node.counters.snapshot(),
            **{f"p2p.{k}": v for k, v in self.node.p2p.stats().items()},
        }
        return {
            "peer_id": self.node.peer_id,
            "version": __version__,
            "listen_addrs": self.node.p2p.listen_addrs(),
            "connected_peers": len(self.node.p2p.connected_peers()),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
            "advert": me.to_json(now) if me else None,
            "counters": counters,
            "sandbox": {
                "available": bool(report.available),
                "detail": report.reason
                or f"{report.version}; memory cap {report.memory_cap}; pids cap {report.pids_cap}",
            },
        }

    async def peers_list(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        # One page, sorted by peer ID (docs/rpc.md): a whole table of free identities in one
        # reply once took 6.9 MB and 1.4 s (issue 11). One extra entry tells whether more follow.
        now = wall_ms()
        limit = params.get("limit", PEERS_PAGE_DEFAULT)
        entries = self.node.table.alive(now, after=params.get("after"), limit=limit + 1)
        page = entries[:limit]
        rep = getattr(self.submitter, "reputation", None)  # None: a node without a submitter role
        return {
            # "trust": what this node has seen the peer deliver (peerd/reputation.py), or null.
            "peers": [
                {
                    **e.to_json(now),
                    "trust": _trust(rep and rep.get(e.peer_id, now)),
                    "rtt_ms": _rtt_ms(None if e.is_self else self.node.p2p.round_trip_s(e.peer_id)),
                }
                for e in page
            ],
            "next": page[-1].peer_id if len(entries) > limit else None,
        }

    # -- trust (docs/allocation.md "Caps") --------------------------------------------
    async def peer_ban(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        peer = params["peer_id"]
        changed = self.submitter.reputation.ban(peer, params.get("reason") or "by hand", wall_ms())
        self.submitter.refresh_trust()
        return {"peer_id": peer, "banned": True, "changed": changed}

    async def peer_unban(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        peer = params["peer_id"]
        changed = self.submitter.reputation.unban(peer, wall_ms())
        self.submitter.refresh_trust()
        return {"peer_id": peer, "banned": False, "changed": changed}

    async def network_connect(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        try:
            peer = await self.node.p2p.connect(params["addr"])
        except ProtocolError as exc:
            raise RpcError(ErrorCode.UNAVAILABLE, f"cannot connect to {params['addr']}: {exc}") from None
        return {"peer_id": peer}

    # -- tasks --------------------------------------------------------------------------
    async def task_submit(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        try:
            task_id = await self.submitter.submit(params["spec"])
        except SubmitError as exc:
            raise RpcError(ErrorCode.INVALID_PARAMS, f"invalid task spec: {exc}") from None
        return {"task_id": task_id}

    def _row(self, task_id: str) -> TaskRecord:
        row = self.node.store.task(task_id)
        if row is None:
            raise RpcError(ErrorCode.NOT_FOUND, f"no task {task_id}")
        return row

    async def task_list(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        out = []
        for row in self.node.store.tasks():
            out.append(
                {
                    "task_id": row.task_id,
                    "name": row.spec.get("name", ""),
                    "role": row.role,
                    "kind": row.kind,
                    "state": row.state,
                    "created_at": row.created_at,
                    "updated_at": row.updated_at,
                    "shards": len(self.node.store.shards(row.task_id)),
                    "reason": row.reason,
                }
            )
        return {"tasks": out}

    def task_json(self, task_id: str) -> dict[str, Any]:
        row = self._row(task_id)
        spec = {k: v for k, v in row.spec.items() if k != "input_refs"}
        view = self.book.get(task_id)
        shards = []
        for s in self.node.store.shards(task_id):
            lease = view.lease_states.get((s.peer_id, s.shard)) if view else None
            shard_state = s.state if s.state == "done" else (lease or s.state)
            if row.state in TERMINAL and shard_state not in SHARD_FINAL:
                # A task that ended ended its shards with it (docs/rpc.md, task.get): no
                # "awarded" or "running" left behind on a cancelled or finished task.
                shard_state = SHARD_END[row.state]
            shards.append(
                {
                    "index": s.shard,
                    "peer_id": s.peer_id,
                    "state": shard_state,
                    "share": s.share,
                    "attempts": s.attempts,
                    "epoch": s.epoch,
                }
            )
        dem = None
        under = None
        if view is not None:
            dem = demand(view.announce.work, view.announce.deadline_ms / 1000)
            aw = view.latest_award()
            under = aw.under_capacity if aw else None
        return {
            "task_id": task_id,
            "name": spec.get("name", ""),
            "role": row.role,
            "submitter": row.submitter,
            "kind": row.kind,
            "state": row.state,
            "reason": row.reason,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "deadline_at": row.deadline_at,
            # A spot check's salt is secret until the task ends (SPEC §7.10); then the result shows it.
            "spec": {k: v for k, v in spec.items() if k != "spot_salt"} if row.role == "submitter" else None,
            "demand": dem,
            "under_capacity": under,
            "shards": shards,
            "rounds": self.node.store.rounds(task_id),
            "result": row.result,
            "events": [
                {"at": e.at, "state": e.state, "message": e.message} for e in self.node.store.events(task_id)
            ],
        }

    async def task_get(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        return self.task_json(params["task_id"])

    async def task_watch(self, params: dict[str, Any], ctx: CallContext) -> None:
        task_id = params["task_id"]
        task = self.task_json(task_id)
        send, recv = trio.open_memory_channel[dict[str, Any]](256)
        self.node.watchers.setdefault(task_id, set()).add(send)
        try:
            await ctx.reply(task)
            state = task["state"]
            while state not in TERMINAL:
                with trio.move_on_after(2.0):
                    event = await recv.receive()
                    await ctx.notify("task.event", event)
                state = self._row(task_id).state
            await ctx.notify("task.end", {"task": self.task_json(task_id)})
        finally:
            self.node.watchers.get(task_id, set()).discard(send)

    async def task_cancel(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        task_id = params["task_id"]
        row = self._row(task_id)
        if row.role == "submitter" and row.state in TERMINAL:
            # docs/rpc.md: cancelling a task that already ended is a conflict, and says how it ended.
            raise RpcError(
                ErrorCode.CONFLICT, f"task {task_id} already ended: {row.state}", {"state": row.state}
            )
        try:
            state = await self.submitter.cancel(task_id)
        except KeyError:
            raise RpcError(ErrorCode.CONFLICT, "only the submitting daemon can cancel a task") from None
        return {"task_id": task_id, "state": state}

    async def task_explain(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        task_id = params["task_id"]
        self._row(task_id)
        view = self.book.get(task_id)
        if view is None:
            raise RpcError(ErrorCode.NOT_FOUND, f"task {task_id} has no announce here")
        driver = self.submitter.drivers.get(task_id)
        machine = getattr(driver, "machine", None)
        # Why each excluded peer lost its shard, as the machine recorded it (a lost lease, an
        # ok = false result, a refused result, an overdue hold: docs/tasks.md).
        failures: dict[int, dict[str, str]] = getattr(machine, "failures", {})
        excluded_why = {peer: why for by in failures.values() for peer, why in by.items()}
        return explain(self.node, view, getattr(machine, "cap_why", {}), excluded_why)

    async def task_bundle(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        from peerd.bundle import bundle_files

        task_id = params["task_id"]
        row = self._row(task_id)
        if row.state != "done":
            raise RpcError(ErrorCode.CONFLICT, f"task {task_id} is {row.state}, not done")
        files = await trio.to_thread.run_sync(bundle_files, self.node, task_id)
        return {"files": files}

    async def blob_read(self, params: dict[str, Any], ctx: CallContext) -> dict[str, Any]:
        digest, offset, length = params["sha256"], params["offset"], min(params["length"], MAX_READ)
        if not self.node.blobs.has(digest):
            raise RpcError(ErrorCode.NOT_FOUND, f"no blob {digest}")
        path = self.node.blobs.path(digest)

        def read() -> tuple[bytes, int]:
            with open(path, "rb") as fh:
                fh.seek(offset)
                return fh.read(length), path.stat().st_size

        data, size = await trio.to_thread.run_sync(read)
        return {"data_b64": base64.b64encode(data).decode(), "eof": offset + len(data) >= size}


#: A capped bid whose reason the submitter's machine no longer holds (it restarted).
NO_CAP_WHY = "capped by the submitter (its reason is not kept across a restart)"


def _rtt_ms(seconds: float | None) -> float | None:
    """Measured here (the muxer's pings), not claimed by the peer; null when not connected or
    not measured yet."""
    return None if seconds is None else round(seconds * 1000, 2)


def _trust(view: PeerTrust | None) -> dict[str, Any] | None:
    return None if view is None else view.to_json()


def explain(
    node: Node, view: TaskView, cap_why: Any = None, excluded_why: dict[str, str] | None = None
) -> dict[str, Any]:
    """Every bid with its C, L, cost and why it was or was not chosen (docs/design.md §4);
    a capped bid also says its cap and why (``cap_why``: the submitter's machine's reasons;
    docs/allocation.md "Caps")."""
    bids = []
    for r in node.store.bids(view.task_id):
        s = node.inbox.verify_embedded(r.raw, kinds=frozenset({"bid"}))
        if s is not None:
            bids.append(s)
    award = view.latest_award()
    if award is not None:
        listed = [node.inbox.verify_embedded(raw, kinds=frozenset({"bid"})) for raw in award.bids]
        bids = [b for b in listed if b is not None] or bids
    usable = usable_bids(view.announce, bids)
    ann = view.announce
    params = net_params(ann.net)
    out: dict[str, Any] = {
        "task_id": view.task_id,
        "demand": demand(ann.work, ann.deadline_ms / 1000),
        "work": ann.work,
        "deadline_s": ann.deadline_ms / 1000,
        "params": {
            "k": params.k,
            "dc_min": params.dc_min,
            "dc_max": None if params.dc_max == float("inf") else params.dc_max,
        },
        "max_shards": ann.max_shards,
        "bids": [],
        "under_capacity": None,
        "total_capacity": 0.0,
        "total_cost": 0.0,
    }
    if not usable:
        return out
    caps = award.caps if award is not None else None
    alloc = allocate(ann, usable, caps)
    holders = {a["peer_id"] for a in view.assignments()}
    out.update(
        under_capacity=alloc.under_capacity, total_capacity=alloc.total_capacity, total_cost=alloc.total_cost
    )
    for sb in alloc.scored:
        why = alloc.reasons.get(sb.peer_id, "")
        if award is not None and award.epoch > 0 and sb.peer_id in award.excluded:
            # Unknown after a restart: the machine's record of failures lives in memory.
            reason = (excluded_why or {}).get(sb.peer_id, "reason not kept across a restart")
            why += f" — later excluded: {reason}"
        out["bids"].append(
            {
                "peer_id": sb.peer_id,
                "c0": sb.c0,
                "load": sb.load,
                "delta_c": sb.delta_c,
                "capacity": sb.capacity,
                "cost": sb.cost,
                "chosen": sb.peer_id in alloc.chosen,
                "holds_shard": sb.peer_id in holders,
                "why": why,
                # The award's cap on this bid's C, when one binds (its C⁰ + ΔC is "uncapped").
                "cap": sb.cap,
                "uncapped": sb.uncapped,
                "cap_why": (cap_why or {}).get(sb.peer_id, NO_CAP_WHY) if sb.cap is not None else None,
            }
        )
    return out
