"""Hostile peers against real daemons (issue 2, "Bad input").

A :class:`~tests.integration.hostile.HostilePeer` joins a 3-daemon devnet over libp2p and
sends forged, replayed, expired, non-canonical, oversized, truncated, unknown-version and
absurd adverts. Each must be dropped, counted in ``node.info`` as ``dropped.<reason>``,
never crash anything and never reach a peer table; afterwards the victim still answers RPC,
still lists the honest peers and still accepts their new adverts.

One devnet serves the whole module (starting daemons is the slow part); every test uses a
fresh hostile key and compares counters before and after, so the tests stay independent.
"""

from __future__ import annotations

import math
import os
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import trio
from conftest import TestNet
from hostile import (
    ADVERTS,
    TASKS,
    HostilePeer,
    advert,
    bid,
    flip_signature_bit,
    next_seq,
    now_ms,
    pack_payload,
    seal,
    sign_envelope,
    wire,
)

from protocol.codec import pack
from protocol.envelope import Signer
from protocol.errors import LocalProtocolError, TransportError
from protocol.framing import MAX_FRAME
from protocol.messages import Cancel
from protocol.peerid import public_key_from_peer_id

pytestmark = pytest.mark.slow

VICTIM = 2  # node 0 is the bootstrap peer; the victim is an ordinary member


@pytest.fixture(scope="module")
def net(devnet_module: Any) -> Iterator[TestNet]:
    network: TestNet = devnet_module(3)
    assert network.wait_peers(3, timeout=30), "the devnet never converged"
    yield network


def honest_ids(net: TestNet) -> set[str]:
    return set(net.ids().values())


async def assert_victim_healthy(net: TestNet, evil_ids: set[str]) -> None:
    """The victim answers RPC, lists every honest peer, none of ``evil_ids``, and nothing crashed."""
    info = await trio.to_thread.run_sync(net.info, VICTIM)
    assert info["peer_id"] == net.peer_id(VICTIM)
    table = await HostilePeer.peers(net, VICTIM)
    assert honest_ids(net) <= set(table), "an honest peer fell out of the victim's table"
    assert not evil_ids & set(table), "a hostile message reached the peer table"
    for i in net.nodes():
        assert net.pid(i) is not None, f"node {i} died"
        assert not evil_ids & set(await HostilePeer.peers(net, i)), f"node {i} lists a hostile peer"
        assert "Traceback" not in net.log(i), f"node {i} logged a traceback"
    # Every bad message was judged by peerd's checks; none made a validator raise.
    assert info["counters"].get("p2p.validator_errors", 0) == 0


# --- the bad adverts --------------------------------------------------------------------------
#
# Each builder gets the hostile peer and the net and returns the bytes to publish; all of them
# are signed with the right domain-separated signing bytes unless breaking that is the point.

Builder = Callable[[HostilePeer, TestNet], bytes]


def _payload(**raw: Any) -> bytes:
    return pack_payload(wire(advert(), **raw))


def _signed_payload(evil: HostilePeer, payload: bytes) -> bytes:
    return sign_envelope(evil.seed, payload)


def _claims_to_be_node_0(evil: HostilePeer, net: TestNet) -> bytes:
    # The envelope names node 0's public key, but only the hostile key signed it.
    key = public_key_from_peer_id(net.peer_id(0))
    return sign_envelope(evil.seed, _payload(), key=key)


def _float32_payload(evil: HostilePeer, net: TestNet) -> bytes:
    # Same map, same key order, but every float packed as float32: valid msgpack, not ours.
    obj = wire(advert())
    payload = msgpack.packb({k: obj[k] for k in sorted(obj)}, use_bin_type=True, use_single_float=True)
    return _signed_payload(evil, payload)


def _unsorted_payload(evil: HostilePeer, net: TestNet) -> bytes:
    obj = wire(advert())
    payload = msgpack.packb({k: obj[k] for k in sorted(obj, reverse=True)}, use_bin_type=True)
    return _signed_payload(evil, payload)


def _oversized(evil: HostilePeer) -> bytes:
    # Just above the 64 KiB envelope cap, which is checked before anything is decoded.
    return sign_envelope(evil.seed, os.urandom(64 * 1024 + 100))


