"""Check a result bundle without trusting anyone (``peerctl verify``; issue 4 item 4).

Checks, each reported:
1. every signed message verifies (signature, canonical encoding, field bounds);
2. the first award is exactly what the allocation rule gives for the bids it lists,
   and later awards only move shards to listed bidders;
3. per round: the certificate's votes come from the committee drawn from the
   participants of one of the signed awards (never from a set the votes name
   themselves), for the announced rule, and a majority of them match one ballot;
4. each certified input is a committed result of the peer that held the shard, with
   the same hash and weight, and the input file in the bundle has that hash;
5. recomputing the rule over the inputs, in canonical order, gives exactly the
   certified output hash; the output file has that hash.
Pure: reads files, imports no daemon machinery (peerctl runs it).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from protocol.aggregation import aggregate
from protocol.awards import check_award
from protocol.certificate import check_certificate, input_key
from protocol.envelope import Signed, open_envelope
from protocol.errors import ProtocolError
from protocol.messages import Award, Result, TaskAnnounce
from protocol.tensors import decode_arrays, encode_arrays


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class VerifyReport:
    task_id: str = ""
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _open(path: Path, kind: str) -> Signed:
    return open_envelope(path.read_bytes(), kinds=frozenset({kind}))


def verify_bundle(directory: Path) -> VerifyReport:
    rep = VerifyReport()
    d = Path(directory)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        rep.add("manifest", False, f"cannot read manifest.json: {exc}")
        return rep
    rep.task_id = str(manifest.get("task_id", ""))
    for name, digest in sorted(manifest.get("files", {}).items()):
        p = d / name
        if not p.is_file() or _sha(p) != digest:
            rep.add(f"file {name}", False, "missing or hash differs from the manifest")
    try:
        ann_s = _open(d / "announce.msg", "announce")
    except (OSError, ProtocolError) as exc:
        rep.add("announce", False, str(exc))
        return rep
    ann = ann_s.message
    assert isinstance(ann, TaskAnnounce)
    rep.add("announce", ann.task_id == rep.task_id, f"signed by submitter {ann_s.signer}")
    awards: dict[int, Signed] = {}
    opened: list[tuple[int, Path, Signed]] = []
    for p in sorted(d.glob("award-*.msg")):
        try:
            s = _open(p, "award")
            assert isinstance(s.message, Award)
            opened.append((s.message.epoch, p, s))
        except (OSError, ProtocolError) as exc:
            rep.add(f"award {p.name}", False, f"{getattr(exc, 'reason', 'unreadable')}: {exc}")
    # In epoch order, so that each re-award is checked exactly against the one before it.
    for epoch, p, s in sorted(opened, key=lambda t: t[0]):
        aw = s.message
        assert isinstance(aw, Award)
        prev = awards.get(epoch - 1)
        try:
            bids = [open_envelope(b, kinds=frozenset({"bid"})) for b in aw.bids]
            check_award(ann, aw, ann_s.signer, s.signer, bids, prev.message if prev else None)  # type: ignore[arg-type]
        except ProtocolError as exc:
            rep.add(f"award {p.name}", False, f"{exc.reason}: {exc}")
            continue
        if epoch in awards:
            rep.add(f"award {p.name}", False, f"a second award for epoch {epoch}")
            continue
        awards[epoch] = s
        rep.add(f"award epoch {epoch}", True, f"recomputed from {len(bids)} signed bids")
    if 0 not in awards:
        rep.add("awards", False, "no first award in the bundle")
        return rep

    def holder(shard: int, epoch: int) -> str | None:
        eps = [e for e in awards if e <= epoch]
        if not eps:
            return None
        aw = awards[max(eps)].message
        assert isinstance(aw, Award)
        return next((a["peer_id"] for a in aw.assignments if a["shard"] == shard), None)

    rounds = int(manifest.get("rounds", 0))
    if ann.aggregation == "none":
        rep.add("rounds", True, "plain task: shard results, no aggregation round")
        for p in sorted(d.glob("round-*/result-*.msg")):
            try:
                s = _open(p, "result")
                m = s.message
                assert isinstance(m, Result)
                ok = holder(m.shard, m.epoch) == s.signer
                rep.add(f"result shard {m.shard}", ok, f"signed by {s.signer}")
                for name, ref in m.outputs.items():
                    f = d / "outputs" / f"shard-{m.shard}" / name
                    if f.exists():
                        same = _sha(f) == ref["sha256"]
                        rep.add(f"output shard-{m.shard}/{name}", same, "hash matches the signed result")
            except ProtocolError as exc:
                rep.add(f"result {p.name}", False, str(exc))
        return rep
    if rounds < ann.rounds:
        rep.add("rounds", False, f"bundle certifies {rounds} of {ann.rounds} rounds")
    award_msgs = [a.message for a in awards.values() if isinstance(a.message, Award)]
    certified: dict[int, str] = {}
    for rnd in range(1, rounds + 1):
        out = _verify_round(rep, d / f"round-{rnd}", rnd, ann, award_msgs, holder)
        if out is not None:
            certified[rnd] = out
    # The manifest is not signed: its final weights must be the last round's certified output.
    final = [o for o in manifest.get("result", {}).get("outputs", []) if o.get("name") == "weights"]
    if final and ann.rounds in certified:
        rep.add(
            "final weights",
            final[0].get("sha256") == certified[ann.rounds],
            f"the manifest's weights are round {ann.rounds}'s certified output",
        )
    return rep


def _verify_round(
    rep: VerifyReport,
    rd: Path,
    rnd: int,
    ann: TaskAnnounce,
    awards: list[Award],
    holder: Callable[[int, int], str | None],
) -> str | None:
    """Check round ``rnd``; return its certified output hash when the certificate holds."""
    try:
        # The committee must be drawn from the participants of one of the submitter's signed
        # awards (not from a set the votes name themselves), and vote for the task's rule.
        cert = check_certificate(
            [p.read_bytes() for p in sorted(rd.glob("vote-*.msg"))],
            task_id=ann.task_id,
            round_no=rnd,
            awards=awards,
            rule=ann.aggregation,
        )
    except (OSError, ProtocolError) as exc:
        rep.add(f"round {rnd} certificate", False, f"{getattr(exc, 'reason', 'unreadable')}: {exc}")
        return None
    rep.add(
        f"round {rnd} certificate",
        True,
        f"{len(cert.signers)} of {len(cert.committee)} committee votes, rule {cert.rule}",
    )
    # Every signed commit of this round by the holder of its shard, by (peer, shard).
    results: dict[tuple[str, int], list[Result]] = {}
    for p in sorted(rd.glob("result-*.msg")):
        try:
            s = _open(p, "result")
        except (OSError, ProtocolError):
            continue
        m = s.message
        if (
            isinstance(m, Result)
            and m.task_id == ann.task_id
            and m.round == rnd
            and holder(m.shard, m.epoch) == s.signer
        ):
            results.setdefault((s.signer, m.shard), []).append(m)
    agg_in = []
    ok_inputs = True
    for i in cert.inputs:
        peer, shard = i["peer_id"], int(i["shard"])
        name = f"round {rnd} input {peer[-8:]} shard {shard}"
        committed = [
            m
            for m in results.get((peer, shard), [])
            if m.ok and m.outputs.get("weights", {}).get("sha256") == i["sha256"] and m.weight == i["weight"]
        ]
        if not committed:
            ok_inputs = rep.add(name, False, "not a signed commit (hash and weight) of the shard's holder")
            continue
        f = rd / f"input-{peer}-{shard}.bin"
        if not f.is_file() or _sha(f) != i["sha256"]:
            ok_inputs = rep.add(name, False, "input file missing or its hash differs from the commit")
            continue
        try:
            arrays = decode_arrays(f.read_bytes())
        except ProtocolError as exc:
            ok_inputs = rep.add(name, False, f"input is not a tensor list: {exc}")
            continue
        agg_in.append((input_key(peer, shard), i["weight"] if i["weight"] > 0 else 1.0, arrays))
    if ok_inputs:
        rep.add(f"round {rnd} inputs", True, f"{len(agg_in)} inputs match their signed commits")
        try:
            digest = hashlib.sha256(encode_arrays(aggregate(cert.rule, agg_in))).hexdigest()
        except ProtocolError as exc:
            rep.add(f"round {rnd} recomputed", False, f"the inputs cannot be aggregated: {exc}")
        else:
            rep.add(
                f"round {rnd} recomputed",
                digest == cert.output["sha256"],
                f"{cert.rule} over {len(agg_in)} inputs gives {digest[:16]}…, "
                f"certified {cert.output['sha256'][:16]}…",
            )
    out = rd / "output.bin"
    rep.add(
        f"round {rnd} output file",
        out.is_file() and _sha(out) == cert.output["sha256"],
        "hash matches the certified output" if out.is_file() else "missing",
    )
    return str(cert.output["sha256"])
