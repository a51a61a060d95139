"""Length-prefixed frames (protocol/framing.py; SPEC.md "Stream framing")."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.errors import LocalProtocolError, RemoteProtocolError
from protocol.framing import MAX_FRAME, FrameDecoder, encode_frame


def test_max_frame_is_one_mebibyte() -> None:
    assert MAX_FRAME == 1_048_576


def test_encoding() -> None:
    assert encode_frame(b"") == b"\x00\x00\x00\x00"
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"x" * 256)[:4] == b"\x00\x00\x01\x00"  # big-endian


def test_encode_cap() -> None:
    assert len(encode_frame(b"\x00" * MAX_FRAME)) == MAX_FRAME + 4
    with pytest.raises(LocalProtocolError) as ei:
        encode_frame(b"\x00" * (MAX_FRAME + 1))
    assert ei.value.reason == "oversized"
    with pytest.raises(LocalProtocolError):
        encode_frame(b"abcd", max_frame=3)


def test_decoder_fed_byte_by_byte() -> None:
    payloads = [b"", b"a", b"hello world", bytes(range(256)) * 3, b""]
    stream = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        dec.feed(stream[i : i + 1])
        while (frame := dec.next_frame()) is not None:
            got.append(frame)
    assert got == payloads
    assert dec.buffered == 0
    assert dec.next_frame() is None


def test_incomplete_input_yields_none() -> None:
    dec = FrameDecoder()
    assert dec.next_frame() is None
    dec.feed(b"\x00\x00\x00")
    assert dec.next_frame() is None
    dec.feed(b"\x05abcd")
    assert dec.next_frame() is None
    assert dec.buffered == 8
    dec.feed(b"e")
    assert dec.next_frame() == b"abcde"


def test_oversized_header_is_rejected_before_its_payload() -> None:
    dec = FrameDecoder()
    dec.feed((MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(RemoteProtocolError) as ei:
        dec.next_frame()
    assert ei.value.reason == "oversized"
    assert dec.buffered == 4  # nothing of the payload was needed to judge it
    # The decoder stays failed: the stream cannot be resynchronised.
    dec.feed(b"x" * 10)
    with pytest.raises(RemoteProtocolError):
        dec.next_frame()


def test_exactly_max_frame_is_accepted() -> None:
    dec = FrameDecoder(max_frame=10)
    dec.feed(encode_frame(b"0123456789"))
    assert dec.next_frame() == b"0123456789"
    dec.feed(b"\x00\x00\x00\x0b")
    with pytest.raises(RemoteProtocolError):
        dec.next_frame()


@given(
    st.lists(st.binary(max_size=300), max_size=8),
    st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=20),
)
def test_any_chunking_gives_the_same_frames(payloads: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(p) for p in payloads)
    dec = FrameDecoder(max_frame=300)
    got: list[bytes] = []
    pos, i = 0, 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        dec.feed(stream[pos : pos + n])
        pos += n
        i += 1
        while (frame := dec.next_frame()) is not None:
            got.append(frame)
    assert got == payloads
    assert dec.buffered == 0
