"""Check a result bundle without trusting anything in it (``peerctl verify``; SPEC §15).

The bundle is untrusted input: its files, their names and the unsigned ``manifest.json``
may all be forged. The checks (SPEC §15.5 lists them in order), each reported:
1. files: only regular files inside the bundle directory are read — a name with ``..``,
   an absolute name, a symlink or a special file is refused and never opened; every file
   must have a bundle name (SPEC §15.2) and be listed in the manifest with its sha256;
2. every signed message verifies, and sits in the file its name says (its signer, round,
   shard, epoch); a message that cannot be placed is rejected, not skipped;
3. the first award is exactly what the allocation rule gives for the bids it lists, and
   each re-award is checked against the award of the epoch before it;
4. per round: the certificate's votes come from the committee drawn from the participants
   of the signed award in force for that round (SPEC §11.1: the latest award that does not
   quote the round as certified), for the announced rule, and a quorum of them match one
   ballot; every vote file is part of that certificate;
5. each certified input is the holder's commit that counts (SPEC §11: the highest ``seq``
   of that holder for the round and shard), with the same hash and weight, and the input
   file in the bundle has that hash;
6. recomputing the rule over the inputs, in canonical order, gives exactly the certified
   output hash; the output file has that hash;
7. every claim of the manifest is compared with the signed data, or reported as ignored.
A failed check says what differed (expected and found). Pure: reads files, imports no
daemon machinery (peerctl runs it).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from peerd.bundle import DIR_PATTERN, BundleName, parse_name
from protocol.aggregation import aggregate
from protocol.awards import check_award, logical_shard, quorum_need, replica_value, spot_checked, spot_commit
from protocol.certificate import Certificate, check_certificate, input_key
from protocol.envelope import Signed, open_envelope
from protocol.errors import ProtocolError
from protocol.messages import Award, Result, TaskAnnounce, Vote
from protocol.tensors import decode_arrays, encode_arrays

#: The manifest is small (a file list); a bigger one is refused before it is parsed.
MAX_MANIFEST_BYTES = 16 << 20
#: A bound on the walk, so a directory of millions of entries cannot stall the verifier.
MAX_ENTRIES = 100_000


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""
    #: A claim of the unsigned manifest that nothing signed can confirm: not relied on.
    ignored: bool = False


@dataclass
class VerifyReport:
    task_id: str = ""
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return any(not c.ignored for c in self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    def check(self, name: str, ok: bool, passed: str, failed: str) -> bool:
        """One check, with the text for its outcome: a failure says what differed."""
        return self.add(name, ok, passed if ok else failed)

    def ignore(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, True, detail, ignored=True))


class BundleFileError(Exception):
    """A bundle entry that is refused or unreadable; the message names the entry."""


def _short(digest: Any) -> str:
    return f"{digest[:16]}…" if isinstance(digest, str) and len(digest) > 16 else repr(digest)


def unsafe_name(name: Any) -> str | None:
    """Why ``name`` (from the manifest) must not be opened at all, or None (SPEC §15.2)."""
    if not isinstance(name, str) or not name:
        return "not a non-empty string"
    if "\0" in name or "\\" in name:
        return "a name with NUL or a backslash"
    if PurePosixPath(name).is_absolute():
        return "an absolute path"
    if any(p == ".." for p in name.split("/")):
        return "a path that leaves the bundle directory (..)"
    if any(p in ("", ".") for p in name.split("/")):
        return "a path with an empty or '.' component"
    return None


class BundleDir:
    """The bundle directory, read without following anything out of it.

    Every file is opened component by component relative to the directory's own file
    descriptor with ``O_NOFOLLOW``, and must be a regular file when opened (``fstat``), so
    neither a symlink nor a path swapped between listing and reading can lead outside.
    The directory itself is the caller's choice and may be reached through a symlink.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        #: name → size of every regular file with a bundle name's directory shape.
        self.files: dict[str, int] = {}
        #: entries refused while walking: name → why.
        self.refused: dict[str, str] = {}

    def walk(self) -> None:
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._walk(fd, "")
        finally:
            os.close(fd)

    def _walk(self, dir_fd: int, prefix: str) -> None:
        with os.scandir(dir_fd) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            if len(self.files) + len(self.refused) >= MAX_ENTRIES:
                self.refused[f"{prefix}…"] = f"more than {MAX_ENTRIES} entries"
                return
            name = prefix + e.name
            if e.is_symlink():
                self.refused[name] = "refused: a symlink (a bundle holds regular files only)"
            elif e.is_dir(follow_symlinks=False):
                if DIR_PATTERN.fullmatch(name) is None:
                    self.refused[name + "/"] = "cannot place: not a bundle directory"
                    continue
                sub = os.open(e.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dir_fd)
                try:
                    self._walk(sub, name + "/")
                finally:
                    os.close(sub)
            elif e.is_file(follow_symlinks=False):
                self.files[name] = e.stat(follow_symlinks=False).st_size
            else:
                self.refused[name] = "refused: not a regular file (a device, FIFO or socket)"

    @contextmanager
    def _open(self, name: str) -> Iterator[int]:
        why = unsafe_name(name)
        if why is not None:
            raise BundleFileError(f"refused: {why}")
        if name in self.refused:
            raise BundleFileError(self.refused[name])
        parts = name.split("/")
        fds: list[int] = []
        try:
            fds.append(os.open(self.root, os.O_RDONLY | os.O_DIRECTORY))
            for p in parts[:-1]:
                fds.append(os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
            # O_NONBLOCK: a FIFO put in a file's place must not block the open.
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fds[-1])
            fds.append(fd)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BundleFileError("refused: not a regular file")
            yield fd
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise BundleFileError("refused: a symlink (a bundle holds regular files only)") from None
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise BundleFileError("missing") from None
            raise BundleFileError(f"unreadable: {exc.strerror}") from None
        finally:
            for f in reversed(fds):
                os.close(f)

    def read(self, name: str, limit: int | None = None) -> bytes:
        with self._open(name) as fd:
            size = os.fstat(fd).st_size
            if limit is not None and size > limit:
                raise BundleFileError(f"refused: {size} bytes, more than {limit}")
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)

    def sha256(self, name: str) -> str:
        digest = hashlib.sha256()
        with self._open(name) as fd:
            while chunk := os.read(fd, 1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def names(self, kind: str) -> list[tuple[str, BundleName]]:
        out = []
        for name in sorted(self.files):
            parsed = parse_name(name)
            if parsed is not None and parsed.kind == kind:
                out.append((name, parsed))
        return out


@dataclass
class _Round:
    """What was established about one round from its signed files."""

    #: (peer, shard) → every validly signed commit of that holder for this round and shard,
    #: with the file it was found in (placed or not: a misplaced later commit still
    #: supersedes, SPEC §11).
    commits: dict[tuple[str, int], list[tuple[str, Signed]]] = field(default_factory=dict)
    #: (peer, shard) → the commit in the file named for it, when that file is placed.
    placed: dict[tuple[str, int], Signed] = field(default_factory=dict)


def verify_bundle(directory: Path) -> VerifyReport:
    rep = VerifyReport()
    b = BundleDir(Path(directory))
    try:
        b.walk()
    except OSError as exc:
        rep.add("bundle", False, f"cannot read the bundle directory {directory}: {exc.strerror or exc}")
        return rep
    manifest = _read_manifest(rep, b)
    if manifest is None:
        return rep
    _check_files(rep, b, manifest)
    try:
        ann_s = open_envelope(b.read("announce.msg"), kinds=frozenset({"announce"}))
    except (BundleFileError, ProtocolError) as exc:
        rep.add("announce", False, f"announce.msg: {exc}")
        return rep
    ann = ann_s.message
    assert isinstance(ann, TaskAnnounce)
    rep.check(
        "announce",
        ann.task_id == rep.task_id,
        f"task {ann.task_id}, signed by submitter {ann_s.signer}",
        f"the manifest names task {rep.task_id!r}, the signed announce task {ann.task_id}",
    )
    rep.check(
        "manifest kind",
        manifest.get("kind") == ann.kind,
        f"{ann.kind}, as announced",
        f"the manifest claims kind {manifest.get('kind')!r}, the signed announce {ann.kind!r}",
    )
    awards = _check_awards(rep, b, ann, ann_s.signer)
    if 0 not in awards:
        rep.add("awards", False, "no first award in the bundle")
        return rep

    def holder(shard: int, epoch: int) -> str | None:
        eps = [e for e in awards if e <= epoch]
        if not eps:
            return None
        aw = awards[max(eps)]
        return next((a["peer_id"] for a in aw.assignments if a["shard"] == shard), None)

    rounds = _place_results(rep, b, ann, holder)
    if ann.aggregation == "none":
        _verify_plain(rep, b, manifest, ann, awards, rounds)
        return rep
    certs: dict[int, Certificate] = {}
    for rnd in range(1, ann.rounds + 1):
        cert = _verify_round(rep, b, rnd, ann, list(awards.values()), rounds.get(rnd, _Round()))
        if cert is not None:
            certs[rnd] = cert
    for name, _ in b.names("shard_output"):
        rep.add(
            f"place {name}", False, "cannot place: only a plain task (aggregation none) has shard outputs"
        )
    for kind in ("vote", "input", "output"):
        for name, parsed in b.names(kind):
            if parsed.round is not None and parsed.round > ann.rounds:
                rep.add(f"place {name}", False, f"cannot place: the task has {ann.rounds} round(s)")
    rep.check(
        "rounds",
        len(certs) == ann.rounds,
        f"all {ann.rounds} rounds certified",
        f"bundle certifies {len(certs)} of {ann.rounds} rounds",
    )
    claimed = manifest.get("rounds")
    rep.check(
        "manifest rounds",
        claimed == len(certs),
        f"{len(certs)} certified rounds",
        f"the manifest claims {claimed!r} certified round(s); the bundle certifies {len(certs)}",
    )
    # The size of the certified output file (its hash was checked against the certificate).
    out_size = b.files.get(f"round-{ann.rounds}/output.bin")
    _check_manifest_result(rep, manifest, ann, certs, out_size)
    return rep


# -- the manifest and the file list ------------------------------------------------------------


def _read_manifest(rep: VerifyReport, b: BundleDir) -> dict[str, Any] | None:
    try:
        raw = b.read("manifest.json", limit=MAX_MANIFEST_BYTES)
        manifest = json.loads(raw)
    except BundleFileError as exc:
        rep.add("manifest", False, f"manifest.json: {exc}")
        return None
    except (ValueError, RecursionError) as exc:
        rep.add("manifest", False, f"manifest.json is not JSON: {str(exc)[:200]}")
        return None
    if not isinstance(manifest, dict):
        rep.add("manifest", False, f"manifest.json is a JSON {type(manifest).__name__}, not an object")
        return None
    problems = []
    for key, typ in (("task_id", str), ("kind", str), ("rounds", int), ("files", dict)):
        value = manifest.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            problems.append(
                f"{key!r} is {type(value).__name__ if key in manifest else 'missing'}, must be {typ.__name__}"
            )
    if "result" in manifest and not isinstance(manifest["result"], dict):
        problems.append("'result' must be an object")
    if problems:
        rep.add("manifest", False, "; ".join(problems))
        return None
    rep.task_id = manifest["task_id"]
    for key in sorted(set(manifest) - {"task_id", "kind", "rounds", "files", "result", "state"}):
        rep.ignore(f"manifest {key}", "ignored: not a manifest field (SPEC §15.3)")
    if "state" in manifest:
        rep.ignore("manifest state", f"ignored: {manifest['state']!r} is not signed by anyone")
    return manifest


def _check_files(rep: VerifyReport, b: BundleDir, manifest: dict[str, Any]) -> None:
    """The manifest's file list against the directory: only a consistency check (the
    manifest is unsigned), but it never opens a name that could lead outside."""
    listed: dict[str, Any] = manifest["files"]
    bad = 0
    for name, refusal in sorted(b.refused.items()):
        bad += not rep.add(f"file {name}", False, refusal)
    for name, digest in sorted(listed.items()):
        why = unsafe_name(name)
        if why is not None:
            bad += not rep.add(f"file {name}", False, f"refused, not opened: the manifest lists {why}")
            continue
        if name in b.refused:
            continue  # reported above
        if parse_name(name) is None or name == "manifest.json":
            bad += not rep.add(
                f"file {name}", False, "cannot place: the manifest lists a name that is no bundle file"
            )
            continue
        if name not in b.files:
            bad += not rep.add(
                f"file {name}", False, f"missing: listed in the manifest (sha256 {_short(digest)})"
            )
            continue
        try:
            got = b.sha256(name)
        except BundleFileError as exc:
            bad += not rep.add(f"file {name}", False, str(exc))
            continue
        if got != digest:
            bad += not rep.add(
                f"file {name}",
                False,
                f"sha256 differs from the manifest: manifest {_short(digest)}, file {_short(got)}",
            )
    for name in sorted(b.files):
        if name == "manifest.json":
            continue
        if parse_name(name) is None:
            bad += not rep.add(f"file {name}", False, "cannot place: not a bundle file name (SPEC §15.2)")
        elif name not in listed:
            bad += not rep.add(f"file {name}", False, "in the bundle but not listed in the manifest")
    if not bad:
        rep.add("files", True, f"{len(listed)} files, each listed in the manifest with its sha256")


# -- signed messages and where they sit ------------------------------------------------------


def _open(b: BundleDir, name: str, kind: str) -> Signed:
    return open_envelope(b.read(name), kinds=frozenset({kind}))


def _check_awards(rep: VerifyReport, b: BundleDir, ann: TaskAnnounce, submitter: str) -> dict[int, Award]:
    opened: list[tuple[int, str, Signed]] = []
    for name, parsed in b.names("award"):
        try:
            s = _open(b, name, "award")
        except (BundleFileError, ProtocolError) as exc:
            rep.add(f"award {name}", False, f"{getattr(exc, 'reason', 'unreadable')}: {exc}")
            continue
        aw = s.message
        assert isinstance(aw, Award)
        if aw.epoch != parsed.epoch or aw.task_id != ann.task_id:
            rep.add(
                f"award {name}",
                False,
                f"cannot place: the file is named for epoch {parsed.epoch} of task {ann.task_id}, "
                f"it holds epoch {aw.epoch} of task {aw.task_id}",
            )
            continue
        opened.append((aw.epoch, name, s))
    awards: dict[int, Award] = {}
    # In epoch order, so that each re-award is checked exactly against the one before it.
    for epoch, name, s in sorted(opened, key=lambda t: t[0]):
        aw = s.message
        assert isinstance(aw, Award)
        prev = awards.get(epoch - 1)
        if epoch > 0 and prev is None:
            rep.add(
                f"award {name}",
                False,
                f"a re-award of epoch {epoch} without a valid award of epoch {epoch - 1}",
            )
            continue
        try:
            bids = [open_envelope(raw, kinds=frozenset({"bid"})) for raw in aw.bids]
            check_award(ann, aw, submitter, s.signer, bids, prev)
        except ProtocolError as exc:
            rep.add(f"award {name}", False, f"{exc.reason}: {exc}")
            continue
        awards[epoch] = aw
        # SPEC §10.3: caps are recomputed with, not proven — say so rather than imply more.
        caps = (
            f" plus the submitter's caps on {len(aw.caps)} bid(s) (its claim of what they delivered:"
            " consistent, not provable)"
            if aw.caps
            else ""
        )
        rep.add(f"award epoch {epoch}", True, f"recomputed from {len(bids)} signed bids{caps}")
    return awards


def _carried(b: BundleDir, shard: int, m: Result) -> bool:
    """Whether the bundle's output files of ``shard`` are exactly ``m``'s outputs (by hash)."""
    files = {p.output: name for name, p in b.names("shard_output") if p.shard == shard}
    if not files or set(files) != set(m.outputs):
        return False
    try:
        return all(b.sha256(files[n]) == ref["sha256"] for n, ref in m.outputs.items())
    except BundleFileError:
        return False


def _backup_taken(b: BundleDir, shard: int, others: list[Signed]) -> Signed | None:
    """An earlier holder's OK commit of ``shard`` whose outputs the bundle carries (the first
    valid result, taken over a backup holder's), or None."""
    for s in sorted(others, key=lambda s: (s.signer, s.message.seq)):
        m = s.message
        if isinstance(m, Result) and m.ok and _carried(b, shard, m):
            return s
    return None


def _place_results(
    rep: VerifyReport, b: BundleDir, ann: TaskAnnounce, holder: Callable[[int, int], str | None]
) -> dict[int, _Round]:
    """Open every result file; reject each one that is not where its name says, or whose
    signer did not hold the shard at the commit's epoch (SPEC §7.7 ``not_holder``)."""
    rounds: dict[int, _Round] = {}
    for name, parsed in b.names("result"):
        assert parsed.round is not None and parsed.shard is not None
        try:
            s = _open(b, name, "result")
        except (BundleFileError, ProtocolError) as exc:
            rep.add(f"place {name}", False, f"{getattr(exc, 'reason', 'unreadable')}: {exc}")
            continue
        m = s.message
        assert isinstance(m, Result)
        if m.task_id != ann.task_id:
            rep.add(f"place {name}", False, f"cannot place: a result for task {m.task_id}, not {ann.task_id}")
            continue
        rd = rounds.setdefault(m.round, _Round())
        owner = holder(m.shard, m.epoch)
        if owner == s.signer:
            rd.commits.setdefault((s.signer, m.shard), []).append((name, s))
        problems = []
        if (m.round, m.shard, s.signer) != (parsed.round, parsed.shard, parsed.peer):
            problems.append(
                f"the file is named for round {parsed.round}, shard {parsed.shard}, peer {parsed.peer}; "
                f"it holds round {m.round}, shard {m.shard}, signed by {s.signer}"
            )
        if m.round > ann.rounds:
            problems.append(f"round {m.round} is beyond the task's {ann.rounds} round(s)")
        if owner != s.signer:
            problems.append(
                f"signed by {s.signer}, who did not hold shard {m.shard} at epoch {m.epoch} "
                f"(the award gives it to {owner})"
            )
        if problems:
            rep.add(f"place {name}", False, "cannot place: " + "; ".join(problems))
            continue
        rd.placed[(s.signer, m.shard)] = s
    return rounds


# -- plain tasks -------------------------------------------------------------------------------


def _verify_plain(
    rep: VerifyReport,
    b: BundleDir,
    manifest: dict[str, Any],
    ann: TaskAnnounce,
    awards: dict[int, Award],
    rounds: dict[int, _Round],
) -> None:
    for kind in ("vote", "input", "output"):
        for name, _ in b.names(kind):
            rep.add(
                f"place {name}",
                False,
                "cannot place: a plain task (aggregation none) has no aggregation round",
            )
    final = awards[max(awards)]
    quorum: list[dict[str, Any]] = []
    if ann.verify is not None:
        checked = _spot_checked(rep, manifest, ann, awards[0]) if ann.verify_mode == "spot-check" else []
        results = _replicated_results(rep, ann, final, rounds, quorum, checked)
    else:
        results = _plain_results(rep, b, final, rounds)
    _check_plain_outputs(rep, b, manifest, results, quorum)


def _plain_results(
    rep: VerifyReport, b: BundleDir, final: Award, rounds: dict[int, _Round]
) -> dict[int, Result]:
    # Each shard's result: the latest (highest seq) commit of its holder under the last award —
    # or, with a backup holder (SPEC §7.6: the first valid result wins), an OK commit of an
    # earlier holder of the shard (placed at an epoch where it held it) whose outputs are the
    # ones the bundle carries.
    results: dict[int, Result] = {}
    for a in sorted(final.assignments, key=lambda a: a["shard"]):
        shard, peer = int(a["shard"]), str(a["peer_id"])
        found = [s for rd in rounds.values() for (p, sh), s in rd.placed.items() if (p, sh) == (peer, shard)]
        latest = max(found, key=lambda s: s.message.seq, default=None)
        m = latest.message if latest is not None else None
        taken = _backup_taken(
            b,
            shard,
            [s for rd in rounds.values() for (p, sh), s in rd.placed.items() if sh == shard and p != peer],
        )
        if taken is not None and not (isinstance(m, Result) and m.ok and _carried(b, shard, m)):
            peer, m = taken.signer, taken.message
        ok = isinstance(m, Result) and m.ok
        rep.check(
            f"result shard {shard}",
            ok,
            f"signed by its holder {peer}",
            "no signed result from its holder " + peer
            if m is None
            else f"its holder {peer} reports failure: {getattr(m, 'error', '')}",
        )
        if isinstance(m, Result) and m.ok:
            results[shard] = m
    return results


def _spot_checked(rep: VerifyReport, manifest: dict[str, Any], ann: TaskAnnounce, first: Award) -> list[int]:
    """A spot-checked task's drawn shards (SPEC §7.10): the manifest shows the salt, the
    signed announce commits to it, and the draw is recomputed from it."""
    spot = manifest.get("result", {}).get("spot")
    salt_hex = spot.get("salt") if isinstance(spot, dict) else None
    try:
        salt = bytes.fromhex(salt_hex) if isinstance(salt_hex, str) else None
    except ValueError:
        salt = None
    assert ann.verify is not None
    if salt is None or spot_commit(salt) != ann.verify["commit"]:
        rep.add("spot-check salt", False, "the manifest shows no salt that the signed announce commits to")
        return list(range(len(first.assignments)))  # unknown draw: every shard must show two peers
    drawn = spot_checked(ann.task_id, salt, len(first.assignments), float(ann.verify["fraction"]))
    rep.check(
        "spot-check salt",
        isinstance(spot, dict) and spot.get("checked") == drawn,
        f"matches the announce's commit; it draws shard(s) {drawn}",
        f"the manifest says shards {spot.get('checked') if isinstance(spot, dict) else None!r} were drawn;"
        f" the salt draws {drawn}",
    )
    return drawn


def _replicated_results(
    rep: VerifyReport,
    ann: TaskAnnounce,
    final: Award,
    rounds: dict[int, _Round],
    quorum: list[dict[str, Any]],
    checked: list[int],
) -> dict[int, Result]:
    """SPEC §7.10 from the signed files alone: per shard, every copy of the last award has an OK
    result signed by a peer that held it, and a strict majority of the peers that signed one,
    at least ``quorum_need`` of them, signed the same value. That value is the shard's result.
    Each peer counts with its one stored result per copy (its first is final)."""
    groups: dict[int, list[int]] = {}
    for a in final.assignments:
        groups.setdefault(logical_shard(a), []).append(int(a["shard"]))
    results: dict[int, Result] = {}
    for work, shards in sorted(groups.items()):
        need = quorum_need(ann, work, checked)
        latest: dict[tuple[str, int], Signed] = {}
        for rd in rounds.values():
            for (peer, shard), s in rd.placed.items():
                m = s.message
                if shard in shards and isinstance(m, Result) and m.ok:
                    latest[(peer, shard)] = s
        missing = sorted(set(shards) - {shard for _, shard in latest})
        votes: dict[tuple[Any, ...], set[str]] = {}
        first: dict[tuple[Any, ...], tuple[int, Result]] = {}
        for (peer, shard), s in sorted(latest.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            m = s.message
            assert isinstance(m, Result)
            votes.setdefault(replica_value(m), set()).add(peer)
            first.setdefault(replica_value(m), (shard, m))
        peers: set[str] = set().union(*votes.values()) if votes else set()
        best = max(votes, key=lambda v: (len(votes[v]), -first[v][0])) if votes else None
        agreed = votes[best] if best is not None else set()
        ok = not missing and 2 * len(agreed) > len(peers) and len(agreed) >= need
        outvoted = sorted(peers - agreed)
        rep.check(
            f"quorum shard {work}",
            ok,
            f"{len(agreed)} of {len(peers)} peers signed the same output over {len(shards)} copies"
            + (f"; outvoted: {', '.join(outvoted)}" if outvoted else ""),
            f"copies {missing} have no signed OK result from a holder"
            if missing
            else f"no strict majority of at least {need}: {sorted(map(len, votes.values()))} per output",
        )
        if ok and best is not None:
            results[work] = first[best][1]
            quorum.append(
                {"shard": work, "copies": sorted(shards), "agreed": sorted(agreed), "disagreed": outvoted}
            )
    return results


def _check_plain_outputs(
    rep: VerifyReport,
    b: BundleDir,
    manifest: dict[str, Any],
    results: dict[int, Result],
    quorum: list[dict[str, Any]],
) -> None:
    expected: dict[str, dict[str, Any]] = {
        f"shard-{shard}/{name}": ref for shard, m in results.items() for name, ref in m.outputs.items()
    }
    for name, parsed in b.names("shard_output"):
        key = f"shard-{parsed.shard}/{parsed.output}"
        ref = expected.get(key)
        if ref is None:
            rep.add(
                f"place {name}", False, "cannot place: no signed result of the shard's holder has this output"
            )
            continue
        try:
            got = b.sha256(name)
        except BundleFileError as exc:
            rep.add(f"output {key}", False, str(exc))
            continue
        rep.check(
            f"output {key}",
            got == ref["sha256"],
            "hash matches the signed result",
            f"sha256 {_short(got)}, the signed result commits to {_short(ref['sha256'])}",
        )
    for key in sorted(set(expected) - {f"shard-{p.shard}/{p.output}" for _, p in b.names("shard_output")}):
        rep.add(
            f"output {key}", False, f"missing: the signed result commits to {_short(expected[key]['sha256'])}"
        )
    rep.check(
        "manifest rounds",
        manifest.get("rounds") == 0,
        "0: a plain task has no certified round",
        f"the manifest claims {manifest.get('rounds')!r} certified round(s); a plain task has none",
    )
    result = manifest.get("result", {})
    claims = result.get("outputs", [])
    got_claims = {}
    for o in claims if isinstance(claims, list) else [claims]:
        if isinstance(o, dict) and isinstance(o.get("name"), str):
            got_claims[o["name"]] = {"sha256": o.get("sha256"), "size": o.get("size")}
    want = {k: {"sha256": v["sha256"], "size": v["size"]} for k, v in expected.items()}
    diff = [
        f"{k}: manifest {got_claims.get(k)}, signed {want.get(k)}"
        for k in sorted(set(want) | set(got_claims))
        if got_claims.get(k) != want.get(k)
    ]
    if "outputs" in result or diff:
        rep.check(
            "manifest outputs",
            not diff,
            f"{len(want)} outputs, as the signed results commit",
            "; ".join(diff)[:2000],
        )
    metrics = result.get("metrics")
    if isinstance(metrics, dict) and metrics:
        signed = {f"shard-{s}.{k}": v for s, m in results.items() for k, v in m.metrics.items()}
        diff = [
            f"{k}: manifest {metrics.get(k)!r}, signed {signed.get(k)!r}"
            for k in sorted(set(signed) | set(metrics))
            if metrics.get(k) != signed.get(k)
        ]
        rep.check("manifest metrics", not diff, "as the signed results report", "; ".join(diff)[:2000])
    if "replicas" in result or quorum:
        rep.check(
            "manifest replicas",
            result.get("replicas") == quorum,
            f"{len(quorum)} shard quorum(s), as the signed results show",
            f"the manifest claims {result.get('replicas')!r}; the signed results show {quorum!r}"[:2000],
        )
    for key in sorted(set(result) - {"outputs", "metrics", "certificate", "replicas", "spot"}):
        rep.ignore(f"manifest result.{key}", "ignored: not a manifest field (SPEC §15.3)")
    if result.get("certificate") is not None:
        rep.add("manifest certificate", False, "a plain task has no certificate, the manifest claims one")


# -- aggregated rounds -------------------------------------------------------------------------


def _verify_round(
    rep: VerifyReport,
    b: BundleDir,
    rnd: int,
    ann: TaskAnnounce,
    awards: list[Award],
    rd: _Round,
) -> Certificate | None:
    """Check round ``rnd``; return its certificate when the certificate holds."""
    vote_files = b.names("vote")
    mine = [(name, p) for name, p in vote_files if p.round == rnd]
    try:
        raws = [b.read(name) for name, _ in mine]
        # The committee must be drawn from the participants of the submitter's signed award in
        # force for this round (SPEC §11.1; not from a set the votes name themselves), and vote
        # for the task's rule.
        cert = check_certificate(raws, task_id=ann.task_id, round_no=rnd, awards=awards, rule=ann.aggregation)
    except (BundleFileError, ProtocolError) as exc:
        detail = (
            f"{getattr(exc, 'reason', 'unreadable')}: {exc}" if mine else "missing: no votes in the bundle"
        )
        rep.add(f"round {rnd} certificate", False, detail)
        _reject_round_leftovers(rep, b, rnd)
        return None
    rep.add(
        f"round {rnd} certificate",
        True,
        f"{len(cert.signers)} of {len(cert.committee)} committee votes, rule {cert.rule}",
    )
    # Every vote file is one of the certificate's votes, by the peer its name says.
    ballot = None
    for name, parsed in mine:
        s = open_envelope(b.read(name), kinds=frozenset({"vote"}))
        v = s.message
        assert isinstance(v, Vote)
        if ballot is None:
            ballot = _cert_ballot(cert)
        if s.signer != parsed.peer or v.ballot() != ballot:
            why = (
                f"signed by {s.signer}, not {parsed.peer}"
                if s.signer != parsed.peer
                else "its ballot is not the certificate's"
            )
            rep.add(f"place {name}", False, f"cannot place: {why}")
    agg_in = []
    ok_inputs = True
    named = {(str(i["peer_id"]), int(i["shard"])) for i in cert.inputs}
    for i in cert.inputs:
        peer, shard = str(i["peer_id"]), int(i["shard"])
        name = f"round {rnd} input {peer[-8:]} shard {shard}"
        problem = _commit_problem(rd, rnd, peer, shard, i)
        if problem is not None:
            ok_inputs = rep.add(name, False, problem)
            continue
        fname = f"round-{rnd}/input-{peer}-{shard}.bin"
        try:
            data = b.read(fname)
        except BundleFileError as exc:
            if str(exc) == "missing":
                ok_inputs = rep.add(
                    name, False, f"input file missing: {fname} (sha256 {_short(i['sha256'])})"
                )
            else:
                ok_inputs = rep.add(name, False, f"{fname}: {exc}")
            continue
        got_in = hashlib.sha256(data).hexdigest()
        if got_in != i["sha256"]:
            ok_inputs = rep.add(
                name,
                False,
                f"input file hash differs from the commit: committed {_short(i['sha256'])}, "
                f"file {_short(got_in)}",
            )
            continue
        try:
            arrays = decode_arrays(data)
        except ProtocolError as exc:
            ok_inputs = rep.add(name, False, f"input is not a tensor list: {exc}")
            continue
        agg_in.append((input_key(peer, shard), i["weight"] if i["weight"] > 0 else 1.0, arrays))
    for fname, parsed in b.names("input"):
        if parsed.round == rnd and (parsed.peer, parsed.shard) not in named:
            rep.add(f"place {fname}", False, "cannot place: the certificate names no such input")
    certified = str(cert.output["sha256"])
    if ok_inputs:
        rep.add(f"round {rnd} inputs", True, f"{len(agg_in)} inputs match their signed commits")
        try:
            digest = hashlib.sha256(encode_arrays(aggregate(cert.rule, agg_in))).hexdigest()
        except ProtocolError as exc:
            rep.add(f"round {rnd} recomputed", False, f"the inputs cannot be aggregated: {exc}")
        else:
            rep.check(
                f"round {rnd} recomputed",
                digest == certified,
                f"{cert.rule} over {len(agg_in)} inputs gives {_short(digest)}, as certified",
                f"{cert.rule} over {len(agg_in)} inputs gives {_short(digest)}, "
                f"certified {_short(certified)}",
            )
    out = f"round-{rnd}/output.bin"
    try:
        got: str | None = b.sha256(out)
    except BundleFileError as exc:
        got = None
        if str(exc) != "missing":
            rep.add(f"round {rnd} output file", False, f"{out}: {exc}")
            return cert
    rep.check(
        f"round {rnd} output file",
        got == certified,
        f"hash matches the certified output {_short(certified)}",
        f"{out} missing (certified {_short(certified)})"
        if got is None
        else f"{out} has sha256 {_short(got)}, the certified output is {_short(certified)}",
    )
    return cert


def _cert_ballot(cert: Certificate) -> tuple[Any, ...]:
    return (
        cert.task_id,
        cert.round,
        cert.rule,
        cert.committee,
        tuple((i["peer_id"], i["shard"], i["sha256"], i["weight"]) for i in cert.inputs),
        cert.output["sha256"],
    )


def _commit_problem(rd: _Round, rnd: int, peer: str, shard: int, entry: dict[str, Any]) -> str | None:
    """Why the certificate's input ``entry`` is not the commit that counts (SPEC §11:
    the holder's highest-``seq`` commit for the round and shard), or None."""
    want = f"sha256 {_short(entry['sha256'])}, weight {entry['weight']!r}"
    fname = f"round-{rnd}/result-{shard}-{peer}.msg"
    counted = rd.placed.get((peer, shard))
    if counted is None:
        return (
            f"not a signed commit of the shard's holder: the certificate names {want}, and {fname} "
            "is missing or cannot be placed"
        )

    def matches(s: Signed) -> bool:
        m = s.message
        return (
            isinstance(m, Result)
            and m.ok
            and m.weight == entry["weight"]
            and m.outputs.get("weights", {}).get("sha256") == entry["sha256"]
        )

    # Every validly signed commit of the holder for this round and shard, wherever it lies.
    latest_name, latest = max(
        rd.commits.get((peer, shard), [(fname, counted)]), key=lambda t: t[1].message.seq
    )
    if matches(latest):
        return (
            None if latest.raw == counted.raw else f"the commit that counts ({latest_name}) is not in {fname}"
        )
    m = latest.message
    assert isinstance(m, Result)
    got = f"sha256 {_short(m.outputs.get('weights', {}).get('sha256'))}, weight {m.weight!r}" + (
        "" if m.ok else ", not ok"
    )
    older = [n for n, s in rd.commits.get((peer, shard), []) if matches(s)]
    if older:
        return (
            f"names a superseded commit ({older[0]}, {want}): the holder's commit that counts is "
            f"{latest_name} (seq {m.seq}: {got})"
        )
    return f"not a signed commit of the shard's holder: the certificate names {want}, {latest_name} has {got}"


def _reject_round_leftovers(rep: VerifyReport, b: BundleDir, rnd: int) -> None:
    """Without a certificate nothing of the round's votes, inputs or output can be placed."""
    for kind in ("input", "output"):
        for name, parsed in b.names(kind):
            if parsed.round == rnd:
                rep.add(f"place {name}", False, f"cannot place: round {rnd} has no valid certificate")


def _check_manifest_result(
    rep: VerifyReport,
    manifest: dict[str, Any],
    ann: TaskAnnounce,
    certs: dict[int, Certificate],
    out_size: int | None,
) -> None:
    """The manifest's ``result`` (unsigned) against the last round's certificate."""
    result = manifest.get("result", {})
    last = certs.get(ann.rounds)
    outputs = result.get("outputs")
    if outputs is not None:
        names = (
            [o.get("name") if isinstance(o, dict) else o for o in outputs]
            if isinstance(outputs, list)
            else [outputs]
        )
        if names != ["weights"]:
            rep.add(
                "final weights",
                False,
                f"the manifest must list one output, weights; it lists {names!r}"[:500],
            )
        elif last is not None:
            claim = outputs[0]
            # The size is checked only when the output file is there to say it.
            want = {"sha256": str(last.output["sha256"]), "size": out_size}
            got = {"sha256": claim.get("sha256"), "size": claim.get("size") if out_size is not None else None}
            rep.check(
                "final weights",
                got == want,
                f"the manifest's weights are round {ann.rounds}'s certified output",
                f"the manifest's weights are {_short(got['sha256'])} ({got['size']!r} bytes), round "
                f"{ann.rounds}'s certified output is {_short(want['sha256'])} ({want['size']!r} bytes)",
            )
    claim = result.get("certificate")
    if claim is not None and last is not None:
        want_c = {
            "round": last.round,
            "rule": last.rule,
            "committee": list(last.committee),
            "signers": list(last.signers),
            "output": last.output["sha256"],
        }
        if not isinstance(claim, dict):
            rep.add("manifest certificate", False, f"not an object: {claim!r}"[:200])
        else:
            diff = []
            for k in sorted(set(want_c) | set(claim)):
                said: Any = claim.get(k)
                shown: Any = want_c.get(k)
                if isinstance(said, list) and isinstance(shown, list) and k in ("committee", "signers"):
                    said = sorted(map(str, said))
                    if said != shown:
                        diff.append(
                            f"{k}: the manifest claims {len(said)} ({', '.join(p[-8:] for p in said)}), "
                            f"the votes have {len(shown)} ({', '.join(p[-8:] for p in shown)})"
                        )
                elif said != shown:
                    diff.append(f"{k}: the manifest claims {said!r}, the votes {shown!r}")
            rep.check(
                "manifest certificate",
                not diff,
                f"round {last.round}, {len(last.signers)} of {len(last.committee)} signers, "
                "as the votes show",
                "; ".join(diff)[:2000],
            )
    if result.get("metrics"):
        rep.ignore("manifest metrics", "ignored: the submitter's own evaluation, signed by no one")
    for key in sorted(set(result) - {"outputs", "metrics", "certificate"}):
        rep.ignore(f"manifest result.{key}", "ignored: not a manifest field (SPEC §15.3)")
