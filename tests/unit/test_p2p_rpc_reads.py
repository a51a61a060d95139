"""Pubsub's RPC reader (peerd/p2p.py, trap 28): one buffered read per RPC instead of one per
length byte, with libp2p's errors, on a stand-in stream that hands out given chunks.

Invariant (fuzzed): however the bytes are split into reads, the reader returns exactly the
RPCs that were written, in order, and raises only libp2p's ParseError, MessageTooLarge or
IncompleteReadError.
"""

from __future__ import annotations

import itertools

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from libp2p.exceptions import ParseError
from libp2p.io.exceptions import IncompleteReadError, MessageTooLarge
from libp2p.pubsub import pubsub as pubsub_module
from libp2p.utils.varint import encode_uvarint

from peerd import p2p


class _Stream:
    """Returns at most the next chunk per read (less if asked for less), then b"" (EOF)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = [c for c in chunks if c]
        self.reads = 0

    async def read(self, n: int) -> bytes:
        self.reads += 1
        if not self.chunks:
            return b""
        head = self.chunks[0]
        self.chunks[0] = head[n:]
        if not self.chunks[0]:
            self.chunks.pop(0)
        return head[:n]


def _reader() -> object:
    p2p._install_buffered_rpc_reads()
    return pubsub_module.read_varint_prefixed_bytes_limited


def _framed(*rpcs: bytes) -> bytes:
    return b"".join(encode_uvarint(len(r)) + r for r in rpcs)


def _read_all(stream: _Stream, count: int, limit: int = 1 << 20) -> list[bytes]:
    read = _reader()

    async def main() -> list[bytes]:
        return [await read(stream, limit) for _ in range(count)]  # type: ignore[operator]

    return trio.run(main)


def test_rpcs_that_arrive_together_take_one_read() -> None:
    rpcs = [b"a" * 5, b"b" * 300, b"", b"c" * 70]
    stream = _Stream([_framed(*rpcs)])
    assert _read_all(stream, len(rpcs)) == rpcs
    assert stream.reads == 1  # libp2p's reader: a read per length byte and one per body, 9 here


def test_a_length_over_the_limit_is_refused_before_the_body_is_read() -> None:
    stream = _Stream([encode_uvarint(5000), b"x" * 100])
    with pytest.raises(MessageTooLarge):
        _read_all(stream, 1, limit=4096)


def test_a_varint_over_ten_bytes_is_a_parse_error() -> None:
    with pytest.raises(ParseError):
        _read_all(_Stream([b"\xff" * 11]), 1)


@pytest.mark.parametrize("data", [b"", b"\x85", _framed(b"abcdef")[:-1]])
def test_a_stream_that_ends_inside_an_rpc_is_an_incomplete_read(data: bytes) -> None:
    with pytest.raises(IncompleteReadError):
        _read_all(_Stream([data]), 1)


@settings(max_examples=200, deadline=None)
@given(
    rpcs=st.lists(st.binary(max_size=600), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=5000), max_size=12),
)
def test_any_split_gives_back_exactly_the_rpcs(rpcs: list[bytes], cuts: list[int]) -> None:
    data = _framed(*rpcs)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    chunks = [data[a:b] for a, b in itertools.pairwise(points)]
    stream = _Stream(chunks)
    assert _read_all(stream, len(rpcs)) == rpcs
    assert stream.reads <= len(chunks)  # never a read while a whole RPC is buffered
