"""The contractor role: bid for tasks this node can take, run the shards it is awarded,
heartbeat their leases and deliver signed results (seed §3.2 steps 2, 3 and 5).

Eligibility is the contributor's policy (config ``[offer]``/``[policy]``): the kind is
offered, the node is not draining, the GPU/memory demand fits, and — fail closed — a
task runs only inside a working sandbox unless its submitter is trusted; ``python``
tasks only ever from trusted submitters.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import trio

from peerd import kinds
from peerd.executor import Job, JobResult, Limits
from peerd.inbox import wall_ms
from peerd.node import BID_PROTOCOL, RESULT_PROTOCOL, Node
from peerd.taskbook import TaskBook, TaskView
from protocol import codec
from protocol.awards import check_award
from protocol.envelope import Signed
from protocol.errors import ProtocolError, TransportError
from protocol.messages import Award, Bid, Cancel, Lease, Result, TaskAnnounce

log = logging.getLogger(__name__)

#: Tries to hand a result to its submitter (back-off capped below the lease TTL: with the
#: devnet's 6 s TTL that is ~10 minutes, with the default 10 s TTL ~16 minutes).
MAX_DELIVERY_TRIES = 200


def _deadline_ms(view: TaskView) -> int:
    return view.announce.issued_at + view.announce.deadline_ms


class Contractor:
    def __init__(self, node: Node, book: TaskBook, rounds: Any, local_submitter: Any) -> None:
        self.node = node
        self.book = book
        self.rounds = rounds
        self.local_submitter = local_submitter
        self._running: dict[tuple[str, int], trio.CancelScope] = {}

    # -- eligibility and bidding --------------------------------------------------------
    def ineligible_reason(self, ann: TaskAnnounce, submitter: str) -> str | None:
        cfg = self.node.config
        trusted = submitter in cfg.policy.trusted_submitters or submitter == self.node.peer_id
        if cfg.offer.draining:
            return "draining"
        if ann.kind not in cfg.offer.accept_kinds:
            return f"kind {ann.kind} not offered"
        if kinds.get(ann.kind).trusted_only and not trusted:
            return f"{ann.kind} tasks only from trusted submitters"
        if ann.resources["gpu"] and not cfg.offer.gpus:
            return "no GPU offered"
        if ann.resources["memory_mb"] > min(cfg.offer.memory_mb, cfg.limits.memory_mb):
            return "not enough memory offered"
        if cfg.policy.require_sandbox and not self.node.pool.sandbox_report.available and not trusted:
            return "no working sandbox (fail closed)"
        if ann.issued_at + ann.deadline_ms < wall_ms():
            return "deadline passed"
        return None

    async def on_announce(self, view: TaskView) -> None:
        reason = self.ineligible_reason(view.announce, view.submitter)
        if reason is not None:
            self.node.counters.inc("bids.not_eligible")
            log.debug("not bidding for %s: %s", view.task_id, reason)
            return
        # Also after an award: a re-announce asks for spare bidders for lost shards.
        await self.send_bid(view)

    async def send_bid(self, view: TaskView) -> None:
        load = self.node.load()
        c0 = self.node.c0
        raw, signed = self.node.seal(
            Bid, ttl_ms=60_000, task_id=view.task_id, c0=max(c0, 1e-6), load=min(load, 1000.0)
        )
        if view.submitter == self.node.peer_id:
            self.local_submitter.accept_bid(raw, self.node.peer_id, verified=signed)
            return
        try:
            stream = await self.node.p2p.open_stream(view.submitter, BID_PROTOCOL)
            try:
                await stream.send(raw)
                with trio.fail_after(10):
                    reply = codec.unpack(await stream.receive())
            finally:
                await stream.aclose()
            self.node.counters.inc(
                "bids.sent" if isinstance(reply, dict) and reply.get("ok") else "bids.refused"
            )
        except (ProtocolError, trio.TooSlowError) as exc:
            self.node.counters.inc("bids.failed")
            log.info("bid for %s to %s failed: %s", view.task_id, view.submitter, exc)

    # -- awards ---------------------------------------------------------------------------
    def verify_award(self, view: TaskView, signed: Signed) -> bool:
        award = signed.message
        assert isinstance(award, Award)
        bids = [
            b for raw in award.bids if (b := self.node.inbox.verify_embedded(raw, kinds=frozenset({"bid"})))
        ]
        # With the previous epoch at hand a re-award is checked exactly (protocol.awards).
        prev = view.awards.get(award.epoch - 1)
        previous = prev.message if prev is not None and isinstance(prev.message, Award) else None
        try:
            if len(bids) != len(award.bids):
                raise ProtocolError("award lists an invalid bid", reason="bad_award")
            check_award(view.announce, award, view.submitter, signed.signer, bids, previous)
        except ProtocolError as exc:
            self.node.counters.inc(f"dropped.{exc.reason}")
            log.warning("rejected award for %s from %s: %s", view.task_id, signed.signer, exc)
            return False
        return True

    def on_award(self, view: TaskView) -> None:
        award = view.latest_award()
        if award is None or view.cancelled:
            return
        mine = {a["shard"]: a for a in award.assignments if a["peer_id"] == self.node.peer_id}
        for (task_id, shard), scope in list(self._running.items()):
            if task_id == view.task_id and shard not in mine:
                scope.cancel()  # our shard went to someone else (we were presumed lost)
        for shard, a in mine.items():
            if (view.task_id, shard) not in self._running:
                scope = trio.CancelScope()
                self._running[(view.task_id, shard)] = scope
                self.node.nursery.start_soon(self._run_shard, view, dict(a), award.epoch, scope)

    def on_cancel(self, view: TaskView, signed: Signed) -> None:
        msg = signed.message
        assert isinstance(msg, Cancel)
        if signed.signer != view.submitter:
            self.node.counters.inc("dropped.forged_cancel")
            return
        view.cancelled = True
        view.pulse()
        for (task_id, _), scope in list(self._running.items()):
            if task_id == view.task_id:
                scope.cancel()

    # -- running a shard ------------------------------------------------------------------
    async def _heartbeat(self, view: TaskView, shard: int, epoch: int, state: dict[str, Any]) -> None:
        ttl = int(self.node.config.market.lease_ttl_s * 1000)
        while True:
            raw, _ = self.node.seal(
                Lease,
                ttl_ms=ttl,
                task_id=view.task_id,
                epoch=epoch,
                shard=shard,
                round=state["round"],
                state=state["state"],
                detail=state["detail"][:512],
            )
            view.heartbeats[self.node.peer_id] = trio.current_time()
            await self.node.gossip(raw)
            await trio.sleep(self.node.config.market.heartbeat_s)

    async def _run_shard(
        self, view: TaskView, assignment: dict[str, Any], epoch: int, scope: trio.CancelScope
    ) -> None:
        shard = assignment["shard"]
        ann = view.announce
        state: dict[str, Any] = {"round": 0, "state": "accepted", "detail": ""}
        self.node.store.add_task(
            task_id=ann.task_id,
            role="worker",
            submitter=view.submitter,
            kind=ann.kind,
            state="running",
            spec={"announce": "see signed announce"},
            announce=view.announce_raw,
            deadline_at=(ann.issued_at + ann.deadline_ms) / 1000,
            message=f"awarded shard {shard} (epoch {epoch})",
        )
        self.node.active_shards += 1
        self.node.poke_advert()
        try:
            with scope:
                async with trio.open_nursery() as hb:
                    hb.start_soon(self._heartbeat, view, shard, epoch, state)
                    state["state"] = "running"
                    await self._shard_rounds(view, assignment, epoch, state)
                    hb.cancel_scope.cancel()
            if scope.cancelled_caught:
                state["state"] = "released"
                self.node.counters.inc("shards.cancelled")
        except Exception as exc:  # a bug or an I/O failure in one shard must not kill the daemon
            log.exception("shard %s/%s failed", ann.task_id, shard)
            state["state"], state["detail"] = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            self.node.active_shards -= 1
            self._running.pop((view.task_id, shard), None)
            self.node.poke_advert()
        # Final lease state: tells the submitter and committees we are done with it.
        raw, _ = self.node.seal(
            Lease,
            ttl_ms=int(self.node.config.market.lease_ttl_s * 1000),
            task_id=view.task_id,
            epoch=epoch,
            shard=shard,
            round=state["round"],
            state=state["state"] if state["state"] in ("failed", "released") else "done",
            detail=state["detail"][:512],
        )
        await self.node.gossip(raw)

    async def _shard_rounds(
        self, view: TaskView, assignment: dict[str, Any], epoch: int, state: dict[str, Any]
    ) -> None:
        ann = view.announce
        shard = assignment["shard"]
        inputs: dict[str, Path] = {}
        refs = {**ann.inputs, **assignment["inputs"]}
        for name, ref in sorted(refs.items()):
            state["detail"] = f"fetching {name}"
            inputs[name] = await self.node.fetch_from_any(
                ref["sha256"], [view.submitter], max_bytes=ref["size"]
            )
        first_round = view.certified_rounds() + 1 if ann.aggregation != "none" else 1
        for round_no in range(first_round, ann.rounds + 1):
            state["round"] = round_no
            job_inputs = dict(inputs)
            chained = kinds.get(ann.kind).chained_input
            if chained is not None and round_no > 1:
                state["detail"] = f"waiting for the certificate of round {round_no - 1}"
                job_inputs[chained] = await self.rounds.start_model(view, round_no - 1)
            state["detail"] = f"running round {round_no}"
            result = await self._execute(view, shard, round_no, job_inputs)
            await self._publish_result(view, shard, epoch, round_no, result)
            if not result.ok:
                state["state"], state["detail"] = "failed", f"{result.error}: {result.detail}"[:512]
                return
        state["state"], state["detail"] = "done", ""

    def _job(self, view: TaskView, shard: int, round_no: int, inputs: dict[str, Path]) -> Job:
        ann = view.announce
        kind = kinds.get(ann.kind)
        lim = self.node.config.limits
        params: dict[str, Any] = dict(ann.params)
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
        if kind.seed_per_round:
            # One seed per task and round, the same on every shard: round 1 builds its model
            # under this seed, so every participant starts from the same initial weights
            # (as FedAvg assumes; per-shard seeds cost 0.57-0.66 vs 0.78-0.82 accuracy after
            # round 1 on digits). The shards' data differ, so their batches still differ.
            params["seed"] = int(params.get("seed", 0)) * 1000 + round_no
        for key, value in kind.job_defaults.items():
            params.setdefault(key, value)
        job_inputs = {k: v for k, v in inputs.items() if k not in kind.local_only_inputs}
        return Job(
            job_id=f"{ann.task_id}-{shard}-{round_no}",
            submitter=view.submitter,
            kind=ann.kind,
            params=params,
            inputs=job_inputs,
            limits=Limits(
                memory_bytes=lim.memory_mb << 20,
                cpu_seconds=lim.cpu_seconds,
                wall_seconds=min(
                    lim.wall_seconds, max(1.0, (ann.issued_at + ann.deadline_ms - wall_ms()) / 1000)
                ),
                max_processes=lim.max_processes,
                max_output_bytes=lim.max_output_mb << 20,
            ),
            trusted=view.submitter in self.node.config.policy.trusted_submitters
            or view.submitter == self.node.peer_id,
        )

    async def _execute(self, view: TaskView, shard: int, round_no: int, inputs: dict[str, Path]) -> JobResult:
        job = self._job(view, shard, round_no, inputs)
        self.node.counters.inc("jobs.started")
        result = await self.node.pool.execute(job)
        self.node.counters.inc("jobs.ok" if result.ok else f"jobs.failed.{result.error}")
        return result

    async def _publish_result(
        self, view: TaskView, shard: int, epoch: int, round_no: int, res: JobResult
    ) -> None:
        outputs = {}
        for name, data in sorted(res.outputs.items()):
            digest = await trio.to_thread.run_sync(self.node.blobs.put_bytes, data)
            outputs[name[:64]] = {"sha256": digest, "size": len(data)}
        metrics = {k[:64]: float(v) for k, v in res.metrics.items() if math.isfinite(float(v))}
        weight = float(res.metrics.get("num_samples", 1.0)) if res.ok else 0.0
        raw, signed = self.node.seal(
            Result,
            ttl_ms=Result.MAX_TTL_MS,
            task_id=view.task_id,
            epoch=epoch,
            shard=shard,
            round=round_no,
            ok=res.ok,
            error=None if res.ok else f"{res.error}: {res.detail}"[:512],
            outputs=outputs,
            weight=weight,
            metrics=metrics,
        )
        # Durable before anyone is told: a restart re-delivers it (issue 3 item 8).
        self.node.store.set_work(view.task_id, shard, round_no, epoch, "done" if res.ok else "failed", raw)
        view.add_result(signed)
        self.rounds.on_result(view, signed)
        await self.node.gossip(raw)
        self.node.nursery.start_soon(self.deliver_result, view.submitter, raw, view.task_id)

    async def deliver_result(self, submitter: str, raw: bytes, task_id: str) -> None:
        """Hand the signed result to the submitter until it acknowledges (bounded retries)."""
        if submitter == self.node.peer_id:
            self.local_submitter.accept_result(raw, self.node.peer_id)  # already durable in our store
            return
        # The back-off stays below the lease TTL, and between tries we re-publish our final
        # lease: a submitter that restarted meanwhile knows nothing of our last heartbeats, and
        # without either it presumed the finished holder lost after one TTL and re-awarded the
        # shard (the work was done twice) while our next try was still up to 10 s away.
        ceiling = max(0.5, min(10.0, self.node.config.market.lease_ttl_s / 2))
        delay = 0.2
        for _attempt in range(MAX_DELIVERY_TRIES):
            try:
                stream = await self.node.p2p.open_stream(submitter, RESULT_PROTOCOL)
                try:
                    await stream.send(raw)
                    with trio.fail_after(15):
                        reply = codec.unpack(await stream.receive())
                finally:
                    await stream.aclose()
                if isinstance(reply, dict) and reply.get("ok"):
                    self.node.counters.inc("results.delivered")
                    return
                if isinstance(reply, dict) and reply.get("reason") == "unknown task":
                    return
            except (TransportError, ProtocolError, trio.TooSlowError) as exc:
                log.debug("result delivery for %s failed: %s", task_id, exc)
            view = self.book.get(task_id)
            if view is not None and (view.cancelled or _deadline_ms(view) < wall_ms()):
                break  # the submitter has given the task up by now
            await trio.sleep(delay)
            delay = min(delay * 2, ceiling)
            await self._still_holding(raw)
        self.node.counters.inc("results.undelivered")

    async def _still_holding(self, result_raw: bytes) -> None:
        """Re-publish the final lease of a finished shard whose result is not acknowledged yet."""
        signed = self.node.inbox.verify_embedded(result_raw, kinds=frozenset({"result"}))
        if signed is None or not isinstance(signed.message, Result):
            return
        res = signed.message
        if (res.task_id, res.shard) in self._running:
            return  # still running (a later round): its own heartbeat speaks for it
        raw, _ = self.node.seal(
            Lease,
            ttl_ms=int(self.node.config.market.lease_ttl_s * 1000),
            task_id=res.task_id,
            epoch=res.epoch,
            shard=res.shard,
            round=res.round,
            state="done" if res.ok else "failed",
            detail="result not acknowledged yet",
        )
        await self.node.gossip(raw)

    def redeliver_pending(self) -> None:
        """After a restart: re-send every stored result (the submitter dedupes)."""
        for row in self.node.store.db.execute("SELECT task_id, result FROM work WHERE result IS NOT NULL"):
            task = self.node.store.task(row["task_id"])
            if task is None or task["state"] in ("done", "failed", "cancelled"):
                continue
            self.node.nursery.start_soon(
                self.deliver_result, task["submitter"], bytes(row["result"]), row["task_id"]
            )
