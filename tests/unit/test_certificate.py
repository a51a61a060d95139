"""Certificates of the signed aggregation round (SPEC §11.1), from real signed votes.

A certificate is a quorum of matching votes from the committee drawn from the round's
participants — and the participants are those of a signed award, never a set a vote
names for itself.
"""

from __future__ import annotations

import pytest

from protocol.certificate import check_certificate, tally, vote_is_well_formed
from protocol.committee import committee, quorum
from protocol.envelope import Signed, open_envelope
from protocol.errors import RemoteProtocolError
from protocol.messages import Award, Vote
from tests.helpers_training import SyntheticTask


@pytest.fixture(scope="module")
def task() -> SyntheticTask:
    return SyntheticTask(rounds=2)


def opened(*raws: bytes) -> list[Signed]:
    return [open_envelope(r) for r in raws]


def award_of(task: SyntheticTask) -> list[Award]:
    assert isinstance(task.award, Award)
    return [task.award]


def test_committee_of_three_participants_is_all_of_them_quorum_two(task: SyntheticTask) -> None:
    members = task.members(1)
    assert sorted(m.peer_id for m in members) == sorted(task.shard_of)
    assert quorum(len(members)) == 2


def test_two_matching_votes_of_three_certify(task: SyntheticTask) -> None:
    a, b, _ = task.members(1)
    cert = check_certificate(
        [task.votes[1][a.peer_id], task.votes[1][b.peer_id]],
        task_id=task.task_id, round_no=1, awards=award_of(task), rule=task.rule,
    )
    assert cert.signers == tuple(sorted((a.peer_id, b.peer_id)))
    assert cert.output["sha256"] == SyntheticTask.sha(task.outputs[1])
    assert [i["peer_id"] for i in cert.inputs] == sorted(task.shard_of)


def test_one_vote_of_three_is_no_quorum(task: SyntheticTask) -> None:
    a = task.members(1)[0]
    with pytest.raises(RemoteProtocolError) as e:
        check_certificate([task.votes[1][a.peer_id]], task_id=task.task_id, round_no=1, awards=award_of(task))
    assert e.value.reason == "no_quorum"
    assert tally(opened(task.votes[1][a.peer_id])) is None


def test_the_same_member_twice_counts_once(task: SyntheticTask) -> None:
    a = task.members(1)[0]
    again = task.vote(a, 1, attempt=1)  # a re-vote: same ballot, new attempt
    assert tally(opened(task.votes[1][a.peer_id], again)) is None


def test_votes_differing_only_in_attempt_and_excluded_share_a_ballot(task: SyntheticTask) -> None:
    a, b, _ = task.members(1)
    other = task.vote(b, 1, attempt=2, excluded=[])
    cert = tally(opened(task.votes[1][a.peer_id], other), awards=award_of(task), rule=task.rule)
    assert cert is not None and len(cert.signers) == 2


def test_a_member_voting_another_output_does_not_block_the_honest_pair(task: SyntheticTask) -> None:
    a, b, c = task.members(1)
    wrong = task.vote(c, 1, output=b"not the aggregate")
    # The dishonest vote arrives first: the honest majority still certifies the honest output.
    cert = tally(opened(wrong, task.votes[1][a.peer_id], task.votes[1][b.peer_id]), awards=award_of(task))
    assert cert is not None
    assert cert.output["sha256"] == SyntheticTask.sha(task.outputs[1])
    assert c.peer_id not in cert.signers


def test_two_different_outputs_from_one_member_each_is_no_certificate(task: SyntheticTask) -> None:
    a, b, _ = task.members(1)
    x = task.vote(a, 1, output=b"x")
    y = task.vote(b, 1, output=b"y")
    assert tally(opened(x, y)) is None


def test_a_non_member_vote_is_not_counted(task: SyntheticTask) -> None:
    a = task.members(1)[0]
    forged = task.vote(task.outsider, 1)  # names the right committee, but the signer is not in it
    with pytest.raises(RemoteProtocolError) as e:
        vote_is_well_formed(open_envelope(forged))
    assert e.value.reason == "not_in_committee"
    assert tally(opened(task.votes[1][a.peer_id], forged)) is None
    with pytest.raises(RemoteProtocolError) as e2:
        check_certificate([task.votes[1][a.peer_id], forged], task_id=task.task_id, round_no=1)
    assert e2.value.reason == "not_in_committee"


