"""Error types of the protocol layer.

As in h11 (``h11/_util.py``), errors are split by *who* is at fault:

* :class:`LocalProtocolError` — our own code misused the API (e.g. tried to encode an
  invalid message). A bug on our side.
* :class:`RemoteProtocolError` — a peer sent something invalid: forged, replayed,
  oversized, malformed, absurd. The daemon drops the message and counts ``reason``.

Every parser in this package guarantees that only :class:`ProtocolError` escapes it,
whatever bytes it is fed (tests/unit/test_fuzz_*.py states and checks that invariant).
"""

from __future__ import annotations


class ProtocolError(Exception):
    """Base class. ``reason`` is a short machine-readable tag used for drop counters."""

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class LocalProtocolError(ProtocolError):
    """We misused the protocol API."""


class RemoteProtocolError(ProtocolError):
    """A peer sent something we must drop."""


class TransportError(RemoteProtocolError):
    """The network failed us: peer unreachable, stream reset, connection closed.

    ``peerd.p2p`` maps every libp2p exception to this class, in one place.
    """
