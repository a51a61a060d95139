"""``peerd``: the daemon's entry point and its root nursery.

Start order matters (py-libp2p trap 5: pubsub before any dial): config → identity →
store → sandbox probe and worker pool → the roles, each in its own nursery (committee,
contractor, submitter, then the task bus, which subscribes to the task topic) → libp2p
node (listening, pubsub, DHT; then it dials the bootstrap peers) → adverts (first advert
published) → RPC socket → ``READY=1``. SIGTERM/SIGINT cancel the root nursery: ``STOPPING=1``, every service
unwinds, the RPC socket is removed, the libp2p host is closed explicitly.
"""

from __future__ import annotations

import os

# One BLAS thread in the daemon, set before numpy loads: the calibration then measures a
# core, not how well OpenBLAS's spinning threads cope with the machine's other load (on
# a busy 2-core host, two threads measured 2 GFLOP/s where one core gives 60+). The
# daemon's only other numpy work is aggregation, which is memory-bound anyway.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import importlib.util
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click
import trio

from peerd import __version__, kinds, sdnotify
from peerd.adverts import AdvertService, Offer, measure_capacity
from peerd.api import Api
from peerd.blobgc import BlobCollector
from peerd.blobs import BlobStore
from peerd.config import Config, ConfigError, load_config, prepare_socket_dir
from peerd.contractor import Contractor
from peerd.counters import Counters
from peerd.identity import IdentityError, load_or_create_identity
from peerd.inbox import Inbox, wall_ms
from peerd.node import BID_PROTOCOL, MAX_GOSSIP_BYTES, RESULT_PROTOCOL, Node
from peerd.peertable import PeerTable
from peerd.rounds import Rounds
from peerd.seqstore import SequenceStore
from peerd.store import Store
from peerd.submitter import Submitter
from peerd.taskbook import TaskBook
from peerd.taskbus import TaskBus
from protocol.envelope import Signer

log = logging.getLogger("peerd")


def make_offer(cfg: Config, gpus_found: list[int]) -> Offer:
    gpus = tuple(g for g in (cfg.offer.gpus if cfg.offer.gpus is not None else gpus_found) if g in gpus_found)
    dc_max = None if cfg.market.dc_max == float("inf") else cfg.market.dc_max
    return Offer(
        cores=cfg.offer.cores,
        gpus=gpus,
        memory_mb=cfg.offer.memory_mb,
        kinds=tuple(cfg.offer.accept_kinds),
        draining=cfg.offer.draining,
        k=cfg.market.k,
        dc_min=cfg.market.dc_min,
        dc_max=dc_max,
    )


def _jax_cache(cfg: Config, state: Path) -> tuple[Path, int] | None:
    """The persistent XLA compilation cache of this node's keras workers on JAX
    (``[offer] jax_cache_mb``): ``<state_dir>/jax-cache``, readable by the daemon's user alone."""
    if cfg.offer.keras_backend != "jax" or cfg.offer.jax_cache_mb <= 0:
        return None
    if importlib.util.find_spec("filelock") is None:
        # JAX bounds the cache only with filelock (the [jax] extra installs it); unbounded,
        # it would grow with every model ever trained here.
        log.warning("no JAX compilation cache: the filelock package is missing (pip install 'peerd[jax]')")
        return None
    path = state / "jax-cache"
    path.mkdir(mode=0o700, exist_ok=True)
    return path, cfg.offer.jax_cache_mb << 20


#: How long a daemon asked to stop spends saying goodbye (its farewell advert, SPEC §7.2)
#: before it cancels everything; a second signal stops it at once.
LEAVE_GRACE_S = 2.0