BAD_ADVERTS: list[tuple[str, Builder, str]] = [
    ("forged-signature", lambda e, n: flip_signature_bit(seal(e.seed, advert())), "bad_signature"),
    ("claims-another-peers-key", _claims_to_be_node_0, "bad_signature"),
    ("signed-by-another-key", lambda e, n: seal(os.urandom(32), advert()), "signer_mismatch"),
    (
        "expired",  # an advert that was valid once, replayed long after its expiry (+ the 30 s skew)
        lambda e, n: seal(e.seed, advert(issued_at=now_ms() - 200_000, ttl_ms=100_000)),
        "expired",
    ),
    ("from-the-future", lambda e, n: seal(e.seed, advert(issued_at=now_ms() + 300_000)), "from_future"),
    ("lifetime-above-max-ttl", lambda e, n: seal(e.seed, advert(ttl_ms=3_600_000)), "absurd"),
    (
        "non-canonical-envelope",
        lambda e, n: sign_envelope(e.seed, _payload(), canonical=False),
        "non_canonical",
    ),
    ("non-canonical-payload-key-order", _unsorted_payload, "non_canonical"),
    ("non-canonical-payload-float32", _float32_payload, "non_canonical"),
    # Canonical msgpack, but an integer where the spec says float64: one message, one encoding.
    ("integer-in-a-float-field", lambda e, n: _signed_payload(e, _payload(c0=42)), "non_canonical"),
    ("truncated-half", lambda e, n: seal(e.seed, advert())[:100], "malformed"),
    ("truncated-last-byte", lambda e, n: seal(e.seed, advert())[:-1], "malformed"),
    ("not-msgpack", lambda e, n: b"\xc1" + os.urandom(64), "malformed"),
    ("unknown-version-3", lambda e, n: sign_envelope(e.seed, _payload(), version=3), "unsupported_version"),
    ("old-version-1", lambda e, n: sign_envelope(e.seed, _payload(), version=1), "unsupported_version"),
    ("unknown-version-0", lambda e, n: sign_envelope(e.seed, _payload(), version=0), "unsupported_version"),
    ("unknown-field", lambda e, n: _signed_payload(e, _payload(evil=True)), "malformed"),
    (
        "missing-field",
        lambda e, n: _signed_payload(e, pack_payload({k: v for k, v in wire(advert()).items() if k != "c0"})),
        "malformed",
    ),
    ("negative-capacity", lambda e, n: _signed_payload(e, _payload(c0=-1.0)), "absurd"),
    ("capacity-1e300", lambda e, n: _signed_payload(e, _payload(c0=1e300)), "absurd"),
    ("infinite-load", lambda e, n: _signed_payload(e, _payload(load=math.inf)), "absurd"),
    ("nan-capacity", lambda e, n: _signed_payload(e, _payload(c0=math.nan)), "absurd"),
    # Within the wire's 10⁶, but 2 CPU cores and no GPU cannot deliver it (SPEC §7.2).
    ("capacity-beyond-its-hardware", lambda e, n: seal(e.seed, advert(c0=1e5)), "implausible_c0"),
    (
        "gpu-beyond-its-rated-peak",
        lambda e, n: seal(
            e.seed,
            advert(
                gpus=[
                    {
                        "index": 0,
                        "model": "NVIDIA H100 80GB HBM3",
                        "vram_total_mb": 81_559,
                        "vram_free_mb": 81_000,
                        "util_pct": 0.0,
                        "gflops": 500_000.0,
                    }
                ]
            ),
        ),
        "implausible_c0",
    ),
    (
        "negative-cores",
        lambda e, n: _signed_payload(e, _payload(cpu={"cores": -4, "model": "x", "gflops": 1.0})),
        "absurd",
    ),
    (
        "petabytes-of-memory",
        lambda e, n: _signed_payload(e, _payload(memory={"total_mb": 1 << 40, "available_mb": 1 << 40})),
        "absurd",
    ),
]