def test_a_vote_naming_a_wrong_committee_is_not_counted(task: SyntheticTask) -> None:
    a, b, _ = task.members(1)
    bad = task.vote(b, 1, committee=sorted([a.peer_id, b.peer_id, task.outsider.peer_id]))
    with pytest.raises(RemoteProtocolError) as e:
        vote_is_well_formed(open_envelope(bad))
    assert e.value.reason == "bad_committee"
    assert tally(opened(task.votes[1][a.peer_id], bad)) is None


def test_a_vote_naming_no_participant_is_refused_as_the_senders_fault(task: SyntheticTask) -> None:
    """No inputs and no exclusions leave no committee to draw: the vote is dropped as bad
    (RemoteProtocolError), never an error of ours escaping the check or the tally."""
    a = task.members(1)[0]
    empty = open_envelope(task.vote(a, 1, inputs=[], excluded=[]))
    with pytest.raises(RemoteProtocolError) as e:
        vote_is_well_formed(empty, awards=award_of(task))
    assert e.value.reason == "bad_committee"
    assert tally([empty, *opened(task.votes[1][task.members(1)[1].peer_id])]) is None


def test_a_self_declared_committee_of_one_certifies_nothing_given_the_awards(task: SyntheticTask) -> None:
    """The attack the award check closes: an outsider names itself as the only participant,
    so the committee drawn from the vote's own participants is itself, with quorum 1."""
    me = task.outsider
    inputs = [{"peer_id": me.peer_id, "shard": 0, "sha256": "ab" * 32, "weight": 1.0}]
    forged = task.vote(me, 1, inputs=inputs, committee=[me.peer_id], output=b"anything")
    vote = open_envelope(forged)
    assert isinstance(vote.message, Vote)
    assert committee(task.task_id, 1, [me.peer_id]) == (me.peer_id,)
    # Self-consistent on its own: this is why the participants must come from an award.
    assert tally([vote]) is not None
    with pytest.raises(RemoteProtocolError) as e:
        vote_is_well_formed(vote, awards=award_of(task))
    assert e.value.reason == "bad_committee"
    assert tally([vote], awards=award_of(task)) is None
    with pytest.raises(RemoteProtocolError) as e2:
        check_certificate([forged], task_id=task.task_id, round_no=1, awards=award_of(task))
    assert e2.value.reason == "bad_committee"


def test_participants_must_hold_the_shards_they_name(task: SyntheticTask) -> None:
    a, b, _ = task.members(1)
    swapped = [dict(i) for i in task.input_entries(1)]
    swapped[0]["shard"], swapped[1]["shard"] = swapped[1]["shard"], swapped[0]["shard"]
    votes = [task.vote(a, 1, inputs=swapped), task.vote(b, 1, inputs=swapped)]
    assert tally(opened(*votes)) is not None  # consistent among themselves …
    assert tally(opened(*votes), awards=award_of(task)) is None  # … but not with the award
    with pytest.raises(RemoteProtocolError) as e:
        vote_is_well_formed(open_envelope(votes[0]), awards=award_of(task))
    assert e.value.reason == "bad_committee"


def test_one_shard_named_twice_is_refused(task: SyntheticTask) -> None:
    a = task.members(1)[0]
    entries = task.input_entries(1)
    twice = [entries[0], {**entries[1], "shard": entries[0]["shard"]}, entries[2]]
    with pytest.raises(RemoteProtocolError) as e:
        vote_is_well_formed(open_envelope(task.vote(a, 1, inputs=twice)))
    assert e.value.reason == "bad_certificate"


def test_a_vote_for_another_rule_is_refused(task: SyntheticTask) -> None:
    a, b, _ = task.members(1)
    votes = [task.vote(a, 1, rule="sum"), task.vote(b, 1, rule="sum")]
    assert tally(opened(*votes), rule=task.rule) is None
    with pytest.raises(RemoteProtocolError) as e:
        check_certificate(votes, task_id=task.task_id, round_no=1, rule=task.rule)
    assert e.value.reason == "bad_certificate"


