"""Thread work does not advance trio's autojump clock in our tests (tests/conftest.py)."""

from __future__ import annotations

import time

import trio
import trio.testing


async def test_thread_work_does_not_let_virtual_time_leap(autojump_clock: trio.testing.MockClock) -> None:
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep, 10)  # a pending deadline the clock could jump to
        await trio.to_thread.run_sync(time.sleep, 0.2)
        # Without the inline fixture the clock jumps to the 10 s deadline while the thread runs.
        assert trio.current_time() - start < 10
        nursery.cancel_scope.cancel()