def test_the_forging_helpers_match_honest_sealing() -> None:
    # The forgeries differ from an honest peer's bytes only where they mean to.
    seed = os.urandom(32)
    message = advert()
    assert sign_envelope(seed, pack(message.to_wire())) == seal(seed, message)
    with pytest.raises(LocalProtocolError):  # the constructor refuses what we forge by hand
        advert(c0=-1.0)


@pytest.mark.parametrize(
    ("builder", "reason"), [(b, r) for _, b, r in BAD_ADVERTS], ids=[c[0] for c in BAD_ADVERTS]
)
async def test_bad_advert_is_dropped_and_counted(net: TestNet, builder: Builder, reason: str) -> None:
    async with HostilePeer.joined(net, VICTIM) as evil:
        await evil.expect_drop(net, VICTIM, reason, builder(evil, net))
        await assert_victim_healthy(net, {evil.peer_id})


async def _wait_fresh_advert(net: TestNet, *, at: int, of: str, since: float, timeout: float = 15.0) -> None:
    """Wait until node ``at`` holds an advert of ``of`` that it received after ``since`` (wall s)."""
    entry: dict[str, Any] | None = None
    with trio.move_on_after(timeout):
        while True:
            entry = (await HostilePeer.peers(net, at)).get(of)
            if entry is not None and entry["received_at"] > since:
                return
            await trio.sleep(0.1)
    raise AssertionError(f"node {at} received no advert of {of} after {since:.3f}; its entry: {entry}")


async def test_signer_mismatch_never_lists_either_key(net: TestNet) -> None:
    # The hostile node publishes an advert sealed by a second key it holds: neither the
    # gossip sender nor the signer may enter a table.
    other = os.urandom(32)
    async with HostilePeer.joined(net, VICTIM) as evil:
        data = seal(other, advert())
        await evil.expect_drop(net, VICTIM, "signer_mismatch", data)
        await assert_victim_healthy(net, {evil.peer_id, Signer(other).peer_id})


async def test_replayed_adverts_are_dropped(net: TestNet) -> None:
    async with HostilePeer.joined(net, VICTIM) as evil:
        # One honest advert first: the hostile peer is a member like any other.
        first = advert(c0=42.0, ttl_ms=30_000)
        first_raw = seal(evil.seed, first)
        await evil.publish(ADVERTS, first_raw)
        with trio.fail_after(10):
            while evil.peer_id not in await HostilePeer.peers(net, VICTIM):
                await trio.sleep(0.05)

        # The same bytes again, in a new gossip message (new libp2p seqno, so libp2p's own
        # seen-cache does not catch it; after 120 s it would not either).
        await evil.expect_drop(net, VICTIM, "duplicate", first_raw)
        # The same sequence number with different content, then a lower one.
        await evil.expect_drop(net, VICTIM, "replayed", seal(evil.seed, advert(seq=first.seq, c0=99.0)))
        await evil.expect_drop(net, VICTIM, "replayed", seal(evil.seed, advert(seq=first.seq - 1, c0=99.0)))

        entry = (await HostilePeer.peers(net, VICTIM))[evil.peer_id]
        assert (entry["seq"], entry["c0"]) == (first.seq, 42.0), "a replay replaced the advert"
        await assert_victim_healthy(net, set())
        # A genuinely newer advert is still accepted: replay protection, not a ban.
        newer = advert(c0=43.0, ttl_ms=5_000)
        await evil.publish(ADVERTS, seal(evil.seed, newer))
        with trio.fail_after(10):
            while (await HostilePeer.peers(net, VICTIM)).get(evil.peer_id, {}).get("seq") != newer.seq:
                await trio.sleep(0.05)


