"""When a node advertises: the sender's side of SPEC §7.2 (informative: a receiver applies only
an advert's MAX_TTL, §6). Pure, so that the daemon (peerd/adverts.py) and the simulator
(sim/world.py) advertise alike."""

from __future__ import annotations

from protocol.messages import Advert

#: Coalescing gap for change-triggered adverts: at 100 tasks/s the load changes constantly,
#: and one advert per change would flood gossip for no benefit.
MIN_GAP_S = 0.2
#: The lifetime of the advert a node publishes as it leaves: long enough to cross the network
#: (publish-to-all is tens of ms, docs/benchmarks.md), short enough that the peer leaves every
#: table seconds after.
FAREWELL_TTL_S = 5.0


def advert_lifetime_s(peers: int, *, ttl_s: float, network_rate: float) -> float:
    """How long a node's advert lives, with ``peers`` nodes (itself included) in its table.

    Each node refreshes once per a third of its lifetime, and every node receives every
    advert, so an idle network of N carries 3N / lifetime adverts per second and each idle
    daemon pays for all of them (docs/benchmarks.md, "Idle daemon"). Growing the lifetime to
    3N / ``network_rate`` holds that rate, from ``ttl_s`` in a small network up to an
    advert's MAX_TTL, beyond which the rate grows with N again. The price is staleness: a
    peer that crashes stays in tables for up to its lifetime (one that leaves on purpose
    says so). ``network_rate`` 0 keeps ``ttl_s``.
    """
    if network_rate <= 0:
        return ttl_s
    cap = Advert.MAX_TTL_MS / 1000
    return max(ttl_s, min(cap, 3.0 * max(1, peers) / network_rate))


def refresh_s(lifetime_s: float) -> float:
    """The longest a node stays silent: a third of the lifetime, so two lost refreshes in a
    row still do not expire it."""
    return lifetime_s / 3
