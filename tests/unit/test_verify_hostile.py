"""``peerctl verify`` trusts nothing in a bundle (issue 11, SPEC §15).

Each test starts from a clean, really signed bundle (tests/helpers_training.SyntheticTask)
and plays the auditor: a manifest naming files outside the bundle, symlinks and special
files, claims the votes do not back, messages that belong nowhere, a certificate over a
superseded commit. After each edit the manifest's hashes are resealed where a forger would
(it is unsigned), so only the checks over signed data and the file rules can catch it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from peerd.bundle import parse_name
from peerd.verify import VerifyReport, verify_bundle
from protocol.envelope import open_envelope
from protocol.messages import Result
from tests.helpers_training import SyntheticTask


@pytest.fixture(scope="module")
def task() -> SyntheticTask:
    return SyntheticTask(rounds=2)


@pytest.fixture
def bundle(task: SyntheticTask, tmp_path: Path) -> Path:
    return task.bundle(tmp_path / "bundle")


def manifest(d: Path) -> dict[str, Any]:
    return dict(json.loads((d / "manifest.json").read_text()))


def write_manifest(d: Path, m: dict[str, Any]) -> None:
    (d / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True))


def reseal(d: Path, extra: dict[str, str] | None = None) -> None:
    """List every regular file (not following links) with its true hash, plus ``extra``."""
    m = manifest(d)
    files = {}
    for p in sorted(d.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name != "manifest.json":
            files[str(p.relative_to(d))] = hashlib.sha256(p.read_bytes()).hexdigest()
    m["files"] = {**files, **(extra or {})}
    write_manifest(d, m)


def failed(rep: VerifyReport) -> dict[str, str]:
    return {c.name: c.detail for c in rep.checks if not c.ok}


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_a_clean_bundle_still_verifies(bundle: Path) -> None:
    rep = verify_bundle(bundle)
    assert rep.ok, failed(rep)


# -- finding 1: only regular files inside the bundle are read ----------------------------------


def test_manifest_names_outside_the_bundle_are_refused(bundle: Path, tmp_path: Path) -> None:
    """A manifest listing ``../outside-secret.txt`` and an absolute path with their true
    hashes: the old verifier hashed both and accepted (an oracle on the verifier's files)."""
    secret = tmp_path / "outside-secret.txt"
    secret.write_text("the verifier's secret")
    absolute = tmp_path / "absolute.txt"
    absolute.write_text("another file of the verifier's")
    reseal(bundle, {"../outside-secret.txt": sha(secret), str(absolute): sha(absolute)})
    bad = failed(verify_bundle(bundle))
    assert bad["file ../outside-secret.txt"] == (
        "refused, not opened: the manifest lists a path that leaves the bundle directory (..)"
    ), bad
    assert bad[f"file {absolute}"] == "refused, not opened: the manifest lists an absolute path", bad


def test_a_symlink_to_a_file_with_the_right_bytes_is_refused(bundle: Path, tmp_path: Path) -> None:
    out = bundle / "round-2" / "output.bin"
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(out.read_bytes())
    out.unlink()
    out.symlink_to(outside)
    reseal(bundle, {"round-2/output.bin": sha(outside)})
    bad = failed(verify_bundle(bundle))
    assert bad["file round-2/output.bin"] == "refused: a symlink (a bundle holds regular files only)", bad
    assert bad["round 2 output file"].startswith("round-2/output.bin: refused: a symlink"), bad


def test_a_symlinked_round_directory_is_refused(bundle: Path, tmp_path: Path) -> None:
    moved = tmp_path / "round-2-elsewhere"
    shutil.move(str(bundle / "round-2"), moved)
    (bundle / "round-2").symlink_to(moved, target_is_directory=True)
    reseal(bundle, {f"round-2/{p.name}": sha(p) for p in moved.iterdir()})
    bad = failed(verify_bundle(bundle))
    assert bad["file round-2"] == "refused: a symlink (a bundle holds regular files only)", bad
    assert bad["round 2 certificate"] == "missing: no votes in the bundle", bad


def test_a_special_file_is_refused(bundle: Path) -> None:
    os.mkfifo(bundle / "round-1" / "output.bin.fifo")
    reseal(bundle)
    bad = failed(verify_bundle(bundle))
    assert bad == {"file round-1/output.bin.fifo": "refused: not a regular file (a device, FIFO or socket)"}


# -- finding 2: every manifest claim is checked, or reported as ignored --------------------------


def certificate_claim(task: SyntheticTask, rnd: int, signers: list[str]) -> dict[str, Any]:
    return {
        "round": rnd,
        "rule": task.rule,
        "committee": sorted(m.peer_id for m in task.members(rnd)),
        "signers": sorted(signers),
        "output": SyntheticTask.sha(task.outputs[rnd]),
    }


def test_a_certificate_summary_the_votes_do_not_back_is_caught(task: SyntheticTask, bundle: Path) -> None:
    """Two of three members' votes are in the bundle (still a quorum); the manifest says all
    three signed."""
    members = [m.peer_id for m in task.members(2)]
    (bundle / "round-2" / f"vote-{members[2]}.msg").unlink()
    m = manifest(bundle)
    m["result"]["certificate"] = certificate_claim(task, 2, members)
    write_manifest(bundle, m)
    reseal(bundle)
    bad = failed(verify_bundle(bundle))
    assert set(bad) == {"manifest certificate"}, bad
    assert bad["manifest certificate"].startswith("signers: the manifest claims 3 ("), bad
    assert "the votes have 2 (" in bad["manifest certificate"], bad
    # The true summary passes.
    m["result"]["certificate"] = certificate_claim(task, 2, members[:2])
    write_manifest(bundle, m)
    reseal(bundle)
    rep = verify_bundle(bundle)
    assert rep.ok, failed(rep)
    assert "manifest certificate" in {c.name for c in rep.checks if c.ok}


def test_a_manifest_kind_other_than_announced_is_caught(bundle: Path) -> None:
    m = manifest(bundle)
    m["kind"] = "python"
    write_manifest(bundle, m)
    bad = failed(verify_bundle(bundle))
    assert bad == {"manifest kind": "the manifest claims kind 'python', the signed announce 'keras-train'"}


def test_unsigned_claims_are_reported_as_ignored(bundle: Path) -> None:
    m = manifest(bundle)
    m["audited_by"] = "a trusted auditor"
    m["result"]["metrics"] = {"test_accuracy": 0.99}
    write_manifest(bundle, m)
    rep = verify_bundle(bundle)
    assert rep.ok, failed(rep)
    ignored = {c.name: c.detail for c in rep.checks if c.ignored}
    assert ignored == {
        "manifest audited_by": "ignored: not a manifest field (SPEC §15.3)",
        "manifest state": "ignored: 'done' is not signed by anyone",
        "manifest metrics": "ignored: the submitter's own evaluation, signed by no one",
    }


def test_a_manifest_missing_a_required_field_is_refused(bundle: Path) -> None:
    m = manifest(bundle)
    del m["rounds"]
    m["files"] = ["announce.msg"]
    write_manifest(bundle, m)
    rep = verify_bundle(bundle)
    assert failed(rep) == {"manifest": "'rounds' is missing, must be int; 'files' is list, must be dict"}


# -- finding 3: a file or message that cannot be placed is rejected ---------------------------


def test_a_signed_result_from_a_non_holder_is_rejected(task: SyntheticTask, bundle: Path) -> None:
    """Validly signed by the outsider for shard 0 of round 1: it held no shard."""
    blob = b"not a model"
    raw = task.forge.seal(
        task.outsider,
        Result,
        task_id=task.task_id,
        epoch=0,
        shard=0,
        round=1,
        ok=True,
        error=None,
        outputs={"weights": {"sha256": SyntheticTask.sha(blob), "size": len(blob)}},
        weight=1.0,
        metrics={},
    )
    name = f"round-1/result-0-{task.outsider.peer_id}.msg"
    (bundle / name).write_bytes(raw)
    reseal(bundle)
    bad = failed(verify_bundle(bundle))
    holder = next(a["peer_id"] for a in task.assignments if a["shard"] == 0)
    assert bad == {
        f"place {name}": f"cannot place: signed by {task.outsider.peer_id}, who did not hold shard 0 at "
        f"epoch 0 (the award gives it to {holder})"
    }


def test_a_result_under_another_shards_name_is_rejected(task: SyntheticTask, bundle: Path) -> None:
    peer = task.peers[0].peer_id
    shard = task.shard_of[peer]
    other = (shard + 1) % 3
    src = bundle / "round-1" / f"result-{shard}-{peer}.msg"
    (bundle / "round-1" / f"result-{other}-{peer}.msg").write_bytes(src.read_bytes())
    reseal(bundle)
    bad = failed(verify_bundle(bundle))
    assert bad == {
        f"place round-1/result-{other}-{peer}.msg": f"cannot place: the file is named for round 1, shard "
        f"{other}, peer {peer}; it holds round 1, shard {shard}, signed by {peer}"
    }


def test_a_vote_under_another_peers_name_is_rejected(task: SyntheticTask, bundle: Path) -> None:
    member = task.members(1)[0].peer_id
    rd = bundle / "round-1"
    (rd / f"vote-{member}.msg").rename(rd / f"vote-{task.outsider.peer_id}.msg")
    reseal(bundle)
    bad = failed(verify_bundle(bundle))
    assert bad == {
        f"place round-1/vote-{task.outsider.peer_id}.msg": f"cannot place: signed by {member}, "
        f"not {task.outsider.peer_id}"
    }


def test_files_no_check_can_place_are_rejected(task: SyntheticTask, bundle: Path) -> None:
    (bundle / "README.txt").write_text("trust me")
    (bundle / "round-1" / f"input-{task.outsider.peer_id}-0.bin").write_bytes(b"spare")
    (bundle / "round-3").mkdir()
    (bundle / "round-3" / "output.bin").write_bytes(task.outputs[2])
    reseal(bundle)
    bad = failed(verify_bundle(bundle))
    assert bad == {
        "file README.txt": "cannot place: not a bundle file name (SPEC §15.2)",
        f"place round-1/input-{task.outsider.peer_id}-0.bin": (
            "cannot place: the certificate names no such input"
        ),
        "place round-3/output.bin": "cannot place: the task has 2 round(s)",
    }


def test_a_file_left_out_of_the_manifest_is_rejected(bundle: Path) -> None:
    m = manifest(bundle)
    del m["files"]["round-1/output.bin"]
    write_manifest(bundle, m)
    assert failed(verify_bundle(bundle)) == {
        "file round-1/output.bin": "in the bundle but not listed in the manifest"
    }


# -- finding 4: only the holder's commit that counts (highest seq, SPEC §11) -------------------


def test_a_certificate_over_a_superseded_commit_is_rejected(task: SyntheticTask, bundle: Path) -> None:
    """The holder re-committed round 1 (a higher seq, another model); the certificate names
    its first commit, which the bundle still carries under another file name. The old
    verifier accepted any commit of the holder it found."""
    peer = task.peers[1]
    shard = task.shard_of[peer.peer_id]
    rd = bundle / "round-1"
    canonical = rd / f"result-{shard}-{peer.peer_id}.msg"
    first = canonical.read_bytes()
    later_blob = task.inputs[2][peer.peer_id][0]  # any other model
    later = task.result(peer, 1, later_blob, weight=999.0)
    canonical.write_bytes(later)
    (rd / f"result-{shard}-{peer.peer_id}-first.msg").write_bytes(first)
    reseal(bundle)
    bad = failed(verify_bundle(bundle))
    later_sha = SyntheticTask.sha(later_blob)[:16]
    entry = next(e for e in task.input_entries(1) if e["peer_id"] == peer.peer_id)
    assert bad[f"file round-1/result-{shard}-{peer.peer_id}-first.msg"] == (
        "cannot place: not a bundle file name (SPEC §15.2)"
    ), bad
    assert bad[f"round 1 input {peer.peer_id[-8:]} shard {shard}"] == (
        f"not a signed commit of the shard's holder: the certificate names sha256 {entry['sha256'][:16]}…, "
        f"weight {entry['weight']!r}, round-1/result-{shard}-{peer.peer_id}.msg has sha256 {later_sha}…, "
        "weight 999.0"
    ), bad


def test_a_superseding_commit_anywhere_in_the_bundle_wins(task: SyntheticTask, bundle: Path) -> None:
    """The holder's later commit for round 1 sits in a round-2 file (where it cannot be
    placed); it still supersedes the commit the certificate names."""
    peer = task.peers[0]
    shard = task.shard_of[peer.peer_id]
    later = task.result(peer, 1, task.inputs[2][peer.peer_id][0], weight=5.0)
    seq = open_envelope(later).message.seq
    (bundle / "round-2" / f"result-{shard}-{peer.peer_id}.msg").write_bytes(later)
    reseal(bundle)
    bad = failed(verify_bundle(bundle))
    name = f"round 1 input {peer.peer_id[-8:]} shard {shard}"
    first, later_name = (f"round-{r}/result-{shard}-{peer.peer_id}.msg" for r in (1, 2))
    assert bad[name].startswith(f"names a superseded commit ({first}, "), bad
    assert f"the holder's commit that counts is {later_name} (seq {seq}:" in bad[name], bad


# -- finding 5: a failed check says what differed ----------------------------------------------


def test_failed_checks_say_what_differed(task: SyntheticTask, bundle: Path) -> None:
    data = bytearray((bundle / "round-2" / "output.bin").read_bytes())
    data[len(data) // 2] ^= 1
    (bundle / "round-2" / "output.bin").write_bytes(bytes(data))
    m = manifest(bundle)
    m["result"]["outputs"][0]["sha256"] = "00" * 32
    write_manifest(bundle, m)
    reseal(bundle)
    bad = failed(verify_bundle(bundle))
    certified = SyntheticTask.sha(task.outputs[2])[:16]
    got = hashlib.sha256(bytes(data)).hexdigest()[:16]
    assert bad["round 2 output file"] == (
        f"round-2/output.bin has sha256 {got}…, the certified output is {certified}…"
    )
    size = len(task.outputs[2])
    assert bad["final weights"] == (
        f"the manifest's weights are {'0' * 16}… ({size} bytes), round 2's certified output is "
        f"{certified}… ({size} bytes)"
    )
    assert all("matches" not in d for d in bad.values()), bad


def test_a_manifest_hash_mismatch_shows_both_hashes(bundle: Path) -> None:
    m = manifest(bundle)
    m["files"]["announce.msg"] = "ab" * 32
    write_manifest(bundle, m)
    real = sha(bundle / "announce.msg")[:16]
    assert failed(verify_bundle(bundle)) == {
        "file announce.msg": f"sha256 differs from the manifest: manifest {'ab' * 8}…, file {real}…"
    }


# -- the name grammar (SPEC §15.2) --------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "award-01.msg",
        "round-0/output.bin",
        "round-1/result-0-nope.msg",
        "round-1/../announce.msg",
        "/announce.msg",
        "outputs/shard-0/.hidden",
        "outputs/shard-0/a/b",
        "round-1/output.bin/",
    ],
)
def test_names_outside_the_grammar_do_not_parse(name: str) -> None:
    assert parse_name(name) is None