async def test_a_barrage_leaves_the_victim_serving(net: TestNet) -> None:
    """Every bad advert at once, from two hostile peers, plus garbage on the task topic."""
    before = await HostilePeer.counters(net, VICTIM)
    expected: dict[str, int] = {}
    async with HostilePeer.joined(net, VICTIM) as a, HostilePeer.joined(net, VICTIM) as b:
        for evil in (a, b):
            for _, builder, reason in BAD_ADVERTS:
                await evil.publish(ADVERTS, builder(evil, net))
                expected[reason] = expected.get(reason, 0) + 1
            await evil.publish(TASKS, os.urandom(200))
            expected["malformed"] += 1
        missing, now = dict(expected), before
        with trio.move_on_after(20):
            while True:
                now = await HostilePeer.counters(net, VICTIM)
                missing = {
                    r: n
                    for r, n in expected.items()
                    if now.get(f"dropped.{r}", 0) - before.get(f"dropped.{r}", 0) < n
                }
                if not missing:
                    break
                await trio.sleep(0.1)
        assert not missing, f"drops not counted: {missing}"
        await assert_victim_healthy(net, {a.peer_id, b.peer_id})
    # Adverts from every honest peer still arrive (not the accepted.advert counter, which the
    # victim's own refreshes move too).
    after_barrage = time.time()
    for i, peer_id in net.ids().items():
        if i != VICTIM:
            await _wait_fresh_advert(net, at=VICTIM, of=peer_id, since=after_barrage)


# --- the task topic and the bid stream ------------------------------------------------------


async def test_garbage_on_the_task_topic_is_dropped(net: TestNet) -> None:
    async with HostilePeer.joined(net, VICTIM) as evil:
        await evil.expect_drop(net, VICTIM, "malformed", os.urandom(300), topic=TASKS)
        await evil.expect_drop(net, VICTIM, "unexpected_kind", seal(evil.seed, bid()), topic=TASKS)
        cancel = Cancel(
            seq=next_seq(), issued_at=now_ms(), expires_at=now_ms() + 60_000, task_id="cd" * 16, reason="x"
        )
        await evil.expect_drop(net, VICTIM, "signer_mismatch", seal(os.urandom(32), cancel), topic=TASKS)
        await evil.expect_drop(
            net, VICTIM, "bad_signature", flip_signature_bit(seal(evil.seed, cancel)), topic=TASKS
        )
        await assert_victim_healthy(net, {evil.peer_id})


async def _bid_exchange(evil: HostilePeer, peer_id: str, frame: bytes) -> Any:
    stream = await evil.open_bid_stream(peer_id)
    try:
        await stream.send(frame)
        return msgpack.unpackb(await stream.receive(), raw=False)
    finally:
        await stream.aclose()


async def test_bad_bids_on_the_bid_stream(net: TestNet) -> None:
    victim_id = net.peer_id(VICTIM)
    async with HostilePeer.joined(net, VICTIM) as evil:
        before = await evil.counters(net, VICTIM)
        cases = [
            (os.urandom(100), "malformed"),
            (flip_signature_bit(seal(evil.seed, bid())), "bad_signature"),
            (seal(os.urandom(32), bid()), "signer_mismatch"),
            (seal(evil.seed, advert()), "unexpected_kind"),
            (_oversized(evil), "oversized"),
        ]
        for frame, _ in cases:
            reply = await _bid_exchange(evil, victim_id, frame)
            assert reply == {"ok": False, "reason": "invalid bid"}
        after = await evil.counters(net, VICTIM)
        for _, reason in cases:
            name = f"dropped.{reason}"
            assert after.get(name, 0) > before.get(name, 0), name
        # A well-formed bid for a task nobody announced: refused, not crashed.
        reply = await _bid_exchange(evil, victim_id, seal(evil.seed, bid()))
        assert reply == {"ok": False, "reason": "unknown task"}

        # A frame header announcing more than MAX_FRAME: the stream dies, the daemon does not.
        stream = await evil.open_bid_stream(victim_id)
        await stream._stream.write(struct.pack(">I", MAX_FRAME + 1) + b"\0" * 16)  # type: ignore[attr-defined]
        await stream.aclose()
        # Open and walk away without a word.
        stream = await evil.open_bid_stream(victim_id)
        await stream.aclose()
        await assert_victim_healthy(net, {evil.peer_id})


