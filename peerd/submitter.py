"""The submitter role: announce a task, collect signed bids for one bid window, award
it by the seed's allocation formula, supervise leases (re-award lost shards), collect
results, follow the aggregation rounds, and keep the record (seed §3.2 steps 2–5).

There is no central scheduler: the submitter only coordinates its *own* task, and every
decision it makes is a signed message that any peer can re-check (``check_award``,
certificates). A restarted submitter resumes every unfinished task from the store.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import numpy as np
import trio

from peerd import kinds
from peerd.executor import Job, Limits
from peerd.inbox import wall_ms
from peerd.node import ANNOUNCE_SLACK, MAX_GOSSIP_BYTES, Node, gossip_too_large
from peerd.streams import FrameStream
from peerd.taskbook import TaskBook, TaskView
from peerd.taskspec import parse_spec
from protocol import codec
from protocol.allocation import shard_sizes
from protocol.awards import allocate, assignments_of, net_params, reassign, usable_bids
from protocol.certificate import Certificate, check_certificate
from protocol.envelope import Signed, open_envelope
from protocol.errors import ProtocolError
from protocol.messages import MAX_T_MAX, Award, Cancel, Result, TaskAnnounce

log = logging.getLogger(__name__)

TERMINAL = ("done", "failed", "cancelled")


class SubmitError(Exception):
    """The task cannot be submitted (bad spec, unreadable input); message for the user."""


class Submitter:
    def __init__(self, node: Node, book: TaskBook) -> None:
        self.node = node
        self.book = book
        self.contractor: Any = None  # set by the daemon (local bids and local announces)
        self._cancel_scopes: dict[str, trio.CancelScope] = {}

    # -- submission ---------------------------------------------------------------------
    async def submit(self, spec_obj: Any) -> str:
        try:
            spec = parse_spec(spec_obj)
        except ValueError as exc:
            raise SubmitError(str(exc)) from None
        refs: dict[str, dict[str, Any]] = {}
        for name, path in sorted(spec.inputs.items()):
            if not Path(path).is_absolute():
                # The daemon's working directory is not the caller's (docs/rpc.md: task.submit);
                # peerctl resolves paths against the spec file before sending.
                raise SubmitError(f"inputs.{name}: {path!r} is not an absolute path (the daemon reads it)")
            try:
                digest = await trio.to_thread.run_sync(self.node.blobs.put_file, Path(path))
            except OSError as exc:
                raise SubmitError(f"inputs.{name}: cannot read {path}: {exc.strerror or exc}") from None
            except ProtocolError as exc:
                raise SubmitError(f"inputs.{name}: {exc}") from None
            refs[name] = {"sha256": digest, "size": self.node.blobs.size(digest)}
        kind = kinds.get(spec.kind)
        # Split inputs are .npz files cut across the shards in proportion to C (docs/design.md
        # §4); local-only ones never leave this node (peerd/kinds.py says which are which).
        for name in kind.split_inputs:
            if name in refs:
                await trio.to_thread.run_sync(
                    self._check_npz, name, self.node.blobs.path(refs[name]["sha256"])
                )
        task_id = secrets.token_hex(16)
        cfg = self.node.config.market
        shared = {
            n: r
            for n, r in refs.items()
            if n not in kind.local_only_inputs and n not in kind.split_inputs
        }
        params = json.loads(json.dumps(spec.params))  # plain JSON types only
        dc_max = None if cfg.dc_max == float("inf") else cfg.dc_max
        net: dict[str, Any] = {"k": cfg.k, "dc_min": cfg.dc_min, "dc_max": dc_max}
        if cfg.t_max <= MAX_T_MAX:
            # market.t_max rides in the announce (SPEC §10.2): every peer recomputes the award
            # under the same bound. Unbounded (or beyond any set's cost) it is left out.
            net["t_max"] = cfg.t_max
        try:
            raw, signed = self.node.seal(
                TaskAnnounce,
                ttl_ms=int(spec.deadline_s * 1000),
                task_id=task_id,
                kind=spec.kind,
                work=spec.work,
                deadline_ms=int(spec.deadline_s * 1000),
                max_shards=spec.max_shards,
                resources={"gpu": spec.gpu, "memory_mb": spec.memory_mb},
                aggregation=spec.aggregation,
                rounds=spec.rounds,
                params=params,
                inputs=shared,
                bid_window_ms=spec.bid_window_ms or cfg.bid_window_ms,
                net=net,
            )
        except ProtocolError as exc:
            # parse_spec admits only what an announce can carry, but one limit is on the whole:
            # the signed announce is at most 64 KiB (SPEC §5), and params ride inside it.
            # Without this the caller got an internal error instead of a spec error.
            if exc.reason == "oversized":
                raise SubmitError(
                    f"params: too large for the signed announce (one gossip message, at most"
                    f" {MAX_GOSSIP_BYTES} bytes); pass big data as an input file"
                ) from None
            raise SubmitError(f"spec: cannot be announced: {exc}") from None
        # The envelope limit (64 KiB) is not the only one: the announce must fit one gossip
        # message, re-announces included. Stored and bid on locally but never published, it
        # used to wait for bids that could not come.
        too_large = gossip_too_large(raw, slack=ANNOUNCE_SLACK)
        if too_large is not None:
            raise SubmitError(
                f"params: the announce is too large to publish ({too_large}); pass big data as an input file"
            )
        msg = signed.message
        assert isinstance(msg, TaskAnnounce)
        record = spec.to_json()
        record["input_refs"] = refs
        self.node.store.add_task(
            task_id=task_id,
            role="submitter",
            submitter=self.node.peer_id,
            kind=spec.kind,
            state="bidding",
            spec=record,
            announce=raw,
            deadline_at=(msg.issued_at + msg.deadline_ms) / 1000,
            message=f"announced; bid window {msg.bid_window_ms} ms",
        )
        self.book.add(signed)  # our own: always admitted
        self.node.counters.inc("tasks.submitted")
        self.node.nursery.start_soon(self._drive, task_id)
        return task_id

    @staticmethod
    def _check_npz(name: str, path: Path) -> None:
        try:
            with np.load(path, allow_pickle=False) as z:
                if "x" not in z.files:
                    raise SubmitError(
                        f"inputs.{name}: the .npz must hold an array named x (and y for training)"
                    )
                n = len(z["x"])
                if "y" in z.files and len(z["y"]) != n:
                    raise SubmitError(f"inputs.{name}: x and y have different lengths")
        except (ValueError, OSError) as exc:
            raise SubmitError(f"inputs.{name}: not a readable .npz ({exc})") from None

    # -- bids ---------------------------------------------------------------------------
    def accept_bid(self, raw: bytes, sender: str, *, verified: Signed | None = None) -> dict[str, Any]:
        """Store a bid for one of our tasks. ``verified``: our own bid, already admitted."""
        signed = verified or self.node.inbox.admit(raw, sender=sender, kinds=frozenset({"bid"}))
        if signed is None:
            return {"ok": False, "reason": "invalid bid"}
        task_id = signed.message.task_id  # type: ignore[attr-defined]
        row = self.node.store.task(task_id)
        if row is None or row["role"] != "submitter" or row["state"] in TERMINAL:
            self.node.counters.inc("bids.unknown_task")
            return {"ok": False, "reason": "unknown task"}
        if self.node.store.add_bid(task_id, signed.signer, raw):
            self.node.counters.inc("bids.received")
        view = self.book.get(task_id)
        if view is not None:
            view.pulse()
        return {"ok": True, "reason": ""}

    async def handle_bid_stream(self, stream: FrameStream) -> None:
        with trio.move_on_after(10):
            raw = await stream.receive()
            reply = self.accept_bid(raw, stream.remote_peer)
            await stream.send(codec.pack(reply))
        await stream.aclose()

    # -- results ------------------------------------------------------------------------
    def accept_result(self, raw: bytes, sender: str) -> dict[str, Any]:
        """A contractor hands us its signed result; we store it before acknowledging."""
        try:
            signed = open_envelope(raw, kinds=frozenset({"result"}))
        except ProtocolError as exc:
            self.node.counters.inc(f"dropped.{exc.reason}")
            return {"ok": False, "reason": "invalid result"}
        msg = signed.message
        assert isinstance(msg, Result)
        if signed.signer != sender:
            self.node.counters.inc("dropped.signer_mismatch")
            return {"ok": False, "reason": "signer mismatch"}
        row = self.node.store.task(msg.task_id)
        if row is None or row["role"] != "submitter":
            return {"ok": False, "reason": "unknown task"}
        view = self.book.get(msg.task_id)
        if view is None and row["state"] not in TERMINAL:
            # Restarted, and the result came in before resume() rebuilt the view: answering
            # "unknown task" would make the contractor stop delivering it for good.
            view = self._load_view(row)
        if view is None:
            return {"ok": False, "reason": "unknown task"}
        if view.holder(msg.shard, msg.epoch) != signed.signer:
            self.node.counters.inc("dropped.not_holder")
            return {"ok": False, "reason": "not the shard's holder"}
        self.node.store.add_result(
            msg.task_id,
            msg.round,
            msg.shard,
            signed.signer,
            raw,
            seq=msg.seq,
            certified=msg.round in view.certificates,
        )
        if view.add_result(signed):
            self.node.counters.inc("results.received")
        return {"ok": True, "reason": ""}

    async def handle_result_stream(self, stream: FrameStream) -> None:
        with trio.move_on_after(15):
            raw = await stream.receive()
            reply = self.accept_result(raw, stream.remote_peer)
            await stream.send(codec.pack(reply))
        await stream.aclose()

    # -- cancel -------------------------------------------------------------------------
    async def cancel(self, task_id: str) -> str:
        row = self.node.store.task(task_id)
        if row is None or row["role"] != "submitter":
            raise KeyError(task_id)
        if row["state"] in TERMINAL:
            return str(row["state"])
        raw, signed = self.node.seal(
            Cancel, ttl_ms=3_600_000, task_id=task_id, reason="cancelled by the submitter"
        )
        view = self.book.get(task_id)
        if view is not None and self.contractor is not None:
            self.contractor.on_cancel(view, signed)
        await self.node.gossip(raw)
        self._finish(task_id, "cancelled", "cancelled by the submitter")
        scope = self._cancel_scopes.get(task_id)
        if scope is not None:
            scope.cancel()
        return "cancelled"

    # -- the task's life ------------------------------------------------------------------
    def _finish(self, task_id: str, state: str, message: str, reason: str | None = None) -> None:
        row = self.node.store.task(task_id)
        if row is None or row["state"] in TERMINAL:
            return
        self.node.store.set_state(task_id, state, message, reason=reason)
        self.node.counters.inc(f"tasks.{state}")
        self.node.emit(
            task_id,
            {"task_id": task_id, "state": state, "message": message, "at": time.time(), "final": True},
        )
        view = self.book.get(task_id)
        if view is not None:
            view.pulse()

    def _state(self, task_id: str, state: str, message: str, reason: str | None = None) -> None:
        row = self.node.store.task(task_id)
        if row is None or row["state"] in TERMINAL:
            return
        self.node.store.set_state(task_id, state, message, reason=reason)
        self.node.emit(task_id, {"task_id": task_id, "state": state, "message": message, "at": time.time()})

    def resume(self) -> None:
        """After a restart: rebuild views of our unfinished tasks and drive them again."""
        for row in self.node.store.tasks(role="submitter"):
            if row["state"] in TERMINAL:
                continue
            if self._load_view(row) is None:
                continue
            self.node.store.add_event(row["task_id"], row["state"], "submitter restarted; resuming")
            self.node.nursery.start_soon(self._drive, row["task_id"])

    def _load_view(self, row: Any) -> TaskView | None:
        """The in-memory view of one of our tasks, rebuilt from the store (idempotent)."""
        signed = self.node.inbox.verify_embedded(bytes(row["announce"]), kinds=frozenset({"announce"}))
        if signed is None:
            return None
        view = self.book.add(signed)
        if view is None:
            return None
        for aw in self.node.store.awards(row["task_id"]):
            s = self.node.inbox.verify_embedded(bytes(aw["raw"]), kinds=frozenset({"award"}))
            if s is not None:
                view.awards[s.message.epoch] = s  # type: ignore[attr-defined]
        for r in self.node.store.results(row["task_id"]):
            s = self.node.inbox.verify_embedded(bytes(r["raw"]), kinds=frozenset({"result"}))
            if s is not None:
                view.add_result(s)
        for rnd in range(1, view.announce.rounds + 1):
            if rnd in view.certificates:
                continue
            cert = self.node.store.certificate(row["task_id"], rnd)
            if cert is None:
                break
            try:
                view.certificates[rnd] = check_certificate(cert[1], task_id=row["task_id"], round_no=rnd)
            except ProtocolError:
                break
        return view

    async def _drive(self, task_id: str) -> None:
        view = self.book.get(task_id)
        row = self.node.store.task(task_id)
        if view is None or row is None:
            return
        ann = view.announce
        deadline = trio.current_time() + max(0.0, (ann.issued_at + ann.deadline_ms - wall_ms()) / 1000)
        with trio.CancelScope(deadline=deadline) as scope:
            self._cancel_scopes[task_id] = scope
            try:
                if view.latest_award() is None:
                    await self._bidding(view)
                await self._supervise(view)
            except Exception as exc:
                log.exception("task %s failed in the submitter", task_id)
                self._finish(task_id, "failed", f"internal error: {exc}", reason="internal")
        self._cancel_scopes.pop(task_id, None)
        if scope.cancelled_caught:
            row = self.node.store.task(task_id)
            if row is not None and row["state"] not in TERMINAL:
                reason = row["reason"] or "no result before the deadline"
                self._finish(task_id, "failed", f"deadline passed: {reason}", reason="deadline")

    async def _announce(self, view: TaskView, *, fresh: bool) -> None:
        raw = view.announce_raw
        if fresh:
            # Gossip drops bytes it has seen in the last 120 s: a re-announce must be a
            # new message (new sequence), with the same task fields.
            a = view.announce
            raw, _ = self.node.seal(
                TaskAnnounce,
                ttl_ms=a.expires_at - wall_ms(),
                **{
                    k: getattr(a, k)
                    for k in (
                        "task_id",
                        "kind",
                        "work",
                        "deadline_ms",
                        "max_shards",
                        "resources",
                        "aggregation",
                        "rounds",
                        "params",
                        "inputs",
                        "bid_window_ms",
                        "net",
                    )
                },
            )
        await self.node.gossip(raw)
        if self.contractor is not None:
            await self.contractor.on_announce(view)

    def _stored_bids(self, view: TaskView) -> list[Signed]:
        bids = []
        for r in self.node.store.bids(view.task_id):
            s = self.node.inbox.verify_embedded(bytes(r["raw"]), kinds=frozenset({"bid"}))
            if s is not None:
                bids.append(s)
        return usable_bids(view.announce, bids)

    async def _collect_bids(self, view: TaskView, *, fresh: bool) -> list[Signed]:
        await self._announce(view, fresh=fresh)
        await trio.sleep(view.announce.bid_window_ms / 1000)
        return self._stored_bids(view)

    async def _bidding(self, view: TaskView) -> None:
        attempt = 0
        bids = await self._collect_bids(view, fresh=False)
        while not bids:
            attempt += 1
            known = len(self.node.table.alive(wall_ms()))
            self._state(
                view.task_id,
                "pending",
                f"no eligible bids yet ({known} peers known); waiting, then re-announcing",
                reason="no eligible peer has bid (kind, resources, policy or sandbox)",
            )
            # A bid that arrives just after a short window is taken at once (a bid's
            # round trip is ~45 ms here): wait for one during the back-off rather than
            # sleeping through it, and re-announce only if none came.
            with trio.move_on_after(min(2.0 * attempt, 10.0)):
                while not (bids := self._stored_bids(view)):
                    await view.wait_changed(1.0)
            if not bids:
                bids = await self._collect_bids(view, fresh=True)
        alloc = allocate(view.announce, bids)
        assignments = assignments_of(alloc)
        await self._split_inputs(view, assignments)
        raw, signed = self.node.seal(
            Award,
            ttl_ms=Award.MAX_TTL_MS,
            task_id=view.task_id,
            epoch=0,
            bids=[b.raw for b in bids],
            assignments=assignments,
            under_capacity=alloc.under_capacity,
            excluded=[],
        )
        self.node.store.add_award(view.task_id, 0, raw, assignments)
        view.awards[0] = signed
        chosen = ", ".join(p[-8:] for p in alloc.chosen)
        note = " (under capacity: no set of bids covers R)" if alloc.under_capacity else ""
        self._state(view.task_id, "running", f"awarded {len(assignments)} shard(s) to {chosen}{note}")
        await self.node.gossip(raw)
        if self.contractor is not None:
            self.contractor.on_award(view)

    async def _split_inputs(self, view: TaskView, assignments: list[dict[str, Any]]) -> None:
        """Split the data across shards in proportion to each node's C (docs/design.md §4)."""
        row = self.node.store.task(view.task_id)
        assert row is not None
        refs = json.loads(row["spec"])["input_refs"]
        for name in kinds.get(view.announce.kind).split_inputs:
            if name not in refs:
                continue
            path = self.node.blobs.path(refs[name]["sha256"])
            shares = [a["share"] for a in assignments]
            seed = int(view.announce.params.get("seed", 0))
            parts = await trio.to_thread.run_sync(_split_npz, path, shares, seed)
            for a, data in zip(assignments, parts, strict=True):
                digest = await trio.to_thread.run_sync(self.node.blobs.put_bytes, data)
                a["inputs"][name] = {"sha256": digest, "size": len(data)}

    async def _supervise(self, view: TaskView) -> None:
        ann = view.announce
        market = self.node.config.market
        # Heartbeats seen before a restart are unknown: give every holder a full TTL.
        start = trio.current_time()
        heard_network = False
        reported_rounds: set[int] = set()
        while True:
            if view.cancelled:
                return
            row = self.node.store.task(view.task_id)
            if row is None or row["state"] in TERMINAL:
                return
            if ann.aggregation == "none":
                if await self._check_plain_results(view):
                    return
            else:
                for rnd in sorted(view.certificates):
                    if rnd not in reported_rounds:
                        reported_rounds.add(rnd)
                        await self._on_round_certified(view, rnd)
                if ann.rounds in view.certificates:
                    await self._complete_rounds(view)
                    return
                failed = self._failed_shards(view)
                if failed and len(failed) == len(view.assignments()):
                    self._finish(
                        view.task_id, "failed", f"every shard failed: {failed[0]}", reason="shards_failed"
                    )
                    return
            now = trio.current_time()
            if not heard_network:
                if self.node.p2p.connected_peers():
                    heard_network = True
                else:
                    # Just restarted and nobody has reconnected yet (the other peers redial us
                    # with back-off): no lease could have reached us, so the TTL starts once
                    # one can. Otherwise every holder was "lost" when the back-off outlasted it.
                    start = now
            lost = set()
            for a in view.assignments():
                peer = a["peer_id"]
                if self._shard_finished(view, a["shard"]):
                    continue
                last = max(view.heartbeats.get(peer, start), start)
                if now - last > market.lease_ttl_s:
                    lost.add(peer)
            if lost:
                await self._reaward(view, lost)
            await view.wait_changed(min(1.0, market.heartbeat_s))

    def _shard_finished(self, view: TaskView, shard: int) -> bool:
        if view.announce.aggregation == "none":
            return any(shard in by for by in view.results.values())
        return view.lease_states.get((view.holder(shard) or "", shard)) in ("done",)

    def _failed_shards(self, view: TaskView) -> list[str]:
        out = []
        for by_shard in view.results.values():
            for sv in by_shard.values():
                msg = sv.message
                assert isinstance(msg, Result)
                if not msg.ok:
                    out.append(f"shard {msg.shard} on {sv.signer[-8:]}: {msg.error}")
        return out

    async def _reaward(self, view: TaskView, lost: set[str]) -> None:
        award = view.latest_award()
        assert award is not None
        bids = [
            b
            for r in self.node.store.bids(view.task_id)
            if (b := self.node.inbox.verify_embedded(bytes(r["raw"]), kinds=frozenset({"bid"})))
        ]
        usable = usable_bids(view.announce, bids)
        alloc = allocate(view.announce, usable)
        costs = [(s.peer_id, s.cost) for s in alloc.scored]
        excluded = sorted(set(award.excluded) | lost)
        new = reassign(list(award.assignments), set(excluded), costs)
        if not new:
            self._state(view.task_id, "running", f"lost {len(lost)} peer(s); asking for fresh bids")
            await self._collect_bids(view, fresh=True)
            return
        epoch = award.epoch + 1
        raw, signed = self.node.seal(
            Award,
            ttl_ms=Award.MAX_TTL_MS,
            task_id=view.task_id,
            epoch=epoch,
            bids=[b.raw for b in usable],
            assignments=[{**a, "inputs": dict(a["inputs"])} for a in new],
            under_capacity=award.under_capacity,
            excluded=excluded,
        )
        self.node.store.add_award(view.task_id, epoch, raw, new)
        view.awards[epoch] = signed
        now = trio.current_time()
        for p in lost:
            view.heartbeats[p] = now  # do not re-detect before the new award lands
        before = {x["shard"]: x["peer_id"] for x in award.assignments}
        for a in new:
            if a["peer_id"] != before.get(a["shard"]):
                # A peer that just got a shard has not heartbeated it yet: a full lease TTL from
                # now. Without this its "last heartbeat" was the supervisor's start, long past, so
                # it could be declared lost at once and excluded for good.
                view.heartbeats[a["peer_id"]] = now
        moved = ", ".join(
            f"shard {a['shard']} → {a['peer_id'][-8:]}"
            for a in new
            if a["peer_id"] != dict((x["shard"], x["peer_id"]) for x in award.assignments)[a["shard"]]
        )
        self.node.counters.inc("tasks.reawarded")
        self._state(
            view.task_id,
            "running",
            f"lease lost by {', '.join(p[-8:] for p in sorted(lost))}; re-awarded {moved}",
        )
        await self.node.gossip(raw)
        if self.contractor is not None:
            self.contractor.on_award(view)

    async def _check_plain_results(self, view: TaskView) -> bool:
        """aggregation = none: done when every shard has an OK result whose outputs we hold."""
        shards = view.assignments()
        results = {}
        for by_shard in view.results.values():
            results.update(by_shard)
        for a in shards:
            sv = results.get(a["shard"])
            if sv is None:
                return False
            msg = sv.message
            assert isinstance(msg, Result)
            if not msg.ok:
                self._finish(
                    view.task_id,
                    "failed",
                    f"shard {msg.shard} failed on {sv.signer[-8:]}: {msg.error}",
                    reason=(msg.error or "failed").split(":")[0],
                )
                return True
            for ref in msg.outputs.values():
                try:
                    await self.node.fetch_from_any(ref["sha256"], [sv.signer], max_bytes=ref["size"])
                except ProtocolError as exc:
                    log.info("fetching output of %s failed: %s", view.task_id, exc)
                    return False
            self.node.store.set_shard_state(view.task_id, a["shard"], "done")
        outputs = []
        for a in shards:
            msg = results[a["shard"]].message
            assert isinstance(msg, Result)
            for name, ref in sorted(msg.outputs.items()):
                outputs.append(
                    {"name": f"shard-{a['shard']}/{name}", "sha256": ref["sha256"], "size": ref["size"]}
                )
        metrics: dict[str, float] = {}
        for a in shards:
            for k, v in results[a["shard"]].message.metrics.items():  # type: ignore[attr-defined]
                metrics[f"shard-{a['shard']}.{k}"] = v
        self.node.store.set_result(
            view.task_id, {"outputs": outputs, "metrics": metrics, "certificate": None}
        )
        self._finish(view.task_id, "done", f"{len(shards)} shard result(s) received")
        return True

    async def _on_round_certified(self, view: TaskView, rnd: int) -> None:
        cert = view.certificates[rnd]
        output = {**cert.output, "signers": list(cert.signers)}
        self.node.store.add_certificate(view.task_id, rnd, output, list(cert.votes))
        info: dict[str, Any] = {
            "round": rnd,
            # A peer holding two shards (a re-award without a spare) is listed once.
            "participants": list(dict.fromkeys(i["peer_id"] for i in cert.inputs)),
            "excluded": [dict(e) for e in cert.excluded],
            "certified": True,
            "certified_at": wall_ms() / 1000,
            "output": cert.output["sha256"],
            "signers": list(cert.signers),
        }
        # Training metrics: sample-weighted mean of the reports of the inputs the certificate
        # aggregated — not of every result seen (an excluded peer's numbers are not the model's).
        reports: list[tuple[dict[str, float], float]] = []
        for i in cert.inputs:
            sv = view.results.get(rnd, {}).get(int(i["shard"]))
            msg = sv.message if sv is not None and sv.signer == i["peer_id"] else None
            if isinstance(msg, Result) and msg.outputs.get("weights", {}).get("sha256") == i["sha256"]:
                reports.append((dict(msg.metrics), float(msg.weight)))
        for key in ("loss", "accuracy"):
            vals = [(m[key], w) for m, w in reports if key in m]
            total = sum(w for _, w in vals)
            if vals and total > 0:
                info[key] = sum(v * w for v, w in vals) / total
        # Keep this round's committed inputs now, while their committers are surely up:
        # the result bundle needs them for recomputation (peerctl verify).
        await self._fetch_round_inputs(view, cert)
        val = await self._evaluate(view, output, "validation")
        if val:
            info["val_loss"], info["val_accuracy"] = val.get("loss"), val.get("accuracy")
        self.node.store.set_round(view.task_id, rnd, info)
        note = f"; val accuracy {info['val_accuracy']:.4f}" if info.get("val_accuracy") is not None else ""
        self._state(
            view.task_id,
            "running" if rnd < view.announce.rounds else "aggregating",
            f"round {rnd}/{view.announce.rounds} certified by {len(cert.signers)} of "
            f"{len(cert.committee)}{note}",
        )
        self.node.emit(
            view.task_id,
            {
                "task_id": view.task_id,
                "state": "running",
                "round": rnd,
                "metrics": info,
                "message": f"round {rnd} certified",
            },
        )

    async def _fetch_round_inputs(self, view: TaskView, cert: Certificate) -> None:
        """Fetch a certified round's inputs: from each committer, else from the voters (who
        fetched them to vote). Best effort: a missing input shows up in ``peerctl verify``."""
        for i in cert.inputs:
            try:
                await self.node.fetch_from_any(i["sha256"], [i["peer_id"], *cert.signers])
            except ProtocolError as exc:
                log.info("round %d input %s… not fetched: %s", cert.round, i["sha256"][:12], exc)

    async def _evaluate(
        self, view: TaskView, output: dict[str, Any], input_name: str
    ) -> dict[str, float] | None:
        """Score a certified model on the submitter's own held-out data (local worker)."""
        row = self.node.store.task(view.task_id)
        assert row is not None
        refs = json.loads(row["spec"])["input_refs"]
        evaluate_with = kinds.get(view.announce.kind).evaluate_with
        if evaluate_with is None or input_name not in refs:
            return None
        try:
            weights = await self._fetch_certified(view, output)
            job = Job(
                job_id=f"{view.task_id}-eval-{input_name}",
                submitter=self.node.peer_id,
                kind=evaluate_with,
                params={
                    "model_config": view.announce.params["model_config"],
                    "loss": view.announce.params.get("loss", "sparse_categorical_crossentropy"),
                },
                inputs={"weights": weights, "data": self.node.blobs.path(refs[input_name]["sha256"])},
                limits=Limits(memory_bytes=self.node.config.limits.memory_mb << 20),
                trusted=True,
            )
            res = await self.node.pool.execute(job)
        except Exception as exc:
            log.warning("evaluation of %s on %s failed: %s", view.task_id, input_name, exc)
            return None
        if not res.ok:
            log.warning("evaluation of %s failed: %s %s", view.task_id, res.error, res.detail[-300:])
            return None
        return {k: float(v) for k, v in res.metrics.items()}

    async def _fetch_certified(self, view: TaskView, output: dict[str, Any]) -> Path:
        peers = output.get("signers", []) or [s for c in view.certificates.values() for s in c.signers]
        try:
            return await self.node.fetch_from_any(output["sha256"], peers, max_bytes=output["size"])
        except ProtocolError as exc:
            raise RuntimeError(f"cannot fetch the certified output: {exc}") from None

    async def _complete_rounds(self, view: TaskView) -> None:
        # A certificate that arrived while an earlier round was being evaluated has not been
        # reported yet (the supervisor checks for the last round right after reporting).
        reported = {int(r["round"]) for r in self.node.store.rounds(view.task_id)}
        for rnd in sorted(view.certificates):
            if rnd not in reported:
                await self._on_round_certified(view, rnd)
        cert = view.certificates[view.announce.rounds]
        output = {**cert.output, "signers": list(cert.signers)}
        path = await self._fetch_certified(view, output)
        # Keep every committed input of every round too: the bundle lets anyone re-check.
        for _, c in sorted(view.certificates.items()):
            await self._fetch_round_inputs(view, c)
        metrics: dict[str, float] = {}
        test = await self._evaluate(view, output, "test")
        if test:
            metrics = {f"test_{k}": v for k, v in test.items()}
        rounds = self.node.store.rounds(view.task_id)
        if rounds and rounds[-1].get("val_accuracy") is not None:
            metrics["val_accuracy"] = rounds[-1]["val_accuracy"]
        self.node.store.set_result(
            view.task_id,
            {
                "outputs": [
                    {"name": "weights", "sha256": cert.output["sha256"], "size": path.stat().st_size}
                ],
                "metrics": metrics,
                "certificate": {
                    "round": cert.round,
                    "rule": cert.rule,
                    "committee": list(cert.committee),
                    "signers": list(cert.signers),
                    "output": cert.output["sha256"],
                },
            },
        )
        msg = f"{view.announce.rounds} round(s) certified"
        if "test_accuracy" in metrics:
            msg += f"; test accuracy {metrics['test_accuracy']:.4f}"
        self._finish(view.task_id, "done", msg)


def _split_npz(path: Path, shares: list[float], seed: int) -> list[bytes]:
    """IID split of an .npz (x, y, …) into len(shares) parts sized ∝ shares."""
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    n = len(arrays["x"])
    order = np.random.default_rng(seed).permutation(n)
    sizes = shard_sizes(n, shares)
    out = []
    start = 0
    for size in sizes:
        idx = np.sort(order[start : start + size])
        start += size
        buf = io.BytesIO()
        np.savez(buf, **{k: v[idx] if len(v) == n else v for k, v in arrays.items()})
        out.append(buf.getvalue())
    return out


__all__ = ["SubmitError", "Submitter", "net_params"]
