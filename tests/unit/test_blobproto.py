"""protocol/blobproto.py: canonical codec, strict decoding, and the flow-control rule."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import blobproto
from protocol.blobproto import (
    ACK_EVERY,
    CHUNK,
    MAX_INT,
    WINDOW,
    Ack,
    Chunk,
    End,
    GetHeader,
    GetRequest,
    ReceiveWindow,
    SendWindow,
)
from protocol.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

D = hashlib.sha256(b"x").hexdigest()

SAMPLES = [
    GetRequest(D, 0),
    GetRequest(D, MAX_INT),
    GetHeader("ok", 12345),
    GetHeader("not_found", 0),
    GetHeader("too_large", 2**40),
    GetHeader("busy", 0),
    Chunk(b"\x00"),
    Chunk(b"y" * CHUNK),
    Ack(0),
    Ack(2**33),
    End(D),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: blobproto.Message) -> None:
    data = blobproto.encode(msg)
    assert blobproto.decode(data) == msg
    assert blobproto.encode(blobproto.decode(data)) == data


def test_golden_encoding() -> None:
    # Keys sorted, shortest ints, "type" tag: pinned so another implementation can check itself.
    assert blobproto.encode(Ack(5)) == bytes.fromhex("82a8726563656976656405a474797065a361636b")
    assert blobproto.encode(GetRequest(D, 1)) == msgpack.packb(
        {"offset": 1, "sha256": D, "type": "get"}, use_bin_type=True
    )
    assert blobproto.encode(Chunk(b"ab")) == bytes.fromhex("82a464617461c4026162a474797065a56368756e6b")


def test_largest_message_fits_a_frame() -> None:
    from protocol.framing import MAX_FRAME

    assert len(blobproto.encode(Chunk(b"z" * CHUNK))) <= MAX_FRAME
    assert CHUNK <= WINDOW - ACK_EVERY  # the no-deadlock condition of the spec


@pytest.mark.parametrize(
    "build",
    [
        lambda: GetRequest("A" * 64, 0),  # upper case hex
        lambda: GetRequest("../" + "a" * 61, 0),
        lambda: GetRequest(D, -1),
        lambda: GetRequest(D, True),
        lambda: GetRequest(D, MAX_INT + 1),
        lambda: GetHeader("maybe", 0),  # type: ignore[arg-type]
        lambda: Chunk(b""),
        lambda: Chunk(b"x" * (CHUNK + 1)),
        lambda: Chunk(bytearray(b"x")),  # type: ignore[arg-type]
        lambda: Ack(-5),
        lambda: End(D[:-1]),
    ],
)
def test_constructors_reject_invalid_fields(build: object) -> None:
    with pytest.raises(LocalProtocolError):
        build()  # type: ignore[operator]


def test_encode_rejects_foreign_objects() -> None:
    with pytest.raises(LocalProtocolError):
        blobproto.encode({"type": "ack", "received": 1})  # type: ignore[arg-type]


def _packed(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "malformed"),
        (b"\xc1", "malformed"),  # never-used msgpack byte
        (_packed([1, 2]), "malformed"),
        (_packed({"type": "ack", "received": 1}), "non_canonical"),  # keys out of order
        (_packed({"received": 1, "type": "nack"}), "unknown_type"),
        (_packed({"received": 1}), "unknown_type"),
        (_packed({"received": 1, "type": "ack", "zz": 0}), "bad_field"),  # unknown key
        (_packed({"type": "end"}), "bad_field"),  # missing key
        (_packed({"received": "1", "type": "ack"}), "bad_field"),
        (_packed({"received": True, "type": "ack"}), "bad_field"),
        (_packed({"received": 1.0, "type": "ack"}), "bad_field"),
        (_packed({"received": -1, "type": "ack"}), "bad_field"),
        (_packed({"data": "text", "type": "chunk"}), "bad_field"),  # str where bin is required
        (_packed({"data": b"", "type": "chunk"}), "bad_chunk"),
        (_packed({"sha256": D.upper(), "type": "end"}), "bad_digest"),
        (_packed({"size": 0, "status": "meh", "type": "header"}), "bad_field"),
        (_packed({"received": 1, "type": "ack"}) + b"\x00", "malformed"),  # trailing bytes
        (b"\x82\xa8received\xcd\x00\x05\xa4type\xa3ack", "non_canonical"),  # 5 as uint16
        (b"\x83\xa8received\x01\xa8received\x02\xa4type\xa3ack", "non_canonical"),  # duplicate key
        (b"\x82\xa4data\xc6\x00\x04\x00\x01\x00\x00\xa4type\xa5chunk", "malformed"),  # bin > CHUNK
        (b"\x00" * (CHUNK + 100), "oversized"),
    ],
)
def test_decode_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        blobproto.decode(data)
    assert info.value.reason == reason


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(RemoteProtocolError):
        blobproto.decode("text")  # type: ignore[arg-type]


@settings(max_examples=2000)
@given(st.binary(max_size=300))
def test_fuzz_only_protocol_errors_escape(data: bytes) -> None:
    try:
        msg = blobproto.decode(data)
    except ProtocolError:
        return
    assert blobproto.encode(msg) == data  # whatever decodes is canonical


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=70)
    | st.binary(max_size=70)
    | st.sampled_from(["get", "header", "chunk", "ack", "end", D, "ok", "busy"])
)
_values = (
    _scalars | st.lists(_scalars, max_size=2) | st.dictionaries(st.text(max_size=4), _scalars, max_size=2)
)


@settings(max_examples=2000)
@given(
    st.dictionaries(
        st.sampled_from(["type", "sha256", "offset", "status", "size", "data", "received", "x"]),
        _values,
        max_size=4,
    )
)
def test_fuzz_structured_maps(obj: dict[str, object]) -> None:
    # Near-valid maps reach the field checks that random bytes rarely get to.
    data = msgpack.packb(obj, use_bin_type=True)
    try:
        msg = blobproto.decode(data)
    except ProtocolError:
        return
    assert blobproto.encode(msg) == data


# -- flow control -------------------------------------------------------------------------------


def test_send_window_rules() -> None:
    w = SendWindow(offset=100, size=100 + 3 * WINDOW)
    while w.can_send(CHUNK):
        w.on_sent(CHUNK)
    assert w.sent - w.acked == WINDOW
    with pytest.raises(LocalProtocolError):
        w.on_sent(1)
    w.on_ack(Ack(100 + CHUNK))
    assert w.can_send(CHUNK)
    with pytest.raises(RemoteProtocolError):
        w.on_ack(Ack(100))  # decreasing
    with pytest.raises(RemoteProtocolError):
        w.on_ack(Ack(w.sent + 1))  # acks bytes never sent
    assert not w.complete


def test_receive_window_acks_and_cuts_off_liars() -> None:
    r = ReceiveWindow(offset=10, size=10 + ACK_EVERY + 5)
    acks = [r.on_chunk(Chunk(b"x" * CHUNK)) for _ in range(ACK_EVERY // CHUNK)]
    assert acks[:-1] == [None] * (len(acks) - 1)
    assert acks[-1] == Ack(10 + ACK_EVERY)
    with pytest.raises(RemoteProtocolError) as info:
        r.on_chunk(Chunk(b"x" * 6))
    assert info.value.reason == "too_large"
    with pytest.raises(RemoteProtocolError) as info:
        r.on_end(End(D), D)
    assert info.value.reason == "short"
    r.on_chunk(Chunk(b"x" * 5))
    with pytest.raises(RemoteProtocolError) as info:
        r.on_end(End(hashlib.sha256(b"other").hexdigest()), D)
    assert info.value.reason == "hash_mismatch"
    assert r.on_end(End(D), D) == Ack(10 + ACK_EVERY + 5)


@settings(max_examples=300, deadline=None)
@given(
    offset=st.integers(0, 3 * CHUNK),
    length=st.integers(0, 4 * WINDOW),
    sizes=st.lists(st.integers(CHUNK // 64, CHUNK), min_size=1, max_size=20),
)
def test_window_never_deadlocks(offset: int, length: int, sizes: list[int]) -> None:
    """Model both sides step by step: any chunk sizes ≤ CHUNK always reach the end."""
    size = offset + length
    s, r = SendWindow(offset, size), ReceiveWindow(offset, size)
    chunks: dict[int, Chunk] = {}  # one object per size: the model needs lengths, not data
    in_flight: list[Chunk] = []
    acks: list[Ack] = []
    i = 0
    for _ in range(4 * (length // min(sizes) + 2)):  # bounded; every step moves something
        if s.sent == size and not in_flight and not acks:
            break
        n = min(sizes[i % len(sizes)], size - s.sent)
        if n and s.can_send(n):
            s.on_sent(n)
            in_flight.append(chunks.setdefault(n, Chunk(bytes(n))))
            i += 1
        elif in_flight:
            ack = r.on_chunk(in_flight.pop(0))
            if ack is not None:
                acks.append(ack)
        elif acks:
            s.on_ack(acks.pop(0))
        else:
            pytest.fail(f"deadlock: sent={s.sent} acked={s.acked} received={r.received}")
        assert s.sent - s.acked <= WINDOW
    assert r.received == size
    s.on_ack(r.on_end(End(D), D))
    assert s.complete


# --- the chunk fast path accepts exactly what the general decoder accepts as a chunk ----------


def _general(data: bytes) -> blobproto.Message | str:
    try:
        return blobproto._decode_any(data)
    except RemoteProtocolError as exc:
        return exc.reason


@pytest.mark.parametrize("n", [1, 2, 255, 256, 65535, 65536, blobproto.CHUNK])
def test_canonical_chunks_take_the_fast_path(n: int) -> None:
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    wire = blobproto.encode(Chunk(data))
    assert blobproto._canonical_chunk(wire) == Chunk(data) == _general(wire)


@pytest.mark.parametrize(
    "wire",
    [
        # bin16 and bin32 headers for lengths that fit a shorter one: valid msgpack, not canonical
        b"\x82\xa4data\xc5\x00\x03abc\xa4type\xa5chunk",
        b"\x82\xa4data\xc6\x00\x00\x00\x03abc\xa4type\xa5chunk",
        b"\x82\xa4data\xc4\x00\xa4type\xa5chunk",  # empty chunk
        b"\x82\xa4data\xc4\x04abc\xa4type\xa5chunk",  # length past the tail
        b"\x82\xa4data\xc4\x02abc\xa4type\xa5chunk",  # length short of it
        b"\x82\xa4data\xa3abc\xa4type\xa5chunk",  # str, not bin
        b"\x82\xa4type\xa5chunk\xa4data\xc4\x03abc",  # keys out of order
    ],
)
def test_near_chunks_are_left_to_the_general_decoder(wire: bytes) -> None:
    assert blobproto._canonical_chunk(wire) is None
    assert not isinstance(_general(wire), Chunk)
    with pytest.raises(RemoteProtocolError):
        blobproto.decode(wire)


@settings(max_examples=300, deadline=None)
@given(
    payload=st.binary(min_size=0, max_size=300),
    cut=st.integers(0, 20),
    flip=st.integers(0, 400),
    mutate=st.booleans(),
)
def test_fast_path_never_disagrees_with_the_general_decoder(
    payload: bytes, cut: int, flip: int, mutate: bool
) -> None:
    # Start from a real chunk encoding (or its head with junk after it), damage it a little,
    # and check: whenever the fast path answers, the general decoder gives the same chunk.
    base = blobproto.encode(Chunk(payload)) if payload else b"\x82\xa4data\xc4"
    wire = bytearray(base[: len(base) - cut] if cut < len(base) else base)
    if mutate and wire:
        wire[flip % len(wire)] ^= 0x01
    data = bytes(wire)
    fast = blobproto._canonical_chunk(data)
    if fast is not None:
        assert _general(data) == fast
    elif isinstance(_general(data), Chunk):
        raise AssertionError(f"the general decoder took a chunk the fast path refused: {data!r}")