def test_votes_of_another_round_or_task_are_refused(task: SyntheticTask) -> None:
    a, b, _ = task.members(2)
    with pytest.raises(RemoteProtocolError) as e:
        check_certificate([task.votes[2][a.peer_id], task.votes[2][b.peer_id]],
                          task_id=task.task_id, round_no=1)
    assert e.value.reason == "bad_certificate"
    with pytest.raises(RemoteProtocolError) as e2:
        check_certificate([task.votes[2][a.peer_id], task.votes[2][b.peer_id]], task_id="f" * 32, round_no=2)
    assert e2.value.reason == "bad_certificate"


def test_a_tampered_vote_fails_its_signature(task: SyntheticTask) -> None:
    a, b, _ = task.members(1)
    raw = bytearray(task.votes[1][a.peer_id])
    raw[len(raw) // 2] ^= 0x01  # inside the signed payload: the signature no longer matches
    with pytest.raises(RemoteProtocolError):
        check_certificate([bytes(raw), task.votes[1][b.peer_id]], task_id=task.task_id, round_no=1)


def test_a_peer_holding_two_shards_is_one_participant_with_two_inputs() -> None:
    """After a re-award without a spare peer, one holder runs two shards (protocol.awards
    .reassign); its two commits are two inputs, and it is drawn once."""
    from protocol.messages import Award

    t = SyntheticTask(rounds=1)
    lost = t.peers[2].peer_id
    keeper = t.peers[0]
    assignments = [{**a, "peer_id": keeper.peer_id} if a["peer_id"] == lost else a for a in t.assignments]
    raw = t.forge.seal(t.submitter, Award, task_id=t.task_id, epoch=1, bids=t.bids, assignments=assignments,
                       under_capacity=False, excluded=[lost])
    award1 = open_envelope(raw).message
    assert isinstance(award1, Award)
    entries = {e["peer_id"]: e for e in t.input_entries(1)}
    inputs = sorted(
        [entries[t.peers[0].peer_id], entries[t.peers[1].peer_id],
         {**entries[lost], "peer_id": keeper.peer_id}],
        key=lambda i: (i["peer_id"], i["shard"]),
    )
    members = sorted(committee(t.task_id, 1, sorted({t.peers[0].peer_id, t.peers[1].peer_id})))
    assert len(members) == 2 and quorum(2) == 2
    votes = [t.vote(t.by_peer[m], 1, inputs=inputs, committee=members) for m in members]
    cert = tally(opened(*votes), awards=[award1])
    assert cert is not None and len(cert.inputs) == 3
    # The same votes do not match epoch 0, where the lost peer still held its shard.
    assert isinstance(t.award, Award)
    assert tally(opened(*votes), awards=[t.award]) is None


# -- the award in force (SPEC §11.1; docs/simulation.md finding 3) ---------------------------------

OTHER = b"another aggregate of round 1"


def _reaward(t: SyntheticTask, *, quote_round: int | None) -> tuple[Award, list[bytes]]:
    """Epoch 1: the third peer's lease was lost and the first peer takes its shard (no spare).
    ``quote_round``: the round the re-award quotes as certified (its output is the synthetic
    round's certified output), or None. Also returns epoch 1's holders' votes for round 1."""
    lost, keeper = t.peers[2].peer_id, t.peers[0]
    assignments = [{**a, "peer_id": keeper.peer_id} if a["peer_id"] == lost else a for a in t.assignments]
    certified = None
    if quote_round is not None:
        out = t.outputs[quote_round]
        certified = {
            "round": quote_round,
            "output": {"sha256": SyntheticTask.sha(out), "size": len(out)},
            "signers": sorted(m.peer_id for m in t.members(quote_round)),
        }
    raw = t.forge.seal(t.submitter, Award, task_id=t.task_id, epoch=1, bids=t.bids, assignments=assignments,
                       under_capacity=False, excluded=[lost], certified=certified)  # fmt: skip
    award1 = open_envelope(raw).message
    assert isinstance(award1, Award)
    entries = {e["peer_id"]: e for e in t.input_entries(1)}
    moved = {**entries[lost], "peer_id": keeper.peer_id}
    inputs = sorted(
        [entries[t.peers[0].peer_id], entries[t.peers[1].peer_id], moved],
        key=lambda i: (i["peer_id"], i["shard"]),
    )
    members = sorted(committee(t.task_id, 1, sorted({t.peers[0].peer_id, t.peers[1].peer_id})))
    # Another aggregate than epoch 0's: the re-awarded holder re-ran round 1.
    votes = [t.vote(t.by_peer[m], 1, inputs=inputs, committee=members, output=OTHER) for m in members]
    return award1, votes


def test_the_award_in_force_is_the_latest_sealed_before_the_round_was_certified(task: SyntheticTask) -> None:
    from protocol.certificate import award_in_force, certified_round

    assert isinstance(task.award, Award)
    quoting, _ = _reaward(task, quote_round=1)
    plain, _ = _reaward(task, quote_round=None)
    assert certified_round(task.award) == 0 and certified_round(quoting) == 1
    assert award_in_force([task.award, plain], 1) is plain
    assert award_in_force([task.award, quoting], 1) is task.award
    assert award_in_force([task.award, quoting], 2) is quoting
    assert award_in_force([quoting], 1) is None  # nothing at hand may host round 1


def test_a_re_awarded_holders_second_certificate_for_a_quoted_round_is_refused(task: SyntheticTask) -> None:
    """The finding's mechanism: round 1 is certified under epoch 0; the re-award quotes it;
    the new holders' committee certifies another aggregate for round 1. The old check (*some*
    award matches) accepted both certificates; now only epoch 0's holds."""
    from protocol.certificate import vote_matches_award

    assert isinstance(task.award, Award)
    award1, votes = _reaward(task, quote_round=1)
    awards = [task.award, award1]
    vote = open_envelope(votes[0]).message
    assert isinstance(vote, Vote) and vote_matches_award(vote, award1)  # what the old check accepted
    with pytest.raises(RemoteProtocolError) as e:
        check_certificate(votes, task_id=task.task_id, round_no=1, awards=awards, rule=task.rule)
    assert e.value.reason == "bad_committee" and "award in force" in str(e.value)
    assert tally(opened(*votes), awards=awards) is None
    first = list(task.votes[1].values())
    cert = check_certificate(first, task_id=task.task_id, round_no=1, awards=awards, rule=task.rule)
    assert cert.output["sha256"] == SyntheticTask.sha(task.outputs[1])


def test_a_re_award_that_does_not_quote_a_round_moves_it_to_its_holders(task: SyntheticTask) -> None:
    """Its submitter never saw round 1's votes: round 1 is epoch 1's, and a certificate epoch
    0's holders formed meanwhile no longer holds (one certificate per round, whichever the
    order the votes arrive in)."""
    from protocol.certificate import certificate_in_force

    assert isinstance(task.award, Award)
    award1, votes = _reaward(task, quote_round=None)
    first = check_certificate(list(task.votes[1].values()), task_id=task.task_id, round_no=1,
                              awards=[task.award], rule=task.rule)  # fmt: skip
    assert certificate_in_force(first, [task.award])
    assert not certificate_in_force(first, [task.award, award1])
    with pytest.raises(RemoteProtocolError) as e:
        check_certificate(list(task.votes[1].values()), task_id=task.task_id, round_no=1,
                          awards=[task.award, award1], rule=task.rule)  # fmt: skip
    assert e.value.reason == "bad_committee"
    awards = [task.award, award1]
    second = check_certificate(votes, task_id=task.task_id, round_no=1, awards=awards, rule=task.rule)
    assert second.output["sha256"] == SyntheticTask.sha(OTHER)


def test_a_quoted_round_pins_its_output(task: SyntheticTask) -> None:
    assert isinstance(task.award, Award)
    award1, _ = _reaward(task, quote_round=1)
    a = task.members(1)[0]
    wrong = task.vote(a, 1, output=b"another aggregate")
    vote_is_well_formed(open_envelope(wrong), awards=[task.award], rule=task.rule)  # fine without the quote
    with pytest.raises(RemoteProtocolError) as e:
        vote_is_well_formed(open_envelope(wrong), awards=[task.award, award1], rule=task.rule)
    assert e.value.reason == "bad_certificate" and "quoted certified" in str(e.value)