async def serve(
    cfg: Config, *, leave: trio.Event | None = None, task_status: Any = trio.TASK_STATUS_IGNORED
) -> None:
    """Run one daemon until cancelled, or until ``leave`` is set: then it publishes its
    farewell advert (at most ``LEAVE_GRACE_S``) and returns."""
    from peerd import blobxfer
    from peerd.executor import WorkerPool
    from peerd.p2p import P2PConfig, P2PNode
    from peerd.rpc.server import MethodTable, RpcServer

    started_at = time.monotonic()
    state = cfg.node.state_dir
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = load_or_create_identity(state)
    signer = Signer(identity.seed)
    counters = Counters()
    store = Store(state / "peerd.sqlite")
    blobs = BlobStore(state / "blobs", max_blob_bytes=cfg.policy.max_blob_mb << 20)
    seq = SequenceStore(state / "sequence")
    capacity = await trio.to_thread.run_sync(
        lambda: measure_capacity(
            cfg.offer.cores, calibrate=cfg.adverts.calibrate, seconds=cfg.adverts.calibration_s
        )
    )
    offer = make_offer(cfg, [g.index for g in capacity.gpus])
    devices = [f"gpu:{g}" for g in offer.gpus] or ["cpu"]
    # Keep a TensorFlow ("tf") worker warm only where a kind needing one is offered (~500 MB).
    classes = {kinds.get(k).worker_class for k in cfg.offer.accept_kinds}
    pool = WorkerPool(
        state / "work",
        devices=devices,
        require_sandbox=cfg.policy.require_sandbox,
        warm_classes=("light", "tf") if "tf" in classes else ("light",),
        hide=(state,),
        # Keras 3 reads its backend at import, in the worker (docs/config.md [offer] keras_backend).
        env={"KERAS_BACKEND": cfg.offer.keras_backend},
        jax_cache=_jax_cache(cfg, state),
    )
    p2p = P2PNode(
        identity.seed,
        P2PConfig(
            listen=tuple(cfg.network.listen),
            bootstrap=tuple(cfg.network.bootstrap),
            announce=tuple(cfg.network.announce),
            relays=tuple(cfg.network.relays),
            relay_service=cfg.network.relay_service,
            mdns=cfg.network.mdns,
            max_msgs_per_origin_per_s=cfg.network.max_msgs_per_origin_per_s,
            max_gossip_bytes=MAX_GOSSIP_BYTES,
        ),
    )
    try:
        async with trio.open_nursery() as nursery:
            inbox = Inbox(counters)
            table = PeerTable(
                max_peers=cfg.network.max_peers, connected=p2p.connected_peers, counters=counters
            )
            # A peer libp2p has no address for (one behind a NAT, reached through a relay,
            # design.md §10.7) is dialled at the addresses its signed advert lists.
            p2p.set_address_book(
                lambda peer: entry.advert.addrs if (entry := table.get(peer, wall_ms())) else ()
            )

            def advert_load() -> tuple[float, int, int]:
                # Called only once the advert service runs, after ``node`` below exists.
                return node.load(), pool.slots(), round(node.load() * pool.slots())

            adverts = AdvertService(
                p2p=p2p,
                signer=signer,
                seq=seq,
                inbox=inbox,
                table=table,
                counters=counters,
                offer=lambda: offer,
                capacity=capacity,
                load=advert_load,
                interval_s=cfg.adverts.interval_s,
                ttl_s=cfg.adverts.ttl_s,
                refresh_s=cfg.adverts.refresh_s,
                network_rate=cfg.adverts.network_rate,
            )
            pool.on_change(adverts.poke)
            node = Node(
                config=cfg,
                signer=signer,
                seq=seq,
                counters=counters,
                inbox=inbox,
                store=store,
                blobs=blobs,
                p2p=p2p,
                pool=pool,
                table=table,
                c0=capacity.c0(offer),
                poke_advert=adverts.poke,
            )
            book = TaskBook(signer.peer_id, counters)
            rounds = Rounds(node)
            submitter = Submitter(node, book)
            contractor = Contractor(node, book, rounds, submitter)
            bus = TaskBus(node, book, contractor, submitter, rounds)
            # Each role is told what the others publish or certify (our own gossip never
            # reaches our own task bus): certificates to the submitter's machines, our own
            # announces, awards and cancels to our own contractor, and the commits that reach
            # the submitter on a result stream to the committee.
            rounds.on_certified.append(submitter.on_certificate)
            submitter.on_result.append(rounds.on_result)
            submitter.on_published.append(contractor.on_published)

            # Bounded concurrent uploads: a busy peer answers "busy" and the fetcher retries.
            uploads = trio.CapacityLimiter(8)

            async def serve_blob(stream: Any) -> None:
                await blobxfer.serve_blob(
                    stream, blobs, max_bytes=cfg.policy.max_blob_mb << 20, limiter=uploads
                )

            p2p.add_stream_handler(blobxfer.PROTOCOL_ID, serve_blob)
            p2p.add_stream_handler(BID_PROTOCOL, submitter.handle_bid_stream)
            p2p.add_stream_handler(RESULT_PROTOCOL, submitter.handle_result_stream)

            # The roles own their tasks: each runs in a nursery of its own, started before
            # the first message can reach it (the task bus subscribes before p2p runs). A
            # role spawns only into scopes already open: the committee's rounds, the
            # contractor's machines (our own submitter hands them our announces), the task bus.
            for role in (rounds, contractor, submitter, bus):
                await nursery.start(role.run)
            await nursery.start(pool.run)
            await nursery.start(p2p.run)
            await nursery.start(adverts.run)
            api = Api(node, book, submitter, adverts, started_at)
            rpc = RpcServer(
                cfg.node.socket,
                MethodTable.from_contract(api.handlers()),
                group=cfg.node.socket_group,
                allowed_uids=cfg.rpc.allowed_uids,
            )
            await nursery.start(rpc.run)
            if cfg.metrics.listen is not None:
                from peerd.metrics import MetricsService

                await nursery.start(MetricsService(cfg.metrics.listen, node).run)
            submitter.resume()
            contractor.redeliver_pending()
            # After resume: the views of our unfinished tasks are back in the book.
            collector = BlobCollector(
                store, book, blobs, counters, budget_bytes=cfg.limits.blob_store_mb << 20
            )
            await nursery.start(collector.run)
            nursery.start_soon(sdnotify.watchdog_loop)
            log.info(
                "peerd %s ready: peer %s on %s", __version__, signer.peer_id, ", ".join(p2p.listen_addrs())
            )
            sdnotify.ready()
            sdnotify.status(f"serving as {signer.peer_id}")
            task_status.started(node)
            if leave is not None:
                await leave.wait()
                with trio.move_on_after(LEAVE_GRACE_S):
                    try:
                        await adverts.leave()
                    except Exception as exc:  # best effort: a daemon that cannot say goodbye still stops
                        log.warning("farewell advert failed: %r", exc)
                nursery.cancel_scope.cancel()
    finally:
        store.close()


