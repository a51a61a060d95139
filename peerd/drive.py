"""Running a protocol state machine inside the daemon (issue 7 item 2).

The machines in :mod:`protocol.machines` are sans-IO: ``handle(event) -> actions``. A role
(submitter, contractor, committee) owns one :class:`MachineDriver` per machine it runs and
gives it a :class:`Performer` — the role's answer to each action. The driver is the only
place where:

* a machine's timers become trio sleeps (``SetTimer``/``CancelTimer``; a cancelled or
  replaced timer never fires, as ``protocol/machines/events.py`` ``TimerFired`` requires);
* actions are performed in list order — the quick ones (persist, count, notify, drop,
  reply …) at once, inside ``feed``; the slow ones (send on a stream, fetch a blob, run a
  job, publish) as tasks in the driver's own scope, each answering with its completion
  event through ``feed``. Persisting before the slow I/O starts is what makes "durable
  before anyone is told" hold (a result is in the store before it is sent);
* a machine's own bug (``LocalProtocolError``, an illegal event) is logged and counted,
  never allowed to take a role down: the machine stops being driven and says so.

The clock is the wall clock in Unix milliseconds (``now_ms`` of every event is compared
with the ``issued_at``/``expires_at`` of signed messages, SPEC §6).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import trio

from peerd.inbox import wall_ms
from protocol.envelope import Signed
from protocol.errors import ProtocolError
from protocol.machines import actions as act
from protocol.machines import events as ev
from protocol.messages import Message

if TYPE_CHECKING:
    from peerd.node import Node

M = TypeVar("M", bound=Message)

log = logging.getLogger(__name__)


class NodeSealer:
    """The machines' :class:`~protocol.machines.common.Sealer` over :meth:`Node.seal`, for
    every role: ``Node.seal`` persists the sequence's high-water mark and stamps the wall
    clock, the same clock as the machines' ``now_ms``."""

    def __init__(self, node: Node) -> None:
        self.node = node

    @property
    def peer_id(self) -> str:
        return self.node.peer_id

    def seal(self, cls: type[M], *, now_ms: int, ttl_ms: int, **fields: Any) -> Signed:
        _, signed = self.node.seal(cls, ttl_ms=ttl_ms, **fields)
        return signed


class Machine(Protocol):
    def handle(self, event: ev.Event) -> list[act.Action]: ...


class Performer(Protocol):
    """A role's answer to the actions of its machines.

    ``perform_now`` does what completes at once (store writes, counters, notifications,
    verdicts) and returns True when it handled the action. ``perform_later`` returns an
    awaitable for I/O (streams, blobs, jobs, gossip) that resolves to the completion event
    to feed back, or None when nothing is to be fed back (``Publish``); or None when it does
    not know the action at all (then the driver logs it as a bug).
    """

    def perform_now(self, driver: MachineDriver, action: act.Action) -> bool: ...

    def perform_later(
        self, driver: MachineDriver, action: act.Action
    ) -> Callable[[], Awaitable[ev.Event | None]] | None: ...


class MachineDriver:
    """Drives one machine: feeds it events, performs its actions, keeps its timers.

    Owns a cancel scope inside the role's nursery: :meth:`close` (or the machine ending)
    cancels its timers and any I/O still in flight, so nothing outlives the task.
    """

    def __init__(
        self,
        key: Any,
        machine: Machine,
        performer: Performer,
        nursery: trio.Nursery,
        *,
        clock: Callable[[], int] = wall_ms,
        on_error: Callable[[str], None] = lambda name: None,
    ) -> None:
        self.key = key
        self.machine = machine
        self._performer = performer
        self._nursery = nursery
        self._clock = clock
        self._on_error = on_error
        self._timers: dict[str, trio.CancelScope] = {}
        self._inflight: set[trio.CancelScope] = set()
        self.closed = False
        #: Actions of the last ``feed`` (a role reads e.g. the ``Drop`` verdict of a message).
        self.last_actions: list[act.Action] = []

    def now_ms(self) -> int:
        return self._clock()

    def feed(self, event: ev.Event) -> list[act.Action]:
        """Hand ``event`` to the machine and perform what it asks, in order."""
        if self.closed:
            return []
        try:
            actions = self.machine.handle(event)
        except ProtocolError as exc:
            # A LocalProtocolError here means we routed an event the machine cannot take:
            # our bug. Stop driving this machine rather than let one task take the role down.
            log.exception("machine %s refused %s: %s", self.key, type(event).__name__, exc)
            self._on_error("drive.machine_errors")
            self.close()
            return []
        self.last_actions = actions
        for action in actions:
            self._perform(action)
        return actions

    def _perform(self, action: act.Action) -> None:
        if isinstance(action, act.SetTimer):
            self._set_timer(action.name, action.at_ms)
            return
        if isinstance(action, act.CancelTimer):
            scope = self._timers.pop(action.name, None)
            if scope is not None:
                scope.cancel()
            return
        if self._performer.perform_now(self, action):
            return
        job = self._performer.perform_later(self, action)
        if job is None:
            log.error("machine %s asked for %s, which its role does not perform", self.key, action)
            self._on_error("drive.unknown_actions")
            return
        self._nursery.start_soon(self._run_later, job)

    async def _run_later(self, job: Callable[[], Awaitable[ev.Event | None]]) -> None:
        if self.closed:
            return
        with trio.CancelScope() as scope:
            self._inflight.add(scope)
            try:
                event = await job()
            except Exception:
                # The performer translates expected failures (transport, hash mismatch, a
                # failed job) into completion events; anything else is our bug.
                log.exception("performing an action of machine %s failed", self.key)
                self._on_error("drive.action_errors")
                return
            finally:
                self._inflight.discard(scope)
            if event is not None:
                self.feed(event)

    def _set_timer(self, name: str, at_ms: int) -> None:
        old = self._timers.pop(name, None)
        if old is not None:
            old.cancel()
        scope = trio.CancelScope()
        self._timers[name] = scope
        self._nursery.start_soon(self._timer, name, at_ms, scope)

    async def _timer(self, name: str, at_ms: int, scope: trio.CancelScope) -> None:
        with scope:
            delay = (at_ms - self._clock()) / 1000
            if delay > 0 and math.isfinite(delay):
                await trio.sleep(delay)
            # Replaced or cancelled while we slept: the scope was cancelled and we never
            # get here; a timer that fired is no longer pending.
            if self._timers.get(name) is scope:
                del self._timers[name]
                self.feed(ev.TimerFired(now_ms=max(self._clock(), at_ms), name=name))

    def armed(self) -> set[str]:
        return set(self._timers)

    def close(self) -> None:
        """Stop driving: cancel timers and I/O in flight; later events are ignored."""
        self.closed = True
        for scope in self._timers.values():
            scope.cancel()
        self._timers.clear()
        for scope in self._inflight:
            scope.cancel()
        self._inflight.clear()
