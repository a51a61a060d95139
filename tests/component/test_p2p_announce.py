"""``network.announce`` in peerd/p2p.py (docs/config.md): peers learn the announced addresses,
never the listen address. The emulated WAN (docs/devnet.md) relies on it: a daemon that leaked
its private listen port could be dialled around the link emulator."""

from __future__ import annotations

import os
import socket

import pytest
import trio
from libp2p.peer.id import ID

from peerd.p2p import P2PConfig, P2PNode
from protocol.errors import LocalProtocolError

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_malformed_announce_address_is_refused_at_construction() -> None:
    with pytest.raises(LocalProtocolError):
        P2PNode(os.urandom(32), P2PConfig(announce=("127.0.0.1:4001",)))


async def test_peers_learn_the_announced_address_and_not_the_listen_address() -> None:
    listen_port, public_port = _free_port(), _free_port()
    listen = f"/ip4/127.0.0.1/tcp/{listen_port}"
    public = f"/ip4/127.0.0.1/tcp/{public_port}"
    a = P2PNode(os.urandom(32), P2PConfig(listen=(listen,), announce=(public,)))
    b = P2PNode(os.urandom(32), P2PConfig())
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            assert a.listen_addrs() == [f"{public}/p2p/{a.peer_id}"]
            # b dials the real listen address (as a bootstrap line could), then learns a's
            # addresses from identify: only the announced one.
            await b.connect(f"{listen}/p2p/{a.peer_id}")
            host = b._host
            assert host is not None
            a_id = ID.from_base58(a.peer_id)

            def learned() -> set[str]:  # without the /p2p/<id> suffix the peer store adds
                return {str(x).split("/p2p/")[0] for x in b._known_addrs(a_id)}

            while public not in learned():
                await trio.sleep(0.05)
            # What b keeps for a beyond the address it dialled itself is the announced one.
            assert learned() - {listen} == {public}
            nursery.cancel_scope.cancel()
