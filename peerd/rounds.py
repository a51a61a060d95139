"""The signed aggregation round (DESIGN §6, seed §4 O = Σ O_i).

Per round r of a task with an aggregation rule:
1. each participant commits its output O_i with a signed Result (hash + weight);
2. the committee — the 3 participants with the smallest H(task ‖ r ‖ peer) — waits
   until every participant has committed, or is lost (no lease heartbeat for
   ``lease_ttl_s``), or the round times out; each member fetches the committed
   outputs, checks their hashes (a mismatch excludes the peer, reported in the vote),
   computes O with the rule in canonical order and signs a Vote;
3. a majority of the committee voting the same ballot is the certificate. If members
   saw different inputs (a commit raced the deadline), a member that sees a vote
   naming inputs it lacked re-votes once on the union — views converge, and a wrong
   aggregate is never certified because every vote must match byte for byte.
Every daemon tallies votes, so participants start round r+1 from the certified O_r.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import trio

from protocol.aggregation import aggregate
from protocol.certificate import COMMITTEE_SIZE, Certificate
from protocol.committee import committee
from protocol.envelope import Signed
from protocol.errors import ProtocolError
from protocol.messages import Result, Vote
from protocol.tensors import decode_arrays, encode_arrays

from peerd.node import Node
from peerd.taskbook import TaskView

log = logging.getLogger(__name__)

#: Default per-round wait once the first commit of the round is seen.
DEFAULT_ROUND_TIMEOUT_S = 600.0
MAX_ATTEMPTS = 3


class Rounds:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._duties: set[tuple[str, int]] = set()

    # -- inputs from the task bus -----------------------------------------------------
    def on_result(self, view: TaskView, signed: Signed) -> None:
        msg = signed.message
        assert isinstance(msg, Result)
        if view.announce.aggregation == "none" or view.cancelled:
            return
        members = self.committee_for(view, msg.round)
        key = (view.task_id, msg.round)
        if self.node.peer_id in members and key not in self._duties:
            self._duties.add(key)
            self.node.nursery.start_soon(self._serve_round, view, msg.round)

    def on_certificate(self, view: TaskView, cert: Certificate) -> None:
        self.node.store.add_certificate(view.task_id, cert.round, {**cert.output, "signers": list(cert.signers)}, list(cert.votes))
        self.node.counters.inc("rounds.certified")
        log.info("task %s round %d certified by %s", view.task_id, cert.round, ", ".join(cert.signers))

    def committee_for(self, view: TaskView, round_no: int) -> tuple[str, ...]:
        return tuple(sorted(committee(view.task_id, round_no, view.participants(), COMMITTEE_SIZE)))

    # -- the starting model of the next round -------------------------------------------
    async def start_model(self, view: TaskView, round_no: int) -> Path:
        """Wait for round ``round_no``'s certificate and fetch its output from a voter."""
        while round_no not in view.certificates:
            if view.cancelled:
                raise RuntimeError("task cancelled")
            await view.wait_changed(5.0)
        cert = view.certificates[round_no]
        return await self._fetch_from_any(cert.output["sha256"], cert.output["size"], cert.signers)

    async def _fetch_from_any(self, digest: str, size: int, peers: tuple[str, ...]) -> Path:
        if self.node.blobs.has(digest):
            return self.node.blobs.path(digest)
        errors = []
        for _ in range(3):
            for peer in peers:
                if peer == self.node.peer_id:
                    continue
                try:
                    return await self.node.fetch_blob(peer, digest, max_bytes=size)
                except ProtocolError as exc:
                    errors.append(f"{peer}: {exc}")
            await trio.sleep(1.0)
        raise RuntimeError(f"could not fetch {digest[:12]} from any voter: {'; '.join(errors[-3:])}")

    # -- committee duty -----------------------------------------------------------------
    def _missing(self, view: TaskView, round_no: int) -> list[str]:
        have = {view.results.get(round_no, {})[s].signer for s in view.results.get(round_no, {})}
        return [p for p in view.participants() if p not in have]

    def _lost(self, view: TaskView, peer: str) -> bool:
        last = view.heartbeats.get(peer)
        ttl = self.node.config.market.lease_ttl_s
        return last is None or trio.current_time() - last > ttl

    async def _wait_for_commits(self, view: TaskView, round_no: int) -> None:
        timeout = float(view.announce.params.get("round_timeout_s", DEFAULT_ROUND_TIMEOUT_S))
        deadline = view.first_result_at.get(round_no, trio.current_time()) + timeout
        grace_until = trio.current_time() + self.node.config.market.lease_ttl_s
        while trio.current_time() < deadline:
            missing = self._missing(view, round_no)
            if not missing:
                return
            # A participant that stopped heartbeating is left out (DESIGN §6); give each
            # one at least a lease TTL from when we started waiting.
            if trio.current_time() > grace_until and all(self._lost(view, p) for p in missing):
                return
            await view.wait_changed(0.5)

    async def _serve_round(self, view: TaskView, round_no: int) -> None:
        try:
            await self._wait_for_commits(view, round_no)
            voted: set[tuple[str, ...]] = set()
            for attempt in range(MAX_ATTEMPTS):
                if round_no in view.certificates or view.cancelled:
                    return
                extra = self._inputs_seen_in_votes(view, round_no)
                vote_inputs = await self._vote(view, round_no, attempt, extra)
                voted.add(vote_inputs)
                # Wait for the certificate, or for a conflicting vote that names inputs we lacked.
                for _ in range(120):
                    if round_no in view.certificates or view.cancelled:
                        return
                    if self._inputs_seen_in_votes(view, round_no) - set(vote_inputs):
                        break
                    await view.wait_changed(0.5)
                else:
                    return
        except Exception:
            log.exception("committee duty for %s round %d failed", view.task_id, round_no)
            self.node.counters.inc("rounds.duty_failed")

    def _inputs_seen_in_votes(self, view: TaskView, round_no: int) -> set[str]:
        seen: set[str] = set()
        for sv in view.votes.get(round_no, {}).values():
            assert isinstance(sv.message, Vote)
            seen |= {i["peer_id"] for i in sv.message.inputs}
        return seen

    async def _vote(self, view: TaskView, round_no: int, attempt: int, extra: set[str]) -> tuple[str, ...]:
        ann = view.announce
        members = self.committee_for(view, round_no)
        results = dict(view.results.get(round_no, {}))
        inputs: list[tuple[str, int, str, float, list[np.ndarray]]] = []
        excluded: dict[str, str] = {}
        for shard, sv in sorted(results.items()):
            msg = sv.message
            assert isinstance(msg, Result)
            if sv.signer != view.holder(shard, msg.epoch):
                excluded[sv.signer] = "not the shard's holder"
                continue
            if not msg.ok or "weights" not in msg.outputs:
                excluded[sv.signer] = f"failed: {msg.error or 'no weights'}"[:128]
                continue
            ref = msg.outputs["weights"]
            try:
                path = await self.node.fetch_blob(sv.signer, ref["sha256"], max_bytes=ref["size"])
                arrays = await trio.to_thread.run_sync(lambda p=path: decode_arrays(p.read_bytes()))
            except ProtocolError as exc:
                # Revealed output does not match its commit (or cannot be fetched/decoded).
                excluded[sv.signer] = f"{exc.reason}: {exc}"[:128]
                self.node.counters.inc(f"rounds.excluded.{exc.reason}")
                continue
            inputs.append((sv.signer, shard, ref["sha256"], msg.weight, arrays))
        for p in view.participants():
            if p not in {i[0] for i in inputs} and p not in excluded:
                excluded[p] = "missing at the round deadline"
        inputs = self._drop_shape_outliers(inputs, excluded)
        if not inputs:
            log.warning("task %s round %d: no usable inputs", view.task_id, round_no)
            return ()
        agg_in = [(peer, weight if weight > 0 else 1.0, arrays) for peer, _, _, weight, arrays in inputs]
        out = await trio.to_thread.run_sync(lambda: encode_arrays(aggregate(ann.aggregation, agg_in)))
        digest = await trio.to_thread.run_sync(self.node.blobs.put_bytes, out)
        raw, signed = self.node.seal(
            Vote,
            ttl_ms=Vote.MAX_TTL_MS,
            task_id=view.task_id,
            round=round_no,
            rule=ann.aggregation,
            committee=list(members),
            inputs=[
                {"peer_id": peer, "shard": shard, "sha256": sha, "weight": float(weight)}
                for peer, shard, sha, weight, _ in sorted(inputs, key=lambda i: i[0])
            ],
            excluded=[{"peer_id": p, "reason": r} for p, r in sorted(excluded.items())],
            output={"sha256": digest, "size": len(out)},
            attempt=attempt,
        )
        self.node.store.add_vote(view.task_id, round_no, self.node.peer_id, attempt, raw)
        cert = view.add_vote(signed)
        if cert is not None:
            self.on_certificate(view, cert)
        await self.node.gossip(raw)
        self.node.counters.inc("rounds.voted")
        return tuple(sorted(i[0] for i in inputs))

    @staticmethod
    def _drop_shape_outliers(
        inputs: list[tuple[str, int, str, float, list[np.ndarray]]], excluded: dict[str, str]
    ) -> list[tuple[str, int, str, float, list[np.ndarray]]]:
        """Keep the inputs whose array shapes/dtypes match the most common signature."""
        def sig(arrays: list[np.ndarray]) -> tuple[Any, ...]:
            return tuple((a.shape, a.dtype.str) for a in arrays)

        counts: dict[tuple[Any, ...], int] = {}
        for i in inputs:
            counts[sig(i[4])] = counts.get(sig(i[4]), 0) + 1
        if not counts:
            return inputs
        best = max(sorted(counts, key=repr), key=lambda k: counts[k])
        kept = []
        for i in inputs:
            if sig(i[4]) == best and all(np.isfinite(a).all() for a in i[4] if a.dtype.kind == "f"):
                kept.append(i)
            else:
                excluded[i[0]] = "output shapes or values unusable"
        return kept
