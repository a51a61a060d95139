"""Drive ``tests/interop/js/peer.mjs``, a js-libp2p peer, from a trio test.

The peer is a second libp2p implementation (js-libp2p 2.10 with Noise, yamux, identify,
ping, Kademlia in client mode and gossipsub under strict signing; versions pinned in
``tests/interop/js/package-lock.json``). Commands go to it as JSON lines on stdin and
every answer comes back as a JSON line on stdout; see the header of ``peer.mjs``.

``scripts/test`` installs it (``ensure_interop_js`` in ``scripts/_env.sh``). When it is
missing, :func:`require_interop_js` FAILS the test with the command that installs it:
interop is part of what the suite checks, so a machine without it must not go green.

Every wait is bounded; the process is always ended (``exit``, then SIGKILL) and also
exits by itself on stdin EOF or after ``max_seconds``.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

JS_DIR = Path(__file__).resolve().parent / "js"
PEER_SCRIPT = JS_DIR / "peer.mjs"
INSTALL_HINT = "bash -c 'source scripts/_env.sh && ensure_interop_js'"
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0


def require_interop_js() -> str:
    """The ``node`` binary, or fail the calling test saying how to install what is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail(f"node (Node.js >= 18) is not installed; run {INSTALL_HINT}", pytrace=False)
    # ensure_interop_js writes the stamp only after `npm ci` succeeded (a failed one can
    # leave a partial node_modules behind).
    if not (JS_DIR / "node_modules" / ".peerd-stamp").is_file():
        pytest.fail(f"js-libp2p is not installed in {JS_DIR}/node_modules; run {INSTALL_HINT}", pytrace=False)
    return node


class JsError(AssertionError):
    """The js peer answered a command with an error (or did not answer in time)."""


class JsPeer:
    """One running ``peer.mjs``. Use :func:`js_peer` to start one."""

    def __init__(self, process: trio.Process) -> None:
        self._process = process
        self._ids = itertools.count()
        self._replies: dict[int, dict[str, Any]] = {}
        self._waiting: dict[int, trio.Event] = {}
        self.events: list[dict[str, Any]] = []  # every line, in order
        self.stderr = bytearray()
        self.peer_id = ""
        self.addrs: list[str] = []
        self._ready = trio.Event()
        self.exited = trio.Event()

    # --- reading ----------------------------------------------------------------------------

    async def _read_stdout(self) -> None:
        assert self._process.stdout is not None
        buffer = b""
        async for chunk in self._process.stdout:
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.strip():
                    self._dispatch(json.loads(line))
        self.exited.set()
        for event in self._waiting.values():
            event.set()  # wake callers: their reply will never come

    async def _read_stderr(self) -> None:
        assert self._process.stderr is not None
        async for chunk in self._process.stderr:
            self.stderr += chunk
            del self.stderr[: max(0, len(self.stderr) - 16_384)]  # keep the tail for diagnostics

    def _dispatch(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        kind = event.get("event")
        if kind == "ready":
            self.peer_id = event["peer_id"]
            self.addrs = list(event["addrs"])
            self._ready.set()
        elif kind in ("done", "error") and isinstance(event.get("id"), int):
            self._replies[event["id"]] = event
            waiting = self._waiting.pop(event["id"], None)
            if waiting is not None:
                waiting.set()

    def messages(self, topic: str) -> list[dict[str, Any]]:
        """Gossip messages the js peer received on ``topic`` (``from``, ``type``, ``data``)."""
        return [e for e in self.events if e.get("event") == "message" and e.get("topic") == topic]

    def payloads(self, topic: str) -> list[str]:
        return [m["data"] for m in self.messages(topic)]

    # --- commands ---------------------------------------------------------------------------

    async def request(self, cmd: str, *, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        """Send one command; its ``done`` or ``error`` reply (JsError if none in time)."""
        assert self._process.stdin is not None
        ident = next(self._ids)
        done = self._waiting[ident] = trio.Event()
        line = json.dumps({"cmd": cmd, "id": ident, **args}) + "\n"
        try:
            await self._process.stdin.send_all(line.encode())
        except trio.BrokenResourceError as exc:
            raise JsError(f"js peer is gone; stderr: {self.stderr_tail()}") from exc
        with trio.move_on_after(timeout):
            await done.wait()
        reply = self._replies.pop(ident, None)
        self._waiting.pop(ident, None)
        if reply is None:
            state = "exited" if self.exited.is_set() else f"no answer in {timeout} s"
            raise JsError(f"js {cmd}: {state}; stderr: {self.stderr_tail()}")
        return reply

    async def call(self, cmd: str, *, timeout: float = 60.0, **args: Any) -> dict[str, Any]:
        """:meth:`request` that raises JsError on an ``error`` reply."""
        reply = await self.request(cmd, timeout=timeout, **args)
        if reply["event"] != "done":
            raise JsError(f"js {cmd} {args}: {reply.get('error')}")
        return reply

    def stderr_tail(self) -> str:
        return self.stderr[-2000:].decode(errors="replace")

    async def stop(self) -> None:
        """Ask the peer to exit; SIGKILL if it does not within a few seconds."""
        if self._process.returncode is None:
            with trio.move_on_after(_STOP_TIMEOUT_S):
                try:
                    await self.request("exit", timeout=_STOP_TIMEOUT_S)
                except JsError:
                    pass
                await self._process.wait()
        if self._process.returncode is None:
            self._process.kill()
            with trio.CancelScope(shield=True):
                await self._process.wait()


@asynccontextmanager
async def js_peer(
    *,
    listen: bool = False,
    services: tuple[str, ...] | None = None,
    dht_server: bool = False,
    max_seconds: float = 300.0,
) -> AsyncIterator[JsPeer]:
    """Start ``peer.mjs``; yields once it is listening (or ready, if ``listen`` is false).

    ``services``: any of "identify", "ping", "dht", "gossipsub" (default all); the DHT runs
    in client mode unless ``dht_server``. The process ends when the block exits, whatever
    happens inside it.
    """
    node = require_interop_js()
    config: dict[str, Any] = {"listen": listen, "dht_server": dht_server, "max_seconds": max_seconds}
    if services is not None:
        config["services"] = list(services)
    process = await trio.lowlevel.open_process(
        [node, str(PEER_SCRIPT), json.dumps(config)],
        cwd=str(JS_DIR),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    peer = JsPeer(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(peer._read_stdout)
            nursery.start_soon(peer._read_stderr)
            with trio.move_on_after(_START_TIMEOUT_S):
                await peer._ready.wait()
            if not peer._ready.is_set():
                raise JsError(f"js peer did not start in {_START_TIMEOUT_S} s; stderr: {peer.stderr_tail()}")
            try:
                yield peer
            finally:
                await peer.stop()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()
