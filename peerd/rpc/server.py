"""The JSON-RPC 2.0 server on peerd's Unix socket (trio).

Shape taken from tailscale's local API (``ipn/localapi/localapi.go``, ``safesocket/unixsocket.go``):
a table of methods, each with a permission; the caller's identity comes from the kernel
(SO_PEERCRED), never from the request; a socket file left by a crashed daemon is removed only
after a connect attempt to it is refused.

Permissions: ``read`` methods are open to anyone who can open the socket (the socket's mode and
group decide who that is); ``write`` methods additionally need root, the daemon's own uid, a
member of the socket's group (``socket_group``, else the daemon's primary group; as a primary or
supplementary group) or a uid in ``rpc.allowed_uids``.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import socket as stdsocket
import stat
import struct
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from peerd.rpc import CONTRACT, MethodSpec, Permission
from peerd.rpc.jsonrpc import (
    LINE_TOO_LONG,
    MAX_REQUEST_LINE,
    NO_PARAMS,
    ErrorCode,
    ErrorResponse,
    LineBuffer,
    ParamsError,
    ParamsValidator,
    Request,
    RpcError,
    encode_error,
    encode_notification,
    encode_result,
    parse_request,
)
from peerd.rpc.rundir import UnsafeSocketDir, ensure_daemon_dir

if TYPE_CHECKING:
    # libp2p pulls in trio-typing, whose stale trio stubs shadow trio's own annotations for
    # mypy and lack trio.TaskStatus; the protocol lives in trio_typing there.
    from trio_typing import TaskStatus

log = logging.getLogger(__name__)

__all__ = [
    "CallContext",
    "Handler",
    "Method",
    "MethodTable",
    "ParamsError",
    "PeerCred",
    "RpcError",
    "RpcServer",
    "RpcServerError",
    "WriteAccess",
    "read_peer_cred",
]

#: Requests in flight per connection; the reader stops reading beyond it (backpressure, not errors).
MAX_INFLIGHT_PER_CONNECTION = 32
_RECV_CHUNK = 64 * 1024
# Linux's SO_PEERGROUPS (4.13+); Python does not export the constant.
_SO_PEERGROUPS = getattr(stdsocket, "SO_PEERGROUPS", 59)
_PEERCRED = struct.Struct("3i")


class RpcServerError(Exception):
    """The server could not start (socket in use by a live daemon, bad group, permissions)."""


# --- caller identity ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PeerCred:
    """The connecting process as the kernel saw it at connect() time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


def _groups_from_proc(pid: int, proc: Path = Path("/proc")) -> tuple[int, ...]:
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("Groups:"):
            return tuple(int(g) for g in line.split()[1:])
    return ()


def read_peer_cred(sock: Any) -> PeerCred:
    """SO_PEERCRED (pid, uid, gid) plus supplementary groups of the peer of a connected AF_UNIX socket.

    Supplementary groups come from SO_PEERGROUPS, which the kernel captures at connect() like
    SO_PEERCRED; /proc/<pid>/status is only a fallback for old kernels because the pid could be
    reused by the time we read it.
    """
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(stdsocket.SOL_SOCKET, stdsocket.SO_PEERCRED, _PEERCRED.size)
    )
    try:
        raw = sock.getsockopt(stdsocket.SOL_SOCKET, _SO_PEERGROUPS, 4 * 4096)
        groups = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) - len(raw) % 4])
    except OSError:
        groups = _groups_from_proc(pid)
    return PeerCred(pid=pid, uid=uid, gid=gid, groups=tuple(groups))


@dataclass(frozen=True, slots=True)
class WriteAccess:
    """Who may call ``write`` methods."""

    daemon_uid: int
    group_gid: int | None = None
    allowed_uids: frozenset[int] = frozenset()

    def allows(self, cred: PeerCred) -> bool:
        if cred.uid in (0, self.daemon_uid) or cred.uid in self.allowed_uids:
            return True
        return self.group_gid is not None and (cred.gid == self.group_gid or self.group_gid in cred.groups)


# --- method table -------------------------------------------------------------------------------


class _ClientGone(Exception):
    """The client closed the connection while we were writing to it."""


class CallContext:
    """What a handler knows about its call, and how it talks back on the connection."""

    def __init__(self, cred: PeerCred, request: Request, conn: _Connection) -> None:
        self.cred = cred
        self.request = request
        self._conn = conn
        self.replied = False

    async def notify(self, method: str, params: Mapping[str, Any]) -> None:
        """Push a JSON-RPC notification to this caller. Raises if the caller has gone away,
        which ends the handler (its task is cancelled with the connection)."""
        await self._conn.send(encode_notification(method, params))

    async def reply(self, result: Any) -> None:
        """Send the response now; a streaming handler then keeps pushing notifications.
        The handler's return value is ignored once it has replied."""
        if self.replied:
            raise RuntimeError(f"{self.request.method}: replied twice")
        self.replied = True
        if not self.request.is_notification:
            await self._conn.send(encode_result(self.request.id, result))