def test_every_file_of_a_real_bundle_parses(bundle: Path) -> None:
    names = [str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file()]
    assert names and all(parse_name(n) is not None for n in names), names


# -- plain tasks (aggregation none): the shard outputs are the signed results' -------------------


def plain_bundle(d: Path) -> tuple[SyntheticTask, dict[int, bytes]]:
    """A 3-shard echo task: announce, award, one signed result per shard and its output."""
    from protocol.awards import allocate, assignments_of
    from protocol.messages import Award, Bid, TaskAnnounce
    from tests.helpers_training import Forge, keys

    t = SyntheticTask(rounds=1)
    forge = Forge()
    ann_raw = forge.seal(
        t.submitter,
        TaskAnnounce,
        ttl_ms=600_000,
        task_id=t.task_id,
        kind="echo",
        work=28.0 * 600,
        deadline_ms=600_000,
        max_shards=3,
        resources={"gpu": False, "memory_mb": 0},
        aggregation="none",
        rounds=1,
        params={},
        inputs={},
        bid_window_ms=1000,
        net={"k": 0.2, "dc_min": 0.0, "dc_max": None},
    )
    ann = open_envelope(ann_raw).message
    peers = keys(3, salt=2)
    bids = [
        forge.seal(p, Bid, ttl_ms=60_000, task_id=t.task_id, c0=10.0 + i, load=0.0)
        for i, p in enumerate(peers)
    ]
    assignments = assignments_of(allocate(ann, [open_envelope(b) for b in bids]))  # type: ignore[arg-type]
    award = forge.seal(
        t.submitter,
        Award,
        ttl_ms=600_000,
        task_id=t.task_id,
        epoch=0,
        bids=bids,
        assignments=assignments,
        under_capacity=False,
        excluded=[],
    )
    files = {"announce.msg": ann_raw, "award-0.msg": award}
    outs: dict[int, bytes] = {}
    outputs = []
    for a in assignments:
        s, p = a["shard"], next(k for k in peers if k.peer_id == a["peer_id"])
        data = f"echo of shard {s}".encode()
        outs[s] = data
        ref = {"sha256": SyntheticTask.sha(data), "size": len(data)}
        files[f"round-1/result-{s}-{p.peer_id}.msg"] = forge.seal(
            p,
            Result,
            task_id=t.task_id,
            epoch=0,
            shard=s,
            round=1,
            ok=True,
            error=None,
            outputs={"stdout": ref},
            weight=1.0,
            metrics={"wall_seconds": 0.5},
        )
        files[f"outputs/shard-{s}/stdout"] = data
        outputs.append({"name": f"shard-{s}/stdout", **ref})
    for name, data in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(data)
    m = {
        "task_id": t.task_id,
        "kind": "echo",
        "state": "done",
        "rounds": 0,
        "result": {
            "outputs": outputs,
            "metrics": {f"shard-{s}.wall_seconds": 0.5 for s in outs},
            "certificate": None,
        },
        "files": {},
    }
    write_manifest(d, m)
    reseal(d)
    return t, outs


