"""Certificates of aggregation rounds, checked without trusting anyone (DESIGN §6).

A round's certificate is a set of signed votes. It is valid when
* every vote is for the same ballot (task, round, rule, committee, inputs, output hash);
* the committee named in the ballot is exactly ``committee(task, round, participants)``
  where the participants are the peers named by the vote's inputs and exclusions — so
  a submitter cannot hand-pick friendly voters;
* the votes come from distinct committee members, and there are at least a quorum
  (a majority of the committee) of them.
Checking that the output really is the aggregate of the inputs is done by
recomputation (``peerd.verify``), which needs the input blobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from protocol.committee import committee as draw_committee
from protocol.committee import quorum
from protocol.envelope import Signed, open_envelope
from protocol.errors import RemoteProtocolError
from protocol.messages import Vote

#: Committee size (DESIGN §6: "e.g. the 3 smallest H(task ‖ round ‖ peer)").
COMMITTEE_SIZE = 3


def participants_of(vote: Vote) -> list[str]:
    return sorted({i["peer_id"] for i in vote.inputs} | {e["peer_id"] for e in vote.excluded})


def expected_committee(vote: Vote) -> tuple[str, ...]:
    return tuple(sorted(draw_committee(vote.task_id, vote.round, participants_of(vote), COMMITTEE_SIZE)))


@dataclass(frozen=True)
class Certificate:
    task_id: str
    round: int
    rule: str
    output: dict[str, Any]
    inputs: tuple[dict[str, Any], ...]
    excluded: tuple[dict[str, Any], ...]
    committee: tuple[str, ...]
    signers: tuple[str, ...]
    votes: tuple[bytes, ...]


def vote_is_well_formed(signed: Signed) -> None:
    vote = signed.message
    if not isinstance(vote, Vote):
        raise RemoteProtocolError("not a vote", reason="unexpected_kind")
    if tuple(sorted(vote.committee)) != expected_committee(vote):
        raise RemoteProtocolError("vote names the wrong committee", reason="bad_committee")
    if signed.signer not in vote.committee:
        raise RemoteProtocolError("vote from a non-member", reason="not_in_committee")


def tally(votes: Sequence[Signed]) -> Certificate | None:
    """The certificate formed by ``votes`` (already verified envelopes), if any."""
    groups: dict[tuple[Any, ...], dict[str, Signed]] = {}
    for sv in votes:
        try:
            vote_is_well_formed(sv)
        except RemoteProtocolError:
            continue
        assert isinstance(sv.message, Vote)
        groups.setdefault(sv.message.ballot(), {})[sv.signer] = sv
    for _ballot, by_signer in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        first = next(iter(by_signer.values())).message
        assert isinstance(first, Vote)
        if len(by_signer) >= quorum(len(first.committee)):
            chosen = [by_signer[s] for s in sorted(by_signer)]
            return Certificate(
                task_id=first.task_id,
                round=first.round,
                rule=first.rule,
                output=dict(first.output),
                inputs=first.inputs,
                excluded=first.excluded,
                committee=tuple(sorted(first.committee)),
                signers=tuple(sorted(by_signer)),
                votes=tuple(s.raw for s in chosen),
            )
    return None


def check_certificate(raw_votes: Sequence[bytes], *, task_id: str, round_no: int) -> Certificate:
    """Verify every signature and the quorum; raise RemoteProtocolError otherwise."""
    signed = [open_envelope(r, kinds=frozenset({"vote"})) for r in raw_votes]
    for sv in signed:
        vote_is_well_formed(sv)
        assert isinstance(sv.message, Vote)
        if sv.message.task_id != task_id or sv.message.round != round_no:
            raise RemoteProtocolError("vote for another task or round", reason="bad_certificate")
    cert = tally(signed)
    if cert is None:
        raise RemoteProtocolError("no quorum of matching votes", reason="no_quorum")
    return cert
