"""Data once (issue 9 item 4): a peer that already holds a shard's bytes fetches nothing, and the
same data split the same way gives the same bytes — so the same digest — in every task.

Guards what peerd already does (peerd/node.py fetch_blob and fetch_from_any return the local
copy; blobs are content-addressed, peerd/blobs.py), and which the worker's resident cache
relies on: its data key is the blob's digest (peerd/executor/kinds/_resident.py).
"""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import trio

from peerd.blobs import BlobStore
from peerd.executor.pool import content_id
from peerd.node import Node
from peerd.submitter import NEAR_RTT_S, _split_npz, split_compressed
from protocol.errors import TransportError


class _NoNetwork:
    async def open_stream(self, *args: Any) -> Any:
        raise AssertionError("a held blob must not be fetched")


def test_a_held_blob_is_never_fetched_again(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs", max_blob_bytes=1 << 20)
    digest = store.put_bytes(b"a shard's bytes")
    node = SimpleNamespace(blobs=store, p2p=_NoNetwork(), peer_id="me", config=None)
    path = trio.run(lambda: Node.fetch_blob(node, "some-peer", digest))  # type: ignore[arg-type]
    assert path == store.path(digest)
    path = trio.run(lambda: Node.fetch_from_any(node, digest, ["p1", "p2"]))  # type: ignore[arg-type]
    assert path == store.path(digest)
    # The worker's resident cache keys the decoded shard by that same digest.
    assert content_id(path) == f"sha256:{digest}"


def test_the_same_split_gives_the_same_shard_bytes(tmp_path: Path) -> None:
    data = tmp_path / "train.npz"
    rng = np.random.default_rng(5)
    np.savez(data, x=rng.random((90, 3), dtype=np.float32), y=rng.integers(0, 4, 90))
    first = _split_npz(data, [1.0, 2.0, 1.0], seed=7)
    again = _split_npz(data, [1.0, 2.0, 1.0], seed=7)  # another task, later: same data, seed, shares
    digests = [hashlib.sha256(b).hexdigest() for b in first]
    assert digests == [hashlib.sha256(b).hexdigest() for b in again]
    assert len(set(digests)) == 3
    other_seed = _split_npz(data, [1.0, 2.0, 1.0], seed=8)
    assert [hashlib.sha256(b).hexdigest() for b in other_seed] != digests


def test_split_parts_are_compressed_npz_that_hold_exactly_their_rows(tmp_path: Path) -> None:
    # Pixels on a 1/255 grid, half of them zero, as in the seed's data: they deflate.
    rng = np.random.default_rng(11)
    x = (rng.integers(0, 256, (600, 64)) * (rng.random((600, 64)) < 0.5) / 255).astype(np.float32)
    y = rng.integers(0, 10, 600)
    data = tmp_path / "train.npz"
    np.savez(data, x=x, y=y)
    parts = _split_npz(data, [1.0, 1.0, 2.0], seed=3)
    rows = []
    for raw in parts:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            assert sorted(z.files) == ["x", "y"]
            assert z["x"].dtype == np.float32 and z["y"].dtype == y.dtype
            rows += [(xi.tobytes(), int(yi)) for xi, yi in zip(z["x"], z["y"], strict=True)]
    # Every row exactly once, each with its own label.
    assert sorted(rows) == sorted((xi.tobytes(), int(yi)) for xi, yi in zip(x, y, strict=True))
    assert sum(len(p) for p in parts) < x.nbytes / 2  # shipped deflated, not as raw float32


def test_parts_for_near_peers_are_stored_and_hold_the_same_rows(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    data = tmp_path / "train.npz"
    np.savez(data, x=rng.integers(0, 256, (300, 16), dtype=np.uint8), y=rng.integers(0, 10, 300))
    deflated = _split_npz(data, [1.0, 2.0], seed=4)
    stored = _split_npz(data, [1.0, 2.0], seed=4, compress=False)
    for a, b in zip(deflated, stored, strict=True):
        methods = {i.compress_type for i in zipfile.ZipFile(io.BytesIO(b)).infolist()}
        assert methods == {zipfile.ZIP_STORED}
        assert {i.compress_type for i in zipfile.ZipFile(io.BytesIO(a)).infolist()} == {zipfile.ZIP_DEFLATED}
        with np.load(io.BytesIO(a)) as za, np.load(io.BytesIO(b)) as zb:
            assert all(np.array_equal(za[k], zb[k]) for k in ("x", "y"))  # the same rows, in order
    # Stored parts are deterministic too (data once): a repeated split is the same blob.
    assert stored == _split_npz(data, [1.0, 2.0], seed=4, compress=False)


def test_parts_are_deflated_unless_every_peer_that_may_fetch_one_is_measured_and_near() -> None:
    near, far = NEAR_RTT_S / 4, NEAR_RTT_S * 40
    assert not split_compressed([near, near])  # same host or LAN: deflating costs more than it saves
    assert split_compressed([near, far])  # one far peer: its part is worth deflating
    assert split_compressed([near, None])  # not measured yet: as before, deflate
    assert split_compressed([])  # nobody known besides us: as before


class _Relays:
    """A p2p layer where some peers are reachable only through a relay; fetches are recorded."""

    def __init__(self, relayed: set[str]) -> None:
        self._relayed = relayed
        self.tried: list[str] = []

    def relayed(self, peer_id: str) -> bool:
        return peer_id in self._relayed


def test_holders_reached_only_through_a_relay_are_tried_last(tmp_path: Path) -> None:
    # design.md §10.7: a blob from a direct holder spares the relay. Otherwise the caller's
    # order stands (committee members first, etc.).
    store = BlobStore(tmp_path / "blobs", max_blob_bytes=1 << 20)
    net = _Relays({"r1", "r2"})

    async def fetch_blob(peer: str, digest: str, *, max_bytes: int | None = None) -> Path:
        net.tried.append(peer)
        raise TransportError("not here", reason="not_found")

    node = SimpleNamespace(blobs=store, p2p=net, peer_id="me", config=None, fetch_blob=fetch_blob)
    with pytest.raises(TransportError):
        trio.run(lambda: Node.fetch_from_any(node, "ab" * 32, ["r1", "d1", "me", "r2", "d2", "d1"]))  # type: ignore[arg-type]
    assert net.tried == ["d1", "d2", "r1", "r2"]