async def _main(cfg: Config) -> None:
    leave = trio.Event()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def daemon() -> None:
                await serve(cfg, leave=leave)
                nursery.cancel_scope.cancel()  # it said goodbye: stop waiting for signals

            nursery.start_soon(daemon)
            async for sig in signals:
                if leave.is_set():
                    log.info("received %s again; stopping now", signal.Signals(sig).name)
                    nursery.cancel_scope.cancel()
                    break
                log.info("received %s; shutting down", signal.Signals(sig).name)
                sdnotify.stopping()
                leave.set()
                # serve() bounds its farewell; this bounds everything else before it.
                nursery.cancel_scope.deadline = trio.current_time() + LEAVE_GRACE_S + 1.0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML config file (default /etc/peerd/peerd.toml when it exists).",
)
@click.option("--log-level", default=None, help="Override node.log_level (debug, info, warning, error).")
@click.version_option(__version__, prog_name="peerd")
def main(config_path: Path | None, log_level: str | None) -> None:
    """Run the peerd compute-sharing daemon."""
    try:
        cfg = load_config(config_path)
        # Where the socket will live is decided here, before anything starts: a directory
        # another user controls is a config error (peerd/rpc/rundir.py, docs/config.md).
        prepare_socket_dir(cfg)
    except ConfigError as exc:
        click.echo(f"peerd: configuration error: {exc}", err=True)
        sys.exit(2)
    level = (log_level or cfg.node.log_level).upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from peerd.metrics import MetricsError
    from peerd.rpc.server import RpcServerError

    try:
        trio.run(_main, cfg)
    except BaseExceptionGroup as group:
        # Nurseries wrap errors in groups (trio's strict_exception_groups): unwrap the ones
        # that are an operator's to fix and say them in one line.
        fatal = group.subgroup(lambda e: isinstance(e, IdentityError | RpcServerError | MetricsError))
        if fatal is None:
            raise
        while isinstance(fatal, BaseExceptionGroup):
            fatal = fatal.exceptions[0]
        click.echo(f"peerd: {fatal}", err=True)
        sys.exit(1)
    except (IdentityError, RpcServerError, MetricsError) as exc:
        click.echo(f"peerd: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        pass
    log.info("peerd stopped")


if __name__ == "__main__":
    main()
