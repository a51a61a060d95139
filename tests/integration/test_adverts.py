"""Signed capacity adverts between real daemons on 127.0.0.1 (issue 2 item 7 and "Tests").

Waits are bounded polls; durations are measured and printed (``pytest -s`` shows them),
never asserted, except the issue's own bound: 3 daemons see each other within 10 s.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import TestNet, wait_for

from peerd.rpc.client import RpcClientError
from protocol.cadence import FAREWELL_TTL_S

pytestmark = pytest.mark.slow

#: Issue 2: "3 daemons see each other's verified adverts within 10 s".
CONVERGENCE_CAP_S = 10.0
#: Drops honest daemons may count among themselves: when a peer joins, gossipsub's
#: IHAVE/IWANT recovery can hand it an advert older than one it already has (measured: 1-2
#: per join with a 1 s interval). Anything else between honest daemons is a bug.
BENIGN_DROPS = {"dropped.replayed", "dropped.duplicate"}


def bad_drops(counters: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counters.items() if k.startswith("dropped.") and k not in BENIGN_DROPS}


def tables(net: TestNet) -> dict[int, dict[str, dict[str, Any]]]:
    return {i: net.peers(i) for i in net.nodes()}


def everyone_sees_everyone(net: TestNet) -> dict[int, dict[str, dict[str, Any]]] | None:
    ids = set(net.ids().values())
    current = tables(net)
    return current if all(set(t) == ids for t in current.values()) else None


def converged(devnet: Any, *, ttl_s: float, interval_s: float) -> TestNet:
    """Three daemons with these advert settings, once every table lists all three."""
    net: TestNet = devnet(3, {"adverts": {"ttl_s": ttl_s, "interval_s": interval_s}})
    wait_for(
        lambda: everyone_sees_everyone(net),
        "all adverts everywhere",
        timeout=CONVERGENCE_CAP_S,
        interval=0.05,
    )
    return net


def listed(net: TestNet, nodes: tuple[int, ...], peer_id: str) -> list[dict[str, Any]]:
    """The entries ``nodes`` still list for ``peer_id``."""
    return [e for i in nodes if (e := net.peers(i).get(peer_id)) is not None]


def test_three_daemons_see_each_others_verified_adverts(devnet: Any) -> None:
    started = time.monotonic()
    net: TestNet = devnet(3)
    ready = time.monotonic()  # every daemon answers RPC (devnet.up waited for each)
    seen = wait_for(
        lambda: everyone_sees_everyone(net),
        "all 3 adverts in all 3 peer tables",
        timeout=CONVERGENCE_CAP_S,
        interval=0.05,
    )
    done = time.monotonic()
    print(
        f"\n[measure] 3 daemons: all adverts in all tables {done - ready:.2f} s after the last was ready "
        f"({done - started:.2f} s after the first was started)"
    )

    ids = net.ids()
    for i, table in seen.items():
        for j, peer_id in ids.items():
            entry = table[peer_id]
            assert entry["self"] is (i == j)
            assert entry["c0"] > 0, f"node {j} advertises no capacity"
            assert entry["cpu"]["cores"] >= 1
            assert entry["cpu"]["gflops"] > 0
            assert 0 < entry["memory"]["available_mb"] <= entry["memory"]["total_mb"]
            assert entry["offer"]["cores"] >= 1 and entry["offer"]["memory_mb"] > 0
            assert entry["load"] >= 0 and entry["capacity"] > 0
            assert entry["seq"] > 0 and entry["expires_at"] > entry["issued_at"]
            assert entry["expires_in_s"] > 0, "an expired advert is still listed"
            # The advert names where its signer listens, and that is really the signer.
            assert any(a.endswith(f"/p2p/{peer_id}") for a in entry["addrs"])
    infos = {i: net.info(i) for i in ids}
    for j, peer_id in ids.items():
        assert infos[j]["peer_id"] == peer_id
        own = infos[j]["advert"]
        assert own is not None and own["peer_id"] == peer_id and own["self"] is True
        for i in ids:
            assert seen[i][peer_id]["c0"] == own["c0"]  # C0 is calibrated once, at start
        # Honest daemons never send each other anything forged, malformed or absurd.
        assert not bad_drops(infos[j]["counters"])
        assert infos[j]["counters"].get("accepted.advert", 0) >= 2


def test_a_killed_daemon_leaves_the_tables_and_comes_back_with_its_peer_id(devnet: Any) -> None:
    ttl_s, interval_s = 4.0, 1.0
    net = converged(devnet, ttl_s=ttl_s, interval_s=interval_s)
    victim, others = 2, (0, 1)
    victim_id = net.peer_id(victim)
    seq_before = net.info(victim)["advert"]["seq"]

    killed_at = time.time()
    assert net.kill(victim) == -9
    # It could not clean up: its socket file is left behind (see test_daemon_lifecycle).
    assert net.socket(victim).exists()

    # Until it disappears, keep the latest expiry the others show for it: the entry must not
    # vanish before that (it is the advert's expiry, not a liveness guess, that removes it).
    latest_expiry = 0.0

    def gone_everywhere() -> bool:
        nonlocal latest_expiry
        entries = listed(net, others, victim_id)
        latest_expiry = max([latest_expiry, *(e["expires_at"] for e in entries)])
        return not entries

    wait_for(
        gone_everywhere,
        "the killed daemon to leave both peer tables",
        timeout=ttl_s + 3 * interval_s + 5,
        interval=0.05,
    )
    gone_at = time.time()
    print(
        f"\n[measure] SIGKILLed daemon left the tables {gone_at - killed_at:.2f} s after the kill "
        f"(advert ttl {ttl_s} s, interval {interval_s} s)"
    )
    assert latest_expiry > 0, "the entry was never seen after the kill"
    assert gone_at >= latest_expiry - 0.5, "the entry left before its advert expired"
    # The survivors still list each other.
    for i in others:
        assert set(net.peers(i)) == {net.peer_id(j) for j in others}

    # Restart on the same state dir: same identity, and the others take it back.
    net.start(victim)
    net.wait_ready(victim)
    info = net.info(victim)
    assert info["peer_id"] == victim_id
    restarted = time.monotonic()
    wait_for(
        lambda: everyone_sees_everyone(net),
        "the restarted daemon back in every table (and seeing all)",
        timeout=CONVERGENCE_CAP_S,
        interval=0.05,
        ignore=(RpcClientError,),
    )
    print(f"[measure] restarted daemon back in all tables {time.monotonic() - restarted:.2f} s after ready")
    # Its sequence survived the crash: its new adverts are above everything it signed before,
    # or the others' replay guards (which remember the old sequence) would drop them.
    assert net.peers(0)[victim_id]["seq"] > seq_before
    for i in net.nodes():
        assert not bad_drops(net.counters(i)), f"node {i}"


def test_a_daemon_stopped_on_purpose_says_so_and_leaves_the_tables_before_its_advert_expires(
    devnet: Any,
) -> None:
    """SPEC §7.2: on SIGTERM a daemon publishes a last advert, draining, that expires in
    FAREWELL_TTL_S. A crashed one stays listed until its advert expires (the test above), so
    leaving before that is only possible through the farewell."""
    ttl_s = 60.0
    net = converged(devnet, ttl_s=ttl_s, interval_s=1.0)
    victim, others = 2, (0, 1)
    victim_id = net.peer_id(victim)
    last_expiry = max(net.peers(i)[victim_id]["expires_at"] for i in others)
    assert last_expiry - time.time() > ttl_s / 2, "the victim's advert should still have most of its life"

    terminated_at = time.time()
    rc, took = net.terminate(victim)
    assert rc == 0
    seen_draining = False

    def gone_everywhere() -> bool:
        nonlocal seen_draining
        entries = listed(net, others, victim_id)
        for entry in entries:
            if entry["offer"]["draining"]:
                seen_draining = True
                assert entry["expires_in_s"] <= FAREWELL_TTL_S
        return not entries

    wait_for(
        gone_everywhere,
        "the stopped daemon to leave both peer tables",
        timeout=last_expiry - time.time() - 5,  # bounded, and before its last advert could expire
        interval=0.05,
    )
    gone_at = time.time()
    print(
        f"\n[measure] SIGTERM took {took:.2f} s; the daemon left both tables {gone_at - terminated_at:.2f} s "
        f"after it (listed as draining meanwhile: {seen_draining}; its advert had {ttl_s:g} s to live)"
    )
    assert gone_at < last_expiry, "it left only when its advert expired: no farewell"
    for i in others:
        assert net.counters(i).get("accepted.advert", 0) >= 2
        assert not bad_drops(net.counters(i)), f"node {i}"
    assert set(net.peers(0)) == {net.peer_id(j) for j in others}


def test_with_a_slow_refresh_peers_stay_listed_and_a_load_change_still_travels(devnet: Any) -> None:
    """Issue 10: advertise on change plus a slow refresh. The daemons look at their own state
    every second (before issue 10, one advert per look), refresh every 10 s, and adverts live
    30 s: over two refresh periods nobody leaves a table and each sends about one advert per
    refresh; a shard starting on one daemon still reaches the other's table as a change."""
    ttl_s, refresh_s, interval_s = 30.0, 10.0, 1.0
    net: TestNet = devnet(
        2,
        {
            "adverts": {"ttl_s": ttl_s, "refresh_s": refresh_s, "interval_s": interval_s},
            "offer": {"accept_kinds": ["echo", "sleep"]},
        },
    )
    wait_for(lambda: everyone_sees_everyone(net), "both adverts in both tables", timeout=CONVERGENCE_CAP_S)
    ids = set(net.ids().values())
    before = {i: net.counters(i) for i in net.nodes()}
    started = time.monotonic()
    polls = 0
    while time.monotonic() - started < 2 * refresh_s:  # bounded: two refresh periods
        for i in net.nodes():
            assert set(net.peers(i)) == ids, f"node {i} lost a live peer between refreshes"
        polls += 1
        time.sleep(0.5)
    window = time.monotonic() - started
    for i in net.nodes():
        after = net.counters(i)
        sent = after.get("adverts.published", 0) - before[i].get("adverts.published", 0)
        refreshes = after.get("adverts.refresh", 0) - before[i].get("adverts.refresh", 0)
        print(f"\n[measure] node {i}: {sent} adverts in {window:.1f} s ({polls} polls)")
        assert refreshes >= 1, f"node {i} never refreshed in {window:.0f} s"
        # One per refresh, plus room for a change on this shared machine (memory); one per
        # interval_s, the old cadence, would be ~20.
        assert sent <= window / refresh_s + 2, f"node {i} sent {sent} adverts in {window:.0f} s"

    spec = {"kind": "sleep", "params": {"seconds": 60}, "deadline_s": 300}
    task_id = str(net.rpc(0, "task.submit", {"spec": spec})["task_id"])

    def runner() -> str | None:
        shards = net.rpc(0, "task.get", {"task_id": task_id})["shards"]
        return str(shards[0]["peer_id"]) if shards and shards[0]["state"] == "running" else None

    busy_id = wait_for(runner, "the sleep shard running", timeout=30)
    busy_node = {v: k for k, v in net.ids().items()}[busy_id]
    other = 1 - busy_node
    wait_for(
        lambda: net.peers(other)[busy_id]["offer"]["busy"] >= 1,
        "the other daemon seeing the runner busy",
        timeout=30,
    )
    # It travelled as a change, not by a refresh's luck.
    assert net.counters(busy_node).get("adverts.changed", 0) >= 1
    assert net.peers(other)[busy_id]["load"] > 0
    net.rpc(0, "task.cancel", {"task_id": task_id})
