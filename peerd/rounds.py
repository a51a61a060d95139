"""The signed aggregation round (docs/design.md §6, seed §4 O = Σ O_i).

Per round r of a task with an aggregation rule:
1. each participant (a shard holder per the latest award; one peer may hold two shards
   after a re-award without a spare) commits its output O_i with a signed Result;
2. the committee — the 3 participants with the smallest H(task ‖ r ‖ peer) — waits
   until every shard's holder has committed, or is lost (no lease heartbeat for
   ``lease_ttl_s``), or the round times out; each member fetches the committed
   outputs (from the committer, or from a member whose vote names the same hash — the
   hash is checked either way), checks them (a mismatch excludes the peer, reported in
   the vote), computes O with the rule in canonical order and signs a Vote;
3. a majority of the committee voting the same ballot is the certificate. Members whose
   views differed (a commit raced the deadline, a re-award changed the participants,
   an input could not be fetched from its committer) vote again — a new ``attempt``,
   at most MAX_ATTEMPTS — whenever what they would vote on changes, so views converge;
   a wrong aggregate is never certified because every vote must match byte for byte.
Every daemon tallies votes, so participants start round r+1 from the certified O_r.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import trio

from peerd.node import Node
from peerd.taskbook import TaskView
from protocol.aggregation import aggregate
from protocol.certificate import COMMITTEE_SIZE, Certificate, input_key
from protocol.committee import committee
from protocol.envelope import Signed
from protocol.errors import ProtocolError
from protocol.messages import Result, Vote
from protocol.tensors import decode_arrays, encode_arrays

log = logging.getLogger(__name__)

#: Default per-round wait once the first commit of the round is seen.
DEFAULT_ROUND_TIMEOUT_S = 600.0
MAX_ATTEMPTS = 3


class Rounds:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._duties: set[tuple[str, int]] = set()
        #: (task, round) → inputs (peer, shard, sha256) whose blob we could not fetch
        self._fetch_failed: dict[tuple[str, int], set[tuple[str, int, str]]] = {}
        #: Told of every certificate (the submitter's TaskMachine takes it as RoundCertified).
        self.on_certified: list[Callable[[TaskView, Certificate], None]] = []

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
        output = {**cert.output, "signers": list(cert.signers)}
        self.node.store.add_certificate(view.task_id, cert.round, output, list(cert.votes))
        self.node.counters.inc("rounds.certified")
        log.info("task %s round %d certified by %s", view.task_id, cert.round, ", ".join(cert.signers))
        for listener in self.on_certified:
            listener(view, cert)

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
        digest = cert.output["sha256"]
        try:
            # Three passes over the voters: one that just certified may still be writing it.
            return await self.node.fetch_from_any(
                digest, cert.signers, max_bytes=cert.output["size"], passes=3
            )
        except ProtocolError as exc:
            raise RuntimeError(f"could not fetch {digest[:12]} from any voter: {exc}") from None

    # -- committee duty -----------------------------------------------------------------
    def _holders(self, view: TaskView) -> dict[int, str]:
        """shard → holder, per the latest award: the round's participants (SPEC §11.1)."""
        return {int(a["shard"]): str(a["peer_id"]) for a in view.assignments()}

    def _commit(self, view: TaskView, round_no: int, shard: int, holder: str) -> Signed | None:
        """The holder's commit for ``shard`` in ``round_no``, if we have it."""
        sv = view.results.get(round_no, {}).get(shard)
        return sv if sv is not None and sv.signer == holder else None

    def _missing(self, view: TaskView, round_no: int) -> list[str]:
        """Holders with a shard not yet committed this round (per shard: a peer may hold two)."""
        holders = self._holders(view).items()
        return sorted({p for s, p in holders if self._commit(view, round_no, s, p) is None})

    def _lost(self, view: TaskView, peer: str) -> bool:
        last = view.heartbeats.get(peer)
        ttl = self.node.config.market.lease_ttl_s
        return last is None or trio.current_time() - last > ttl

    def _round_timeout(self, view: TaskView) -> float:
        return float(view.announce.params.get("round_timeout_s", DEFAULT_ROUND_TIMEOUT_S))

    async def _wait_for_commits(self, view: TaskView, round_no: int, started: float) -> None:
        deadline = view.first_result_at.get(round_no, started) + self._round_timeout(view)
        # A participant that stopped heartbeating is left out (docs/design.md §6); give each one
        # at least a lease TTL from when this duty started.
        grace_until = started + self.node.config.market.lease_ttl_s
        while trio.current_time() < deadline and round_no not in view.certificates and not view.cancelled:
            missing = self._missing(view, round_no)
            if not missing:
                return
            if trio.current_time() > grace_until and all(self._lost(view, p) for p in missing):
                return
            await view.wait_changed(0.5)

    def _view_key(self, view: TaskView, round_no: int) -> tuple[Any, ...]:
        """What our vote depends on. We vote again (a new ``attempt``) only when it changed:
        a re-award changed the participants, a commit arrived late, or another member's
        vote names an input whose blob we could not fetch (we can fetch it from them)."""
        commits = []
        for shard, holder in sorted(self._holders(view).items()):
            sv = self._commit(view, round_no, shard, holder)
            if sv is not None:
                commits.append((shard, holder, sv.message.seq))
        failed = self._fetch_failed.get((view.task_id, round_no), set())
        refetchable = frozenset(failed & self._named_in_votes(view, round_no))
        return (tuple(sorted(self._holders(view).items())), tuple(commits), refetchable)

    def _named_in_votes(self, view: TaskView, round_no: int) -> set[tuple[str, int, str]]:
        named: set[tuple[str, int, str]] = set()
        for (signer, _), sv in view.votes.get(round_no, {}).items():
            if signer == self.node.peer_id:
                continue
            assert isinstance(sv.message, Vote)
            named |= {(i["peer_id"], int(i["shard"]), i["sha256"]) for i in sv.message.inputs}
        return named

    async def _serve_round(self, view: TaskView, round_no: int) -> None:
        try:
            started = trio.current_time()
            # Bounded: past the round timeout and a few lease TTLs nothing new can arrive.
            give_up = started + self._round_timeout(view) + 4 * self.node.config.market.lease_ttl_s + 60.0
            last_key: tuple[Any, ...] | None = None
            attempt = 0
            while attempt < MAX_ATTEMPTS and trio.current_time() < give_up:
                if round_no in view.certificates or view.cancelled:
                    return
                await self._wait_for_commits(view, round_no, started)
                if round_no in view.certificates or view.cancelled:
                    return
                key = self._view_key(view, round_no)
                # A re-award can take us off the committee (or put us back on).
                if key != last_key and self.node.peer_id in self.committee_for(view, round_no):
                    last_key = key
                    if await self._vote(view, round_no, attempt):
                        attempt += 1
                await view.wait_changed(0.5)
            if round_no not in view.certificates and not view.cancelled:
                log.warning(
                    "task %s round %d: no certificate after %d vote(s) of ours",
                    view.task_id,
                    round_no,
                    attempt,
                )
                self.node.counters.inc("rounds.uncertified")
        except Exception:
            log.exception("committee duty for %s round %d failed", view.task_id, round_no)
            self.node.counters.inc("rounds.duty_failed")
        finally:
            self._fetch_failed.pop((view.task_id, round_no), None)

    async def _fetch_input(self, view: TaskView, round_no: int, committer: str, ref: dict[str, Any]) -> Path:
        """The committed blob, from its committer or else from a member whose vote names
        it (the hash is checked either way, so who serves it does not matter): a
        committer that dies after its commit must not split the committee's views."""
        voters = set()
        for (signer, _), sv in view.votes.get(round_no, {}).items():
            assert isinstance(sv.message, Vote)
            if signer not in (committer, self.node.peer_id) and any(
                i["sha256"] == ref["sha256"] for i in sv.message.inputs
            ):
                voters.add(signer)
        return await self.node.fetch_from_any(
            ref["sha256"],
            [committer, *sorted(voters)],
            max_bytes=ref["size"],
            # The committer revealed other bytes than it committed to: its input is excluded.
            give_up=lambda peer, exc: peer == committer and exc.reason == "hash_mismatch",
        )

    async def _vote(self, view: TaskView, round_no: int, attempt: int) -> bool:
        """Compute the aggregate over what we have and gossip a signed vote; False if
        there is nothing usable to vote on."""
        ann = view.announce
        members = self.committee_for(view, round_no)
        holders = self._holders(view)
        inputs: list[tuple[str, int, str, float, list[np.ndarray]]] = []
        excluded: dict[str, str] = {}
        failed = self._fetch_failed.setdefault((view.task_id, round_no), set())
        for shard, holder in sorted(holders.items()):
            sv = self._commit(view, round_no, shard, holder)
            if sv is None:
                continue  # listed below if the holder has no input at all
            msg = sv.message
            assert isinstance(msg, Result)
            if not msg.ok or "weights" not in msg.outputs:
                excluded[holder] = f"failed: {msg.error or 'no weights'}"[:128]
                continue
            ref = msg.outputs["weights"]
            try:
                path = await self._fetch_input(view, round_no, holder, ref)
                arrays = await trio.to_thread.run_sync(lambda p=path: decode_arrays(p.read_bytes()))
            except ProtocolError as exc:
                # The revealed output does not match its commit, or cannot be fetched or decoded.
                excluded[holder] = f"{exc.reason}: {exc}"[:128]
                failed.add((holder, shard, ref["sha256"]))
                self.node.counters.inc(f"rounds.excluded.{exc.reason}")
                continue
            failed.discard((holder, shard, ref["sha256"]))
            inputs.append((holder, shard, ref["sha256"], msg.weight, arrays))
        with_input = {i[0] for i in inputs}
        for p in sorted(set(holders.values())):
            if p not in with_input and p not in excluded:
                excluded[p] = "missing at the round deadline"
        inputs = self._drop_shape_outliers(inputs, excluded)
        if not inputs:
            log.warning("task %s round %d: no usable inputs", view.task_id, round_no)
            return False
        agg_in = [
            (input_key(peer, shard), weight if weight > 0 else 1.0, arrays)
            for peer, shard, _, weight, arrays in inputs
        ]
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
                for peer, shard, sha, weight, _ in sorted(inputs, key=lambda i: input_key(i[0], i[1]))
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
        return True

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