async def test_oversized_advert_is_dropped_and_counted(net: TestNet) -> None:
    # An RPC this size spans two yamux frames, and py-libp2p 0.8.1 lets another write to
    # the same pubsub stream (a heartbeat's control message) slip between them; the victim
    # then sees a corrupt RPC, resets that stream and never sees the advert. That is a
    # transport loss, not what this test is about: a fresh hostile peer tries again.
    # (The deterministic check of the cap is on the bid stream below.)
    for attempt in range(3):
        async with HostilePeer.joined(net, VICTIM) as evil:
            try:
                # The victim's p2p layer refuses gossip above its 60 KiB cap before any
                # decoding or crypto (counted there), so the advert never reaches the inbox.
                before = await evil.counters(net, VICTIM)
                await evil.publish(ADVERTS, _oversized(evil))
                for _ in range(100):
                    after = await evil.counters(net, VICTIM)
                    if after.get("p2p.gossip_oversized", 0) > before.get("p2p.gossip_oversized", 0):
                        break
                    await trio.sleep(0.05)
                else:
                    raise AssertionError("the oversized advert was not counted as p2p.gossip_oversized")
                assert evil.peer_id not in net.peers(VICTIM)
            except AssertionError:
                if attempt == 2:
                    raise
                continue
            await assert_victim_healthy(net, {evil.peer_id})
            return


# --- garbage below peerd's messages ---------------------------------------------------------

#: Every protocol a daemon serves, libp2p's own included. Gossip (meshsub) goes last so a
#: crash there does not hide what the others do.
SERVED_PROTOCOLS = (
    "/ipfs/id/1.0.0",
    "/ipfs/id/push/1.0.0",
    "/ipfs/ping/1.0.0",
    "/ipfs/kad/1.0.0",
    "/peerd/bid/2.0.0",
    "/peerd/result/2.0.0",
    "/peerd/blob/2.0.0",
    "/meshsub/1.1.0",
    "/libp2p/circuit/relay/0.2.0/hop",  # the victim is a relay (network.relay_service)
)
GARBAGE = (
    b"\x05\xff\xff\xff\xff\xff",  # a varint length, then 5 bytes that are no protobuf
    b"\x80" * 10 + b"\x01",  # a varint longer than 64 bits
    b"\xff\xff\xff\x7f" + b"\x00" * 32,  # a length of 256 MiB, then nothing
)


async def test_garbage_on_every_protocol_the_daemon_serves(devnet: Any) -> None:
    # Its own devnet: before the fix a single corrupt pubsub RPC took the whole daemon down.
    small: TestNet = devnet(2, {"network": {"relay_service": True}})
    victim = 1
    assert small.wait_peers(2, timeout=30)
    async with HostilePeer.joined(small, victim) as evil:
        victim_id = small.peer_id(victim)
        for protocol_id in SERVED_PROTOCOLS:
            for junk in (*GARBAGE, os.urandom(300)):
                try:
                    await evil.send_raw(victim_id, protocol_id, junk, linger=0.1)
                except TransportError:
                    pass  # the victim may reset the stream at once; whether it lives is the point
            await trio.sleep(0.5)  # a crash takes a moment to end the process
            if small.pid(victim) is None:
                tail = "\n".join(small.log(victim).splitlines()[-25:])
                pytest.fail(f"garbage on {protocol_id} killed the daemon:\n{tail}")
        # Raw TCP junk at the listener, before any Noise handshake.
        port = int(small.info(victim)["listen_addrs"][0].split("/tcp/")[1].split("/")[0])
        for junk in (b"\x13/multistream/1.0.0\n" + os.urandom(200), os.urandom(3000), b""):
            with trio.socket.socket() as sock, trio.fail_after(10):
                await sock.connect(("127.0.0.1", port))
                await sock.send(junk)
                await trio.sleep(0.1)
        info = await trio.to_thread.run_sync(small.info, victim)
        assert info["peer_id"] == victim_id
        assert "Traceback" not in small.log(victim)
        # Gossip still flows both ways with the honest peer: each side receives an advert the
        # other issued after the garbage (a refresh comes every third of the devnet's 10 s
        # lifetime). Not the victim's accepted.advert counter: a daemon admits its own adverts
        # too, so that counter moves on the victim's own refresh even when nothing arrives
        # from node 0 (a CI run on 2026-12-04 passed that wait and then missed node 0).
        after_garbage = time.time()
        honest = 1 - victim
        await _wait_fresh_advert(small, at=victim, of=small.peer_id(honest), since=after_garbage)
        await _wait_fresh_advert(small, at=honest, of=victim_id, since=after_garbage)
