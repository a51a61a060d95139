"""The pipelined multistream-select client (peerd/p2p.py, trap 24), on a stand-in stream.

The stand-in answers with scripted lines, so each of the listener's answers can be tried:
the real listener is exercised in tests/integration/test_p2p.py and test_interop_js.py.
"""

from __future__ import annotations

import pytest
import trio
from libp2p.io.exceptions import IOException
from libp2p.protocol_muxer.exceptions import MultiselectClientError
from libp2p.protocol_muxer.multiselect_communicator import MultiselectCommunicator
from libp2p.utils import encode_delim

from peerd.p2p import _PipelinedMultiselectClient

HEADER = "/multistream/1.0.0"
PROTO = "/peerd/blob/2.0.0"


class _Stream:
    """Answers ``replies`` (already delimited) to whatever is written; records the writes."""

    def __init__(self, *replies: str, fail_write: bool = False) -> None:
        self.writes: list[bytes] = []
        self._in = b"".join(encode_delim(r.encode()) for r in replies)
        self._fail_write = fail_write

    async def write(self, data: bytes) -> None:
        if self._fail_write:
            raise IOException("stream reset")
        self.writes.append(data)

    async def read(self, n: int | None = None) -> bytes:
        if not self._in:
            await trio.sleep_forever()
        take = len(self._in) if n is None else n
        out, self._in = self._in[:take], self._in[take:]
        return out

    async def close(self) -> None:
        pass


async def select(stream: _Stream, *protocols: str, timeout: int = 5) -> str:
    client = _PipelinedMultiselectClient()
    return str(await client.select_one_of(list(protocols), MultiselectCommunicator(stream), timeout))  # type: ignore[arg-type]


async def test_one_protocol_is_one_write_and_two_reads() -> None:
    s = _Stream(HEADER, PROTO)
    assert await select(s, PROTO) == PROTO
    assert s.writes == [encode_delim(HEADER.encode()) + encode_delim(PROTO.encode())]


@pytest.mark.parametrize(
    ("replies", "needle"),
    [
        ((HEADER, "na"), "not supported"),
        (("/multistream/2.0.0", PROTO), "mismatch"),
        ((HEADER, "/something/else"), "unrecognized"),
    ],
)
async def test_a_refusal_or_a_wrong_answer_is_a_client_error(replies: tuple[str, str], needle: str) -> None:
    with pytest.raises(MultiselectClientError, match=needle):
        await select(_Stream(*replies), PROTO)


async def test_a_failed_write_and_a_silent_listener_are_client_errors() -> None:
    with pytest.raises(MultiselectClientError, match="write failed"):
        await select(_Stream(fail_write=True), PROTO)
    with pytest.raises(MultiselectClientError, match="timed out"):
        await select(_Stream(HEADER), PROTO, timeout=0)  # the protocol's echo never comes


async def test_several_candidates_fall_back_to_one_line_at_a_time() -> None:
    s = _Stream(HEADER, "na", PROTO)
    assert await select(s, "/peerd/blob/3.0.0", PROTO) == PROTO
    assert s.writes[0] == encode_delim(HEADER.encode())  # libp2p's own sequence: header alone
