"""A role that owns its tasks (issue 7 item 2: "every role spawns into the root nursery, so
no task has an owning scope").

The submitter, contractor, committee (``Rounds``) and task bus each inherit
:class:`OwnedScope`: the daemon starts the role with ``await nursery.start(role.run)``,
and everything the role spawns — machine drivers, their timers and slow actions, followers,
bids — goes into the role's own nursery, which ends with the role. A role used before its
``run`` has started raises at once instead of spawning into some other scope.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

if TYPE_CHECKING:
    # libp2p installs trio-typing, whose stale trio stubs lack trio.TaskStatus (as in peerd/p2p.py).
    from trio_typing import TaskStatus


class OwnedScope:
    _nursery: trio.Nursery | None = None

    @property
    def nursery(self) -> trio.Nursery:
        """The role's own nursery, while :meth:`run` runs."""
        if self._nursery is None:
            raise RuntimeError(f"{type(self).__name__}.run() is not running: start the role first")
        return self._nursery

    def check_running(self) -> None:
        """Raise unless :meth:`run` runs (before a change that a spawn would have to follow)."""
        _ = self.nursery

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the role's nursery and keep it until cancelled (the daemon's shutdown)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self._started()
                task_status.started()
                await trio.sleep_forever()
        finally:
            # Only once every task of the role has ended: while the nursery unwinds, a task
            # that spawns (a driver closing) still gets trio's own cancelled child.
            self._nursery = None

    def _started(self) -> None:
        """Hook: the nursery is open, ``task_status.started()`` not yet called."""
