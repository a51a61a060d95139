"""A small blocking JSON-RPC client for peerd's Unix socket.

Plain ``socket`` on purpose: peerctl must start fast and never import trio, libp2p, numpy or
TensorFlow, and a script talking to the daemon should not need an event loop either.

    with RpcClient(Path("/run/peerd/peerd.sock")) as rpc:
        print(rpc.call("node.info")["peer_id"])
"""

from __future__ import annotations

import grp
import os
import socket
import stat
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from peerd.rpc.jsonrpc import (
    LINE_TOO_LONG,
    MAX_RESPONSE_LINE,
    ErrorResponse,
    LineBuffer,
    Notification,
    Response,
    encode_request,
    is_stream_end,
    parse_server_message,
)
from peerd.rpc.rundir import UnsafeSocketDir, check_client_dir

__all__ = [
    "ConnectionLost",
    "DaemonNotRunning",
    "RpcCallError",
    "RpcClient",
    "RpcClientError",
    "SocketPermissionDenied",
    "Subscription",
    "UnsafeSocket",
]


class RpcClientError(Exception):
    """Base of every error the client raises."""


class DaemonNotRunning(RpcClientError):
    """No socket file, or nobody listening on it."""


class UnsafeSocket(RpcClientError):
    """The socket's directory could be controlled by another user; not connected."""


class SocketPermissionDenied(RpcClientError):
    """The socket exists but this user may not open it."""


class ConnectionLost(RpcClientError):
    """The daemon closed the connection, sent garbage, or did not answer in time."""


class RpcCallError(RpcClientError):
    """The daemon answered with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data


def _refused(path: Path) -> str:
    """Why connect() was refused: Linux says ECONNREFUSED for a file that is no socket at all."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return f"peerd is not running (no socket at {path})"
    if stat.S_ISSOCK(mode):
        return f"peerd is not running (connection refused at {path}: a socket left by a daemon that stopped)"
    kind = "a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode) else "not a socket"
    return f"{path} is {kind}, not peerd's socket"


def _group_hint(path: Path) -> str:
    try:
        return f"; add your user to group {grp.getgrgid(os.stat(path).st_gid).gr_name!r} or use sudo"
    except (OSError, KeyError):
        return "; use sudo or ask the administrator for access"


class RpcClient:
    """One connection to the daemon. Not thread-safe; cheap to create."""

    def __init__(self, path: Path | str, *, timeout: float | None = 60.0) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = LineBuffer(MAX_RESPONSE_LINE)
        self._lines: deque[bytes] = deque()
        self._pending_notes: deque[Notification] = deque()
        self._next_id = 1

    # -- connection ------------------------------------------------------------------------------

    def connect(self) -> None:
        if self._sock is not None:
            return
        try:
            # Before connecting: a socket in a directory another user controls may be theirs,
            # put there to receive our calls (peerd/rpc/rundir.py).
            check_client_dir(self.path.parent)
        except UnsafeSocketDir as exc:
            raise UnsafeSocket(f"refusing to connect to {self.path}: unsafe socket directory {exc}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except (FileNotFoundError, NotADirectoryError):
            sock.close()
            raise DaemonNotRunning(f"peerd is not running (no socket at {self.path})") from None
        except ConnectionRefusedError:
            sock.close()
            raise DaemonNotRunning(_refused(self.path)) from None
        except PermissionError:
            sock.close()
            raise SocketPermissionDenied(
                f"permission denied opening {self.path}{_group_hint(self.path)}"
            ) from None
        except OSError as exc:
            sock.close()
            raise ConnectionLost(f"cannot connect to {self.path}: {exc.strerror or exc}") from None
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> RpcClient:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- calls -----------------------------------------------------------------------------------

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> Any:
        """Call ``method`` and return its result; raises :class:`RpcCallError` on a JSON-RPC error.

        Notifications that arrive meanwhile are kept for :meth:`notifications`.
        """
        req_id = self._send(method, params or {})
        return self._await_response(req_id, timeout=self.timeout)

    def subscribe(self, method: str, params: Mapping[str, Any] | None = None) -> Subscription:
        """Call a streaming method (``task.watch``): the result is available at once as
        ``.result``; iterating yields its notifications until the ``*.end`` one (included), and
        raises :class:`ConnectionLost` if the daemon hangs up before that."""
        result = self.call(method, params)
        return Subscription(self, result)

    def notifications(self, *, timeout: float | None = None) -> Iterator[Notification]:
        """Yield server notifications as they arrive, forever (until the connection closes)."""
        while True:
            if self._pending_notes:
                yield self._pending_notes.popleft()
                continue
            msg = self._read_message(timeout=timeout)
            if msg is None:
                return
            if isinstance(msg, Notification):
                yield msg

    # -- internals -------------------------------------------------------------------------------

    def _send(self, method: str, params: Mapping[str, Any]) -> int:
        self.connect()
        assert self._sock is not None
        req_id = self._next_id
        self._next_id += 1
        try:
            self._sock.sendall(encode_request(req_id, method, params))
        except OSError as exc:
            self.close()
            raise ConnectionLost(f"lost the connection to peerd while sending {method}: {exc}") from None
        return req_id

    def _await_response(self, req_id: int, *, timeout: float | None) -> Any:
        while True:
            msg = self._read_message(timeout=timeout)
            if msg is None:
                raise ConnectionLost("peerd closed the connection before answering")
            if isinstance(msg, Notification):
                self._pending_notes.append(msg)
                continue
            if msg.id != req_id:
                continue  # an answer to a request we gave up on
            if isinstance(msg, ErrorResponse):
                raise RpcCallError(msg.code, msg.message, msg.data)
            return msg.result

    def _read_message(self, *, timeout: float | None) -> Response | ErrorResponse | Notification | None:
        """The next message, or None at end of stream."""
        assert self._sock is not None
        self._sock.settimeout(timeout)
        while not self._lines:
            try:
                data = self._sock.recv(256 * 1024)
            except TimeoutError:
                raise ConnectionLost(f"peerd did not answer within {timeout:g} s") from None
            except OSError as exc:
                raise ConnectionLost(f"lost the connection to peerd: {exc}") from None
            if not data:
                return None
            for item in self._buf.feed(data):
                if item is LINE_TOO_LONG:
                    raise ConnectionLost(f"peerd sent a line longer than {MAX_RESPONSE_LINE} bytes")
                assert isinstance(item, bytes)
                self._lines.append(item)
        line = self._lines.popleft()
        try:
            return parse_server_message(line)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ConnectionLost(f"peerd sent an invalid message: {exc}") from None


class Subscription:
    """The result of a streaming call plus an iterator over its notifications."""

    def __init__(self, client: RpcClient, result: Any) -> None:
        self.result = result
        self._client = client
        self.ended = False

    def __iter__(self) -> Iterator[Notification]:
        for note in self._client.notifications(timeout=None):
            yield note
            if is_stream_end(note.method):
                self.ended = True
                return
        raise ConnectionLost("peerd closed the connection before the stream ended")