Handler = Callable[[dict[str, Any], CallContext], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    handler: Handler
    permission: Permission = "read"
    params: ParamsValidator = NO_PARAMS
    streaming: bool = False

    def __post_init__(self) -> None:
        if self.permission not in ("read", "write"):
            raise ValueError(f"{self.name}: permission must be 'read' or 'write'")


class MethodTable:
    def __init__(self, methods: Iterable[Method] = ()) -> None:
        self._methods: dict[str, Method] = {}
        for m in methods:
            self.add(m)

    def add(self, method: Method) -> None:
        if method.name in self._methods:
            raise ValueError(f"method {method.name!r} registered twice")
        self._methods[method.name] = method

    def get(self, name: str) -> Method | None:
        return self._methods.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> Iterator[Method]:
        return iter(self._methods.values())

    @classmethod
    def from_contract(
        cls, handlers: Mapping[str, Handler], contract: Mapping[str, MethodSpec] = CONTRACT
    ) -> MethodTable:
        """Bind handlers to the documented methods (permission, params, streaming come from the contract).

        A handler for an undocumented method is a ValueError: document it in docs/rpc.md and the
        contract first. Documented methods without a handler answer -32601 like unknown ones.
        """
        undocumented = sorted(set(handlers) - set(contract))
        if undocumented:
            raise ValueError(f"handlers for undocumented methods: {', '.join(undocumented)}")
        return cls(
            Method(name, handler, contract[name].permission, contract[name].params, contract[name].streaming)
            for name, handler in handlers.items()
        )


# --- connections --------------------------------------------------------------------------------


class _Connection:
    def __init__(
        self, stream: trio.SocketStream, cred: PeerCred, methods: MethodTable, access: WriteAccess
    ) -> None:
        self._stream = stream
        self._cred = cred
        self._methods = methods
        self._access = access
        self._send_lock = trio.Lock()
        self._slots = trio.Semaphore(MAX_INFLIGHT_PER_CONNECTION)
        self._stream_scopes: set[trio.CancelScope] = set()
        self._nursery: trio.Nursery | None = None
        self.gone = False

    async def send(self, data: bytes) -> None:
        # trio streams forbid concurrent send_all; handlers of one connection run concurrently.
        async with self._send_lock:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._hang_up()
                raise _ClientGone from exc

    def _hang_up(self) -> None:
        self.gone = True
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            buf = LineBuffer(MAX_REQUEST_LINE)
            while True:
                try:
                    data = await self._stream.receive_some(_RECV_CHUNK)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    break
                for item in buf.feed(data):
                    if item is LINE_TOO_LONG:
                        await self._send_quietly(
                            encode_error(
                                None,
                                ErrorCode.INVALID_REQUEST,
                                f"request line longer than {MAX_REQUEST_LINE} bytes",
                            )
                        )
                        continue
                    assert isinstance(item, bytes)
                    msg = parse_request(item)
                    if isinstance(msg, ErrorResponse):
                        log.debug("rpc bad request from pid=%d: %s", self._cred.pid, msg.message)
                        await self._send_quietly(msg.encode())
                        continue
                    await self._slots.acquire()
                    scope = trio.CancelScope()
                    method = self._methods.get(msg.method)
                    if method is not None and method.streaming:
                        self._stream_scopes.add(scope)
                    nursery.start_soon(self._dispatch, msg, scope)
            # End of input. Ordinary calls may still finish and answer a half-closed client
            # (``printf ... | socat``), but a stream would wait forever for a reader who left.
            for scope in self._stream_scopes:
                scope.cancel()

    async def _send_quietly(self, data: bytes) -> None:
        try:
            await self.send(data)
        except _ClientGone:
            pass

    async def _dispatch(self, req: Request, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await self._call(req)
        except _ClientGone:
            pass
        finally:
            self._stream_scopes.discard(scope)
            self._slots.release()

    async def _error(self, req: Request, code: int, message: str, data: Any = None) -> None:
        if not req.is_notification:
            await self.send(encode_error(req.id, code, message, data))

    async def _call(self, req: Request) -> None:
        method = self._methods.get(req.method)
        if method is None:
            await self._error(req, ErrorCode.METHOD_NOT_FOUND, f"method not found: {req.method}")
            return
        if method.permission == "write" and not self._access.allows(self._cred):
            log.warning("rpc %s denied to pid=%d uid=%d", req.method, self._cred.pid, self._cred.uid)
            await self._error(
                req,
                ErrorCode.PERMISSION_DENIED,
                f"permission denied: {req.method} needs write access (root, the daemon's user, "
                f"the socket group or rpc.allowed_uids); uid {self._cred.uid} has read access only",
            )
            return
        if method.permission == "write":
            log.info("rpc %s by pid=%d uid=%d", req.method, self._cred.pid, self._cred.uid)
        ctx = CallContext(self._cred, req, self)
        try:
            params = method.params(dict(req.params))
            result = await method.handler(params, ctx)
        except _ClientGone:
            raise
        except RpcError as exc:
            await self._error(req, exc.code, exc.message, exc.data)
            return
        except Exception as exc:
            if self.gone:
                return
            log.exception("rpc handler %s failed", req.method)
            await self._error(req, ErrorCode.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
            return
        if ctx.replied or req.is_notification:
            return
        try:
            line = encode_result(req.id, result)
        except (TypeError, ValueError):
            log.exception("rpc handler %s returned a result that is not JSON", req.method)
            await self._error(
                req, ErrorCode.INTERNAL_ERROR, "internal error: result is not JSON-serialisable"
            )
            return
        await self.send(line)


# --- the server ---------------------------------------------------------------------------------


class RpcServer:
    def __init__(
        self,
        path: Path,
        methods: MethodTable,
        *,
        group: str | None = None,
        allowed_uids: Iterable[int] = (),
        mode: int = 0o660,
    ) -> None:
        self.path = Path(path)
        self.methods = methods
        self.group = group
        self.allowed_uids = frozenset(allowed_uids)
        self.mode = mode

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        gid = self._group_gid()
        self._ensure_parent(gid)
        await self._remove_stale_socket()
        sock = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            try:
                await sock.bind(str(self.path))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise RpcServerError(f"{self.path}: another process bound the socket first") from exc
                raise RpcServerError(f"cannot bind {self.path}: {exc.strerror}") from exc
            inode = os.stat(self.path).st_ino
            # Nobody can connect before listen(), so setting mode and group here leaves no window.
            os.chmod(self.path, self.mode)
            if gid is not None:
                try:
                    os.chown(self.path, -1, gid)
                except PermissionError as exc:
                    raise RpcServerError(
                        f"cannot chgrp {self.path} to {self.group!r}: the daemon user must be in that group"
                    ) from exc
            # Write access follows the socket's group as created: node.socket_group, or else the
            # daemon's primary group (what `usermod -aG peerd alice` is expected to grant).
            access = WriteAccess(
                daemon_uid=os.geteuid(), group_gid=os.stat(self.path).st_gid, allowed_uids=self.allowed_uids
            )
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self._connection_handler(access), [listener])
                log.info("rpc listening on %s", self.path)
                task_status.started()
        finally:
            self._unlink_if_ours(inode)
            with trio.CancelScope(shield=True):
                await listener.aclose()

    def _connection_handler(self, access: WriteAccess) -> Callable[[trio.SocketStream], Awaitable[None]]:
        async def handle(stream: trio.SocketStream) -> None:
            async with stream:
                try:
                    cred = read_peer_cred(stream.socket)
                except OSError:
                    log.warning("rpc connection without peer credentials; closing")
                    return
                log.info("rpc connection pid=%d uid=%d gid=%d", cred.pid, cred.uid, cred.gid)
                try:
                    await _Connection(stream, cred, self.methods, access).run()
                except Exception:
                    # A bug reached by one caller's input ends that caller's connection, never
                    # the listener: trio.serve_listeners would let it end the daemon.
                    log.exception("rpc connection pid=%d failed; closing it", cred.pid)

        return handle

    def _group_gid(self) -> int | None:
        if self.group is None:
            return None
        try:
            return grp.getgrnam(self.group).gr_gid
        except KeyError:
            raise RpcServerError(f"node.socket_group: no such group {self.group!r}") from None

    def _ensure_parent(self, gid: int | None) -> None:
        # Created only when missing (systemd's RuntimeDirectory= normally provides it), and
        # refused unless the daemon's user alone controls it (peerd/rpc/rundir.py says why).
        # `peerd` checks this at start already, as a config error; this keeps RpcServer safe
        # however it is started.
        try:
            ensure_daemon_dir(self.path.parent, gid=gid)
        except UnsafeSocketDir as exc:
            raise RpcServerError(f"unsafe socket directory {exc}") from None

    async def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise RpcServerError(f"{self.path} exists and is not a socket; refusing to remove it")
        probe = trio.socket.socket(stdsocket.AF_UNIX, stdsocket.SOCK_STREAM)
        try:
            await probe.connect(str(self.path))
        except ConnectionRefusedError:
            # Nobody listens: the file is left over from a daemon that crashed.
            log.warning("removing stale socket %s", self.path)
            self.path.unlink(missing_ok=True)
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            raise RpcServerError(f"cannot probe existing socket {self.path}: {exc.strerror}") from exc
        finally:
            probe.close()
        raise RpcServerError(f"{self.path}: another peerd is already running (it accepted a connection)")

    def _unlink_if_ours(self, inode: int) -> None:
        try:
            if os.lstat(self.path).st_ino == inode:
                self.path.unlink()
        except FileNotFoundError:
            pass