def test_a_plain_bundle_verifies_and_a_swapped_output_is_caught(tmp_path: Path) -> None:
    d = tmp_path / "plain"
    _, outs = plain_bundle(d)
    rep = verify_bundle(d)
    assert rep.ok, failed(rep)
    assert {f"result shard {s}" for s in outs} | {"manifest outputs", "manifest metrics"} <= {
        c.name for c in rep.checks if c.ok
    }
    (d / "outputs" / "shard-0" / "stdout").write_bytes(outs[1])
    reseal(d)
    bad = failed(verify_bundle(d))
    assert bad == {
        "output shard-0/stdout": f"sha256 {SyntheticTask.sha(outs[1])[:16]}…, the signed result commits to "
        f"{SyntheticTask.sha(outs[0])[:16]}…"
    }


def test_a_plain_manifest_claiming_other_outputs_is_caught(tmp_path: Path) -> None:
    d = tmp_path / "plain"
    plain_bundle(d)
    m = manifest(d)
    m["result"]["outputs"][0]["sha256"] = "11" * 32
    write_manifest(d, m)
    bad = failed(verify_bundle(d))
    assert (
        set(bad) == {"manifest outputs"}
        and "shard-0/stdout: manifest {'sha256': '1111" in bad["manifest outputs"]
    )
