"""The result bundle: everything someone outside the network needs to check a result.

``peerctl result TASK -o DIR`` writes it; ``peerctl verify DIR`` checks it with
:mod:`peerd.verify`. Signed messages are stored as their exact envelope bytes. The format,
and what a verifier checks, is protocol/SPEC.md §15.

Layout (every file name is one of these, :func:`parse_name`)::

    manifest.json                        task id, kind, state, rounds, result, file list (sha256)
    announce.msg                         the submitter's signed announce
    award-<epoch>.msg                    every signed award (each lists the signed bids it used)
    round-<r>/result-<shard>-<peer>.msg  every signed result (commit) of round r; a shard
                                         re-awarded mid-round has one per holder
    round-<r>/vote-<peer>.msg            the votes forming round r's certificate
    round-<r>/input-<peer>-<shard>.bin   each committed output O_i (for recomputation); a
                                         peer holding two shards has two
    round-<r>/output.bin                 the certified aggregate O
    outputs/shard-<shard>/<name>         plain tasks: each shard's outputs
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from protocol.envelope import open_envelope
from protocol.messages import TaskAnnounce, Vote

if TYPE_CHECKING:  # the verifier imports this module's name grammar without the daemon
    from peerd.node import Node

_PEER = r"(12D3KooW[1-9A-HJ-NP-Za-km-z]{44})"
_NUM = r"(0|[1-9][0-9]{0,4})"
_POS = r"([1-9][0-9]{0,4})"
_NAME = r"([A-Za-z0-9][A-Za-z0-9_.\-]{0,63})"
#: The file names of a bundle (SPEC §15.2), one pattern per kind of file. Numbers are
#: decimal without leading zeros, so each file has exactly one name.
NAME_PATTERNS: dict[str, re.Pattern[str]] = {
    "manifest": re.compile(r"manifest\.json"),
    "announce": re.compile(r"announce\.msg"),
    "award": re.compile(rf"award-{_NUM}\.msg"),
    "result": re.compile(rf"round-{_POS}/result-{_NUM}-{_PEER}\.msg"),
    "vote": re.compile(rf"round-{_POS}/vote-{_PEER}\.msg"),
    "input": re.compile(rf"round-{_POS}/input-{_PEER}-{_NUM}\.bin"),
    "output": re.compile(rf"round-{_POS}/output\.bin"),
    "shard_output": re.compile(rf"outputs/shard-{_NUM}/{_NAME}"),
}
#: The directories a bundle may have (SPEC §15.2); nothing else is descended into.
DIR_PATTERN = re.compile(rf"round-{_POS}|outputs|outputs/shard-{_NUM}")


@dataclass(frozen=True)
class BundleName:
    """A parsed bundle file name: its kind, and the round, shard, peer or output name in it."""

    kind: str
    round: int | None = None
    shard: int | None = None
    epoch: int | None = None
    peer: str | None = None
    output: str | None = None


def parse_name(name: str) -> BundleName | None:
    """``name`` (a relative POSIX path) as a bundle file, or None when it is no bundle file."""
    for kind, pat in NAME_PATTERNS.items():
        m = pat.fullmatch(name)
        if m is None:
            continue
        g = m.groups()
        if kind == "award":
            return BundleName(kind, epoch=int(g[0]))
        if kind == "result":
            return BundleName(kind, round=int(g[0]), shard=int(g[1]), peer=g[2])
        if kind == "vote":
            return BundleName(kind, round=int(g[0]), peer=g[1])
        if kind == "input":
            return BundleName(kind, round=int(g[0]), peer=g[1], shard=int(g[2]))
        if kind == "output":
            return BundleName(kind, round=int(g[0]))
        if kind == "shard_output":
            return BundleName(kind, shard=int(g[0]), output=g[1])
        return BundleName(kind)
    return None


def bundle_files(node: Node, task_id: str) -> list[dict[str, Any]]:
    row = node.store.task(task_id)
    assert row is not None
    files: dict[str, str] = {}

    def add(name: str, data: bytes) -> None:
        files[name] = node.blobs.put_bytes(data)

    def add_blob(name: str, digest: str) -> None:
        if node.blobs.has(digest):
            files[name] = digest

    assert row.announce is not None  # a submitter's row: its own signed announce
    add("announce.msg", row.announce)
    announce = open_envelope(row.announce, kinds=frozenset({"announce"})).message
    assert isinstance(announce, TaskAnnounce)
    for aw in node.store.awards(task_id):
        add(f"award-{aw.epoch}.msg", aw.raw)
    for r in node.store.results(task_id):
        # A holder's commit for a round the task does not have places nowhere (SPEC §15.4):
        # a verifier rejects it, so it is left out.
        if 1 <= r.round <= announce.rounds:
            add(f"round-{r.round}/result-{r.shard}-{r.peer_id}.msg", r.raw)
    rounds = 0
    for info in node.store.rounds(task_id):
        rnd = info["round"]
        cert = node.store.certificate(task_id, rnd)
        if cert is None:
            continue
        rounds = max(rounds, rnd)
        for raw in cert.votes:
            signed = open_envelope(raw, kinds=frozenset({"vote"}))
            add(f"round-{rnd}/vote-{signed.signer}.msg", raw)
            vote = signed.message
            assert isinstance(vote, Vote)
            for i in vote.inputs:
                add_blob(f"round-{rnd}/input-{i['peer_id']}-{i['shard']}.bin", i["sha256"])
        add_blob(f"round-{rnd}/output.bin", cert.output["sha256"])
    result = row.result or {}
    if row.kind != "keras-train":
        for out in result.get("outputs", []):
            add_blob(f"outputs/{out['name']}", out["sha256"])
    manifest = {
        "task_id": task_id,
        "kind": row.kind,
        "state": row.state,
        "rounds": rounds,
        "result": result,
        "files": {name: files[name] for name in sorted(files)},
    }
    add("manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    return [{"name": n, "sha256": d, "size": node.blobs.size(d)} for n, d in sorted(files.items())]
