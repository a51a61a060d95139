"""Check a result bundle without trusting anyone (``peerctl verify``; issue 4 item 4).

Checks, each reported:
1. every signed message verifies (signature, canonical encoding, field bounds);
2. the first award is exactly what the allocation rule gives for the bids it lists,
   and later awards only move shards to listed bidders;
3. per round: the certificate's votes come from the committee drawn for that round,
   a majority of them match one ballot;
4. each certified input is a committed result of the peer that held the shard, with
   the same hash and weight, and the input file in the bundle has that hash;
5. recomputing the rule over the inputs, in canonical order, gives exactly the
   certified output hash; the output file has that hash.
Pure: reads files, imports no daemon machinery (peerctl runs it).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from protocol.aggregation import aggregate
from protocol.awards import check_award
from protocol.certificate import check_certificate
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
    for p in sorted(d.glob("award-*.msg")):
        try:
            s = _open(p, "award")
            aw = s.message
            assert isinstance(aw, Award)
            bids = [open_envelope(b, kinds=frozenset({"bid"})) for b in aw.bids]
            check_award(ann, aw, ann_s.signer, s.signer, bids)
            awards[aw.epoch] = s
            rep.add(f"award epoch {aw.epoch}", True, f"recomputed from {len(bids)} signed bids")
        except (ProtocolError, AssertionError) as exc:
            rep.add(f"award {p.name}", False, str(exc))
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
                rep.add(f"result shard {m.shard}", holder(m.shard, m.epoch) == s.signer, f"signed by {s.signer}")
                for name, ref in m.outputs.items():
                    f = d / "outputs" / f"shard-{m.shard}" / name
                    if f.exists():
                        rep.add(f"output shard-{m.shard}/{name}", _sha(f) == ref["sha256"], "hash matches the signed result")
            except ProtocolError as exc:
                rep.add(f"result {p.name}", False, str(exc))
        return rep
    if rounds < ann.rounds:
        rep.add("rounds", False, f"bundle certifies {rounds} of {ann.rounds} rounds")
    for rnd in range(1, rounds + 1):
        rd = d / f"round-{rnd}"
        try:
            cert = check_certificate(
                [p.read_bytes() for p in sorted(rd.glob("vote-*.msg"))], task_id=ann.task_id, round_no=rnd
            )
        except (OSError, ProtocolError) as exc:
            rep.add(f"round {rnd} certificate", False, str(exc))
            continue
        rep.add(
            f"round {rnd} certificate",
            cert.rule == ann.aggregation,
            f"{len(cert.signers)} of {len(cert.committee)} committee votes, rule {cert.rule}",
        )
        results: dict[str, Result] = {}
        for p in sorted(rd.glob("result-*.msg")):
            try:
                s = _open(p, "result")
                m = s.message
                assert isinstance(m, Result)
                if holder(m.shard, m.epoch) == s.signer:
                    results[s.signer] = m
            except ProtocolError:
                continue
        agg_in = []
        ok_inputs = True
        for i in cert.inputs:
            m2 = results.get(i["peer_id"])
            f = rd / f"input-{i['peer_id']}.bin"
            if m2 is None or m2.outputs.get("weights", {}).get("sha256") != i["sha256"] or m2.weight != i["weight"]:
                ok_inputs = rep.add(f"round {rnd} input {i['peer_id'][-8:]}", False, "not a committed result of the shard's holder")
                continue
            if not f.is_file() or _sha(f) != i["sha256"]:
                ok_inputs = rep.add(f"round {rnd} input {i['peer_id'][-8:]}", False, "input file missing or hash differs")
                continue
            agg_in.append((i["peer_id"], i["weight"] if i["weight"] > 0 else 1.0, decode_arrays(f.read_bytes())))
        if ok_inputs:
            rep.add(f"round {rnd} inputs", True, f"{len(agg_in)} committed inputs match their signed results")
        if agg_in and ok_inputs:
            digest = hashlib.sha256(encode_arrays(aggregate(cert.rule, agg_in))).hexdigest()
            rep.add(f"round {rnd} recomputed", digest == cert.output["sha256"], f"aggregate {digest[:16]}…")
        out = rd / "output.bin"
        rep.add(f"round {rnd} output file", out.is_file() and _sha(out) == cert.output["sha256"], "")
    return rep
