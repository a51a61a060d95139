"""The sweep catches bugs: a planted one, and a real one it found (now fixed).

``RoundMachine(planted_bug="second_commit")`` (test-only) lets a holder's second commit
reopen a certified round; a 50-seed sweep with liars — who commit twice — must catch the
second certificate it produces, while the same seeds without the bug hold every invariant.
"""

from __future__ import annotations

from sim.faults import FaultSpec
from sim.run import Outcome, run
from sim.world import SimConfig

LIARS = FaultSpec.parse("liars=0.2")
PARTITION = FaultSpec.parse("partition=30s")
DOUBLE = "a second certified aggregate"
#: How many of seeds 1-50 showed finding 3 (a 30 s partition certified one round twice) before
#: the award in force: 8 (docs/simulation.md, at commit c00698b). Which seeds exercise it
#: depends on every rule upstream (the award's tie-break moved them), so the test asks for a
#: share of the sweep, not named seeds; 10 of 50 exercised the refusal when this was written.
MIN_EXERCISED = 4


def _first_violation(faults: FaultSpec, planted: str | None) -> tuple[int, Outcome] | None:
    for seed in range(1, 51):
        out = run(SimConfig(peers=20, tasks=6, seed=seed, faults=faults, planted_bug=planted))
        if not out.ok:
            return seed, out
    return None


def test_a_fifty_seed_sweep_catches_the_planted_second_commit_bug() -> None:
    found = _first_violation(LIARS, "second_commit")
    assert found is not None, "50 seeds with liars=0.2 never caught the planted bug"
    seed, out = found
    assert out.violation is not None and DOUBLE in out.violation
    assert out.trace_tail and out.trace_tail[-1].endswith(out.violation)
    # The same seed without the planted bug holds every invariant: the bug was caught.
    clean = run(SimConfig(peers=20, tasks=6, seed=seed, faults=LIARS))
    assert clean.ok, clean.violation


def test_the_liar_sweep_without_the_planted_bug_is_clean() -> None:
    assert _first_violation(LIARS, None) is None


def test_a_partition_and_a_re_award_no_longer_certify_one_round_twice() -> None:
    """Finding 3 (docs/simulation.md), fixed: a holder bound by a re-award starts after the
    last round the re-award quotes as certified, and a certificate counts only under the
    award in force for its round (SPEC §11.1). Over a 50-seed partition sweep, a second
    quorum for a round still forms — cast by peers a partition kept from the newer award, or
    before the submitter saw the first — and is refused (``out_of_force``: under an award a
    later one replaced for that round; ``superseded``: a certificate a re-award that did not
    quote its round moved), and every invariant holds."""
    exercised = []
    for seed in range(1, 51):
        out = run(SimConfig(peers=20, tasks=6, seed=seed, faults=PARTITION))
        assert out.ok, f"seed {seed}: {out.violation}"
        checked = out.stats["checked"]
        if checked["out_of_force"] + checked["superseded"] >= 1:
            exercised.append(seed)
    # The fix was exercised, not merely never triggered: second quorums formed and were refused.
    assert len(exercised) >= MIN_EXERCISED, exercised
