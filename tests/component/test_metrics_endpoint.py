"""The metrics endpoint's HTTP side on a real loopback socket, without a daemon.

A refusal must reach the client even when the client is still sending: closing a socket with
unread input makes the kernel send an RST, which throws away a reply the client has not read yet
(CI lost a 431 this way). The service half-closes and drains instead (peerd/metrics.py).
"""

from __future__ import annotations

import trio

from peerd.metrics import MAX_HEAD, MetricsService


async def _exchange(address: tuple[str, int], request: bytes, *, pause_s: float) -> bytes:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(request)
        # Let the server answer and close while our request is still partly unread there;
        # this orders the race the CI run lost, it asserts nothing about time.
        await trio.sleep(pause_s)
        reply = b""
        with trio.fail_after(30):  # safety bound, never the thing under test
            for _ in range(1000):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                reply += chunk
        return reply


async def test_an_oversized_head_is_answered_431_even_while_the_client_is_still_sending() -> None:
    service = MetricsService("127.0.0.1:0", node=object())
    async with trio.open_nursery() as nursery:
        address = await nursery.start(service.run)
        reply = await _exchange(address, b"GET /" + b"a" * (MAX_HEAD * 3) + b"\r\n\r\n", pause_s=0.3)
        assert reply.startswith(b"HTTP/1.1 431 "), reply[:80]
        reply = await _exchange(address, b"\x00\xff garbage\r\n\r\n" + b"x" * 50_000, pause_s=0.3)
        assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
        nursery.cancel_scope.cancel()
