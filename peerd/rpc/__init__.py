"""peerd's local JSON-RPC API: the method contract (this module), messages (:mod:`.jsonrpc`),
the trio server (:mod:`.server`) and the blocking client (:mod:`.client`).

:data:`CONTRACT` is the machine-readable side of docs/rpc.md: each method's permission,
params schema and whether it streams notifications. The daemon binds its handlers to it with
``MethodTable.from_contract``; peerctl's request builders are tested against it, so the CLI,
the docs and the daemon cannot drift apart silently.

This package's ``__init__`` must stay free of trio: peerctl imports ``peerd.rpc.client``,
which runs this file first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from peerd.rpc.jsonrpc import (
    NO_PARAMS,
    Field,
    Params,
    chunk_length,
    multiaddr,
    non_empty_id,
    non_negative,
    sha256_hex,
)

Permission = Literal["read", "write"]


@dataclass(frozen=True, slots=True)
class MethodSpec:
    name: str
    permission: Permission
    params: Params
    #: Streaming methods reply first, then push notifications until a ``*.end`` notification;
    #: the server cancels them when the client hangs up (docs/rpc.md, "Streams").
    streaming: bool = False


_TASK_ID = Params((Field("task_id", str, check=non_empty_id),))


def _peer_id(value: str) -> str | None:
    # The wire shape of a peer ID (SPEC §4); re is enough, no protocol import needed here.
    ok = re.fullmatch(r"12D3KooW[1-9A-HJ-NP-Za-km-z]{44}", value)
    return None if ok else "expected a peer ID (12D3KooW…)"


def _reason(value: str) -> str | None:
    return None if len(value) <= 256 else "at most 256 characters"


#: ``peer.ban`` / ``peer.unban`` (docs/rpc.md): whose bids this node refuses as a submitter.
_PEER_BAN = Params(
    (
        Field("peer_id", str, check=_peer_id),
        Field("reason", str, required=False, check=_reason, doc="shown by peerctl peers"),
    )
)
_PEER_UNBAN = Params((Field("peer_id", str, check=_peer_id),))

#: ``peers.list`` pages (docs/rpc.md): peers sorted by ID, ``limit`` per page (default and
#: maximum below), the next page starting after the previous page's ``next``. A full table
#: (``network.max_peers``, 1024 by default) fits one maximal page, ~0.7 MB.
PEERS_PAGE_DEFAULT = 256
PEERS_PAGE_MAX = 1024


def _page_limit(value: int) -> str | None:
    return None if 1 <= value <= PEERS_PAGE_MAX else f"must be between 1 and {PEERS_PAGE_MAX}"


_PEERS_PAGE = Params(
    (
        Field("limit", int, required=False, check=_page_limit, doc="peers per page"),
        Field("after", str, required=False, check=non_empty_id, doc="the previous page's next"),
    )
)

CONTRACT: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec("node.info", "read", NO_PARAMS),
        MethodSpec("peers.list", "read", _PEERS_PAGE),
        MethodSpec("network.connect", "write", Params((Field("addr", str, check=multiaddr),))),
        MethodSpec("task.submit", "write", Params((Field("spec", dict),))),
        MethodSpec("task.list", "read", NO_PARAMS),
        MethodSpec("task.get", "read", _TASK_ID),
        MethodSpec("task.watch", "read", _TASK_ID, streaming=True),
        MethodSpec("task.cancel", "write", _TASK_ID),
        MethodSpec("task.explain", "read", _TASK_ID),
        MethodSpec("task.bundle", "read", _TASK_ID),
        MethodSpec("peer.ban", "write", _PEER_BAN),
        MethodSpec("peer.unban", "write", _PEER_UNBAN),
        MethodSpec(
            "blob.read",
            "read",
            Params(
                (
                    Field("sha256", str, check=sha256_hex),
                    Field("offset", int, check=non_negative),
                    Field("length", int, check=chunk_length),
                )
            ),
        ),
    )
}

#: Notifications the server pushes on a ``task.watch`` connection.
NOTIFICATIONS = ("task.event", "task.end")

#: Terminal task states: ``task.watch`` sends ``task.end`` once a task reaches one of them.
TERMINAL_STATES = frozenset({"done", "failed", "cancelled"})

__all__ = [
    "CONTRACT",
    "NOTIFICATIONS",
    "PEERS_PAGE_DEFAULT",
    "PEERS_PAGE_MAX",
    "TERMINAL_STATES",
    "MethodSpec",
    "Permission",
]
