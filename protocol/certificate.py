"""Certificates of aggregation rounds, checked without trusting anyone (docs/design.md §6).

A round's certificate is a set of signed votes. It is valid when
* every vote is for the same ballot (task, round, rule, committee, inputs, output hash);
* the committee named in the ballot is exactly ``committee(task, round, participants)``
  where the participants are the peers named by the vote's inputs and exclusions — so
  a submitter cannot hand-pick friendly voters;
* the votes come from distinct committee members, and there are at least a quorum
  (a majority of the committee) of them;
* when the caller holds the task's signed awards (every daemon and every bundle does),
  the participants the vote names are exactly the shard holders of **the award in force
  for the vote's round**, and each input is the holder of the shard it names. Without
  this a vote's signer could name itself as the only participant, draw itself as a
  committee of one and certify anything alone (quorum(1) = 1): the participant set must
  come from the submitter's signed award, never from the vote. And it must be *one*
  award per round: the award in force for round r is the one of highest epoch that was
  sealed before the submitter held round r certified (its ``certified`` names a round
  below r, or nothing). Were any award accepted, a holder bound by a re-award that never
  saw round r's votes would run round r again and its committee, drawn from the new
  holders, would certify a second aggregate for it (docs/simulation.md finding 3);
* an award that quotes round r as certified (``Award.certified``) pins its output: a
  vote for round r with another output is refused.
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
from protocol.messages import Award, Vote

#: Committee size (docs/design.md §6: the 3 participants with the smallest H(task ‖ round ‖ peer)).
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


def input_key(peer_id: str, shard: int) -> str:
    """The aggregation key of one input: peer ID, then shard (two digits, so the string
    order is the numeric one). A peer may hold two shards after a re-award without a
    spare (``protocol.awards.reassign``); with one shard per peer the order is exactly
    the ascending peer-ID order of SPEC §11.3."""
    return f"{peer_id}/{shard:02d}"


def holders_of(award: Award) -> dict[int, str]:
    return {int(a["shard"]): str(a["peer_id"]) for a in award.assignments}


def certified_round(award: Award) -> int:
    """The last round ``award`` quotes as certified (0: none, e.g. at epoch 0)."""
    return int(award.certified["round"]) if award.certified else 0


def award_in_force(awards: Sequence[Award], round_no: int) -> Award | None:
    """The award whose holders are round ``round_no``'s participants (SPEC §11.1 "The award
    in force"): of the awards at hand, the highest epoch sealed before the submitter held
    round ``round_no`` certified. None when every award quotes the round as certified (an
    epoch-0 award never does: it is sealed before any round runs)."""
    best: Award | None = None
    for aw in awards:
        if certified_round(aw) < round_no and (best is None or aw.epoch > best.epoch):
            best = aw
    return best


def quoted_output(awards: Sequence[Award], round_no: int) -> str | None:
    """The output sha256 an award at hand quotes for round ``round_no``, if any (the award
    of lowest epoch that quotes it)."""
    for aw in sorted(awards, key=lambda a: a.epoch):
        if aw.certified and int(aw.certified["round"]) == round_no:
            return str(aw.certified["output"]["sha256"])
    return None


def vote_matches_award(vote: Vote, award: Award) -> bool:
    """The vote's participants are exactly ``award``'s holders, and each input is the
    holder of the shard it names."""
    return _matches_award(vote.task_id, vote.inputs, vote.excluded, award)


def _matches_award(
    task_id: str, inputs: Sequence[dict[str, Any]], excluded: Sequence[dict[str, Any]], award: Award
) -> bool:
    if award.task_id != task_id:
        return False
    holders = holders_of(award)
    participants = {i["peer_id"] for i in inputs} | {e["peer_id"] for e in excluded}
    if participants != set(holders.values()):
        return False
    return all(holders.get(int(i["shard"])) == i["peer_id"] for i in inputs)


def vote_is_well_formed(
    signed: Signed, *, awards: Sequence[Award] | None = None, rule: str | None = None
) -> None:
    """Raise RemoteProtocolError unless the vote can count towards a certificate.

    ``awards``: the task's signed awards (every epoch at hand) — the participant set must
    be that of the award in force for the vote's round, and an award quoting the round as
    certified pins its output (see the module docstring). ``rule``: the announce's
    aggregation rule.
    """
    vote = signed.message
    if not isinstance(vote, Vote):
        raise RemoteProtocolError("not a vote", reason="unexpected_kind")
    if not participants_of(vote):
        # No participant to draw a committee from (the draw itself would refuse: our error,
        # not the sender's); a vote of nobody's inputs can never count.
        raise RemoteProtocolError("vote names no participants", reason="bad_committee")
    if tuple(sorted(vote.committee)) != expected_committee(vote):
        raise RemoteProtocolError("vote names the wrong committee", reason="bad_committee")
    if signed.signer not in vote.committee:
        raise RemoteProtocolError("vote from a non-member", reason="not_in_committee")
    shards = [int(i["shard"]) for i in vote.inputs]
    if len(set(shards)) != len(shards):
        raise RemoteProtocolError("vote names one shard twice", reason="bad_certificate")
    if rule is not None and vote.rule != rule:
        raise RemoteProtocolError(f"vote uses rule {vote.rule}, the task {rule}", reason="bad_certificate")
    if awards is not None:
        in_force = award_in_force(awards, vote.round)
        if in_force is None or not vote_matches_award(vote, in_force):
            which = f"epoch {in_force.epoch}" if in_force is not None else "none: every award quotes it"
            raise RemoteProtocolError(
                f"vote names participants other than those of the award in force for round {vote.round}"
                f" ({which})",
                reason="bad_committee",
            )
        pinned = quoted_output(awards, vote.round)
        if pinned is not None and vote.output["sha256"] != pinned:
            raise RemoteProtocolError(
                f"round {vote.round} is quoted certified with output {pinned[:12]}, the vote has another",
                reason="bad_certificate",
            )


def certificate_in_force(cert: Certificate, awards: Sequence[Award]) -> bool:
    """Whether ``cert`` (formed earlier, perhaps with fewer awards at hand) still holds under
    ``awards`` (checks 5 and 6 of SPEC §11.1): a later award that does not quote its round
    moves the round to its holders. Its votes were verified when it formed, and (formed with
    the task's awards, as the machines form it) every one of them named the participants of
    one award: the certificate's own inputs and exclusions (its first vote's) stand for all of
    them, so nothing is verified again."""
    in_force = award_in_force(awards, cert.round)
    if in_force is None or not _matches_award(cert.task_id, cert.inputs, cert.excluded, in_force):
        return False
    pinned = quoted_output(awards, cert.round)
    return pinned is None or pinned == cert.output["sha256"]


def tally(
    votes: Sequence[Signed], *, awards: Sequence[Award] | None = None, rule: str | None = None
) -> Certificate | None:
    """The certificate formed by ``votes`` (already verified envelopes), if any.

    Votes that are not well formed (see :func:`vote_is_well_formed`, with ``awards`` and
    ``rule`` when given) are ignored.
    """
    groups: dict[tuple[Any, ...], dict[str, Signed]] = {}
    for sv in votes:
        try:
            vote_is_well_formed(sv, awards=awards, rule=rule)
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


def check_certificate(
    raw_votes: Sequence[bytes],
    *,
    task_id: str,
    round_no: int,
    awards: Sequence[Award] | None = None,
    rule: str | None = None,
) -> Certificate:
    """Verify every signature, the committee and the quorum; raise RemoteProtocolError
    otherwise. Pass the task's ``awards`` and ``rule`` whenever they are at hand."""
    signed = [open_envelope(r, kinds=frozenset({"vote"})) for r in raw_votes]
    for sv in signed:
        assert isinstance(sv.message, Vote)
        if sv.message.task_id != task_id or sv.message.round != round_no:
            raise RemoteProtocolError("vote for another task or round", reason="bad_certificate")
        vote_is_well_formed(sv, awards=awards, rule=rule)
    cert = tally(signed, awards=awards, rule=rule)
    if cert is None:
        raise RemoteProtocolError("no quorum of matching votes", reason="no_quorum")
    return cert
