"""peerd.drive.MachineDriver with a scripted fake machine and trio's virtual clock."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
import trio.testing

from peerd.drive import MachineDriver
from protocol.errors import LocalProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev


@dataclass(frozen=True, kw_only=True)
class Slow(act.Action):
    """An I/O action the fake performer completes after ``delay`` s with ``Done(label)``."""

    label: str
    delay: float


@dataclass(frozen=True, kw_only=True)
class Done(ev.Event):
    label: str


@dataclass(frozen=True, kw_only=True)
class Unknown(act.Action):
    pass


class Script:
    """A machine that answers each event with the actions scripted for it."""

    def __init__(self, answers: dict[str, list[act.Action]]) -> None:
        self.answers = answers
        self.seen: list[ev.Event] = []

    def handle(self, event: ev.Event) -> list[act.Action]:
        self.seen.append(event)
        if isinstance(event, ev.TimerFired):
            key = f"timer:{event.name}"
        elif isinstance(event, Done):
            key = f"done:{event.label}"
        else:
            key = type(event).__name__
        if key == "boom":
            raise LocalProtocolError("illegal", reason="illegal_event")
        return list(self.answers.get(key, []))


class Recorder:
    def __init__(self) -> None:
        self.now: list[act.Action] = []
        self.started: list[str] = []
        self.finished: list[str] = []

    def perform_now(self, driver: MachineDriver, action: act.Action) -> bool:
        if isinstance(action, act.Count | act.Notify):
            self.now.append(action)
            return True
        return False

    def perform_later(
        self, driver: MachineDriver, action: act.Action
    ) -> Callable[[], Awaitable[ev.Event | None]] | None:
        if not isinstance(action, Slow):
            return None

        async def run() -> ev.Event | None:
            self.started.append(action.label)
            await trio.sleep(action.delay)
            self.finished.append(action.label)
            return Done(now_ms=driver.now_ms(), label=action.label)

        return run


def _clock() -> int:
    return int(trio.current_time() * 1000)


async def test_quick_actions_run_in_order_inside_feed_and_slow_ones_feed_back(
    autojump_clock: trio.testing.MockClock,
) -> None:
    machine = Script(
        {
            "Start": [act.Count(name="a"), Slow(label="io", delay=1.0), act.Count(name="b")],
            "done:io": [act.Count(name="c")],
        }
    )
    perf = Recorder()
    async with trio.open_nursery() as nursery:
        driver = MachineDriver("m", machine, perf, nursery, clock=_clock)
        driver.feed(ev.Start(now_ms=_clock()))
        # Both quick actions ran before feed returned; the I/O had not started yet.
        assert [a.name for a in perf.now if isinstance(a, act.Count)] == ["a", "b"]
        assert perf.started == []
    assert perf.finished == ["io"]
    assert [a.name for a in perf.now if isinstance(a, act.Count)] == ["a", "b", "c"]
    done = [e for e in machine.seen if isinstance(e, Done)]
    assert len(done) == 1 and done[0].now_ms >= 1000


async def test_a_timer_fires_once_at_its_time_and_a_replaced_one_never(
    autojump_clock: trio.testing.MockClock,
) -> None:
    machine = Script(
        {
            "Start": [act.SetTimer(name="t", at_ms=5_000), act.SetTimer(name="u", at_ms=3_000)],
            # Re-setting "t" replaces the pending 5 s firing; cancelling "u" drops it.
            "done:x": [],
        }
    )
    perf = Recorder()
    async with trio.open_nursery() as nursery:
        driver = MachineDriver("m", machine, perf, nursery, clock=_clock)
        driver.feed(ev.Start(now_ms=0))
        assert driver.armed() == {"t", "u"}
        machine.answers["done:x"] = [act.SetTimer(name="t", at_ms=8_000), act.CancelTimer(name="u")]
        driver.feed(Done(now_ms=0, label="x"))
        await trio.sleep(20)
        fired = [e for e in machine.seen if isinstance(e, ev.TimerFired)]
        assert [(e.name, e.now_ms) for e in fired] == [("t", 8_000)]
        assert driver.armed() == set()


async def test_close_cancels_timers_and_io_and_ignores_later_events(
    autojump_clock: trio.testing.MockClock,
) -> None:
    machine = Script({"Start": [act.SetTimer(name="t", at_ms=1_000), Slow(label="io", delay=5.0)]})
    perf = Recorder()
    async with trio.open_nursery() as nursery:
        driver = MachineDriver("m", machine, perf, nursery, clock=_clock)
        driver.feed(ev.Start(now_ms=0))
        await trio.sleep(0.5)
        assert perf.started == ["io"]
        driver.close()
        assert driver.feed(Done(now_ms=0, label="late")) == []
    # The nursery ended without waiting 5 s or firing the timer.
    assert trio.current_time() < 1.0
    assert perf.finished == []
    assert not any(isinstance(e, ev.TimerFired) for e in machine.seen)
    assert len(machine.seen) == 1


async def test_a_machine_bug_stops_that_machine_and_is_counted_not_raised() -> None:
    errors: list[str] = []

    class Buggy(Script):
        def handle(self, event: ev.Event) -> list[act.Action]:
            raise LocalProtocolError("illegal event", reason="illegal_event")

    async with trio.open_nursery() as nursery:
        driver = MachineDriver("m", Buggy({}), Recorder(), nursery, clock=_clock, on_error=errors.append)
        assert driver.feed(ev.Start(now_ms=0)) == []
        assert driver.closed
    assert errors == ["drive.machine_errors"]


async def test_an_action_no_role_performs_is_counted() -> None:
    errors: list[str] = []
    async with trio.open_nursery() as nursery:
        driver = MachineDriver(
            "m", Script({"Start": [Unknown()]}), Recorder(), nursery, clock=_clock, on_error=errors.append
        )
        driver.feed(ev.Start(now_ms=0))
    assert errors == ["drive.unknown_actions"]
