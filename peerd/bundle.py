"""The result bundle: everything someone outside the network needs to check a result.

``peerctl result TASK -o DIR`` writes it; ``peerctl verify DIR`` checks it with
:mod:`peerd.verify`. Signed messages are stored as their exact envelope bytes.

Layout::

    manifest.json                        task id, kind, rule, rounds, file list with sha256
    announce.msg                         the submitter's signed announce
    award-<epoch>.msg                    every signed award (each lists the signed bids it used)
    round-<r>/result-<shard>-<peer>.msg  every signed result (commit) of round r; a shard
                                         re-awarded mid-round has one per holder
    round-<r>/vote-<peer>.msg            the votes forming round r's certificate
    round-<r>/input-<peer>-<shard>.bin   each committed output O_i (for recomputation); a
                                         peer holding two shards has two
    round-<r>/output.bin                 the certified aggregate O
    outputs/<name>                       plain tasks: each shard's outputs
"""

from __future__ import annotations

import json
from typing import Any

from peerd.node import Node
from protocol.envelope import open_envelope
from protocol.messages import Vote


def bundle_files(node: Node, task_id: str) -> list[dict[str, Any]]:
    row = node.store.task(task_id)
    assert row is not None
    files: dict[str, str] = {}

    def add(name: str, data: bytes) -> None:
        files[name] = node.blobs.put_bytes(data)

    def add_blob(name: str, digest: str) -> None:
        if node.blobs.has(digest):
            files[name] = digest

    add("announce.msg", bytes(row["announce"]))
    for aw in node.store.awards(task_id):
        add(f"award-{aw['epoch']}.msg", bytes(aw["raw"]))
    results = node.store.results(task_id)
    for r in results:
        add(f"round-{r['round']}/result-{r['shard']}-{r['peer_id']}.msg", bytes(r["raw"]))
    rounds = 0
    for info in node.store.rounds(task_id):
        rnd = info["round"]
        cert = node.store.certificate(task_id, rnd)
        if cert is None:
            continue
        rounds = max(rounds, rnd)
        output, votes = cert
        for raw in votes:
            signed = open_envelope(raw, kinds=frozenset({"vote"}))
            add(f"round-{rnd}/vote-{signed.signer}.msg", raw)
            vote = signed.message
            assert isinstance(vote, Vote)
            for i in vote.inputs:
                add_blob(f"round-{rnd}/input-{i['peer_id']}-{i['shard']}.bin", i["sha256"])
        add_blob(f"round-{rnd}/output.bin", output["sha256"])
    result = json.loads(row["result"]) if row["result"] else {}
    if row["kind"] != "keras-train":
        for out in result.get("outputs", []):
            add_blob(f"outputs/{out['name']}", out["sha256"])
    manifest = {
        "task_id": task_id,
        "kind": row["kind"],
        "state": row["state"],
        "rounds": rounds,
        "result": result,
        "files": {name: files[name] for name in sorted(files)},
    }
    add("manifest.json", json.dumps(manifest, indent=2, sort_keys=True).encode())
    return [{"name": n, "sha256": d, "size": node.blobs.size(d)} for n, d in sorted(files.items())]
