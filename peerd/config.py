"""peerd's configuration: one TOML file, validated once at start, then frozen.

Every problem names its key (``market.bid_window_ms: expected a positive integer, got "x"``) or,
for broken TOML, the line; all problems are reported together so one edit fixes them all.
``peerd`` turns :class:`ConfigError` into exit code 2. docs/config.md documents every key and
examples/peerd.toml shows them all.

Directories follow systemd first ($STATE_DIRECTORY / $RUNTIME_DIRECTORY, set by the unit's
StateDirectory= / RuntimeDirectory=), then the FHS for root, then XDG for everyone else, so a
plain ``peerd`` works with no file at all.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from peerd.kinds import KINDS
from protocol.errors import ProtocolError
from protocol.messages import Advert
from protocol.peerid import public_key_from_peer_id
from protocol.trust import TrustPolicy

DEFAULT_CONFIG_PATH = Path("/etc/peerd/peerd.toml")
#: Every kind of the registry (peerd/kinds.py), in its order: offer.accept_kinds' default.
KNOWN_TASK_KINDS = tuple(KINDS)
#: Keras 3 backends a worker may run (docs/config.md [offer] keras_backend).
KERAS_BACKENDS = ("tensorflow", "jax")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
# sockaddr_un.sun_path is 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH = 107

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "KNOWN_TASK_KINDS",
    "AdvertsConfig",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "MarketConfig",
    "MetricsConfig",
    "NetworkConfig",
    "NodeConfig",
    "OfferConfig",
    "PolicyConfig",
    "RpcConfig",
    "default_dirs",
    "default_socket_path",
    "load_config",
    "prepare_socket_dir",
]


class ConfigError(Exception):
    """The configuration cannot be used. ``problems`` lists every finding, each naming its key."""

    def __init__(self, problems: list[str], *, source: Path | None = None) -> None:
        self.problems = problems
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(where + ("\n" + where).join(problems))


@dataclass(frozen=True)
class NodeConfig:
    state_dir: Path
    runtime_dir: Path
    socket: Path
    socket_group: str | None = None
    log_level: str = "info"


@dataclass(frozen=True)
class NetworkConfig:
    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/4001",)
    bootstrap: tuple[str, ...] = ()
    #: Addresses peers learn instead of ``listen`` (docs/config.md); empty: ``listen``.
    announce: tuple[str, ...] = ()
    mdns: bool = False
    max_msgs_per_origin_per_s: float = 200.0
    #: Circuit relay v2 (docs/design.md §10.7): relays this node, behind a NAT, is reached
    #: through; and whether it serves as a relay for others.
    relays: tuple[str, ...] = ()
    relay_service: bool = False
    #: Peer table size, this node not counted (peerd/peertable.py has the eviction rule).
    max_peers: int = 1024


@dataclass(frozen=True)
class AdvertsConfig:
    #: How often the daemon looks at its own state (memory, GPUs) for a change worth an
    #: advert; load and offer changes are advertised at once anyway (peerd/adverts.py).
    interval_s: float = 5.0
    ttl_s: float = 60.0
    #: The longest the daemon stays silent; None: a third of the advert's lifetime (issue 10).
    refresh_s: float | None = None
    #: Refresh adverts per second the whole network should carry when idle: the lifetime grows
    #: with the peer table to keep to it, from ``ttl_s`` up to an advert's MAX_TTL (issue 10,
    #: protocol/cadence.py advert_lifetime_s). 0: the lifetime stays ``ttl_s``.
    network_rate: float = 0.5
    calibrate: bool = True
    calibration_s: float = 0.5


@dataclass(frozen=True)
class OfferConfig:
    cores: int
    memory_mb: int
    #: None means every GPU the probe finds (NVML lives in peerd.adverts, not here).
    gpus: tuple[int, ...] | None = None
    accept_kinds: tuple[str, ...] = KNOWN_TASK_KINDS
    draining: bool = False
    #: Keras 3's backend in this peer's workers: "tensorflow" or "jax" (the ``[jax]`` extra).
    #: Weights are plain arrays, so peers of either backend train the same rounds (docs/config.md).
    keras_backend: str = "tensorflow"
    #: With Keras on JAX: the bound of the node's persistent XLA compilation cache, shared by
    #: its keras workers (0: none). docs/config.md.
    jax_cache_mb: int = 256


@dataclass(frozen=True)
class MarketConfig:
    bid_window_ms: int = 300
    k: float = 0.2
    dc_min: float = 0.0
    dc_max: float = math.inf
    lease_ttl_s: float = 10.0
    heartbeat_s: float = 2.0
    t_max: float = math.inf
    #: How many times a shard may move to another peer after failing (``ok = false``, a lost
    #: lease, an overdue holder, a refused result) before the task fails (docs/tasks.md).
    retries: int = 2
    #: A shard held past this multiple of its expected time gets a backup holder (0: never;
    #: protocol/SPEC.md §7.6, docs/tasks.md).
    backup_after: float = 2.5
    #: ... but a holder always gets min(backup_min_s, deadline / (1 + backup_after)) (W is only
    #: the submitter's estimate).
    backup_min_s: float = 60.0


@dataclass(frozen=True)
class PolicyConfig:
    trusted_submitters: tuple[str, ...] = ()
    require_sandbox: bool = True
    max_blob_mb: int = 512
    # Trust (docs/allocation.md "Caps", protocol/trust.py): what a submitter believes of a bid.
    #: New peers' claims are capped (false: believed, for a network of one's own machines).
    probation: bool = True
    #: Most of a task's demand that peers without history may cover together.
    probation_share: float = 0.25
    #: At most this (GFLOP/s) for a new peer's C while no peer has history, under the
    #: task's middle claim (1e6: no bound beyond that).
    probation_floor: float = 1e6
    #: A peer whose trust score falls below this has its bids refused; 0 never bans.
    ban_threshold: float = 0.2
    #: Hours in which a peer's record (done, failed, timed out) halves.
    decay_half_life_h: float = 168.0
    #: Shards shorter than this (seconds) count as done without measuring a capacity.
    min_measure_s: float = 10.0

    def trust_policy(self) -> TrustPolicy:
        return TrustPolicy(
            probation=self.probation,
            probation_share=self.probation_share,
            probation_floor=self.probation_floor,
            ban_threshold=self.ban_threshold,
            half_life_ms=max(1, round(self.decay_half_life_h * 3_600_000)),
            min_measure_ms=round(self.min_measure_s * 1000),
        )


@dataclass(frozen=True)
class LimitsConfig:
    memory_mb: int = 2048
    cpu_seconds: int = 600
    wall_seconds: int = 900
    max_processes: int = 64
    max_output_mb: int = 64
    #: Budget of the blob store (state_dir/blobs), MiB: above it the collector frees the blobs
    #: of the oldest finished tasks (peerd/blobgc.py).
    blob_store_mb: int = 10240


@dataclass(frozen=True)
class RpcConfig:
    allowed_uids: tuple[int, ...] = ()


@dataclass(frozen=True)
class MetricsConfig:
    #: "host:port" of the Prometheus endpoint (``GET /metrics``, peerd/metrics.py); None: off.
    listen: str | None = None


@dataclass(frozen=True)
class Config:
    node: NodeConfig
    network: NetworkConfig
    adverts: AdvertsConfig
    offer: OfferConfig
    market: MarketConfig
    policy: PolicyConfig
    limits: LimitsConfig
    rpc: RpcConfig
    metrics: MetricsConfig = MetricsConfig()
    #: The file it came from, or None when every value is a default.
    source: Path | None = None


# --- defaults that depend on the machine --------------------------------------------------------


def default_dirs(env: Mapping[str, str] = os.environ, uid: int | None = None) -> tuple[Path, Path]:
    """(state_dir, runtime_dir) when the config file does not set them."""
    uid = os.geteuid() if uid is None else uid

    def first(var: str) -> Path | None:
        # systemd joins several directories with ':' when the unit lists more than one.
        value = env.get(var, "").split(":")[0]
        return Path(value) if value else None

    state, runtime = first("STATE_DIRECTORY"), first("RUNTIME_DIRECTORY")
    if state is None:
        if uid == 0:
            state = Path("/var/lib/peerd")
        elif env.get("XDG_STATE_HOME"):
            state = Path(env["XDG_STATE_HOME"]) / "peerd"
        else:
            state = Path(env.get("HOME") or Path.home()) / ".local/state/peerd"
    if runtime is None:
        if uid == 0:
            runtime = Path("/run/peerd")
        elif env.get("XDG_RUNTIME_DIR"):
            runtime = Path(env["XDG_RUNTIME_DIR"]) / "peerd"
        else:
            runtime = Path(f"/tmp/peerd-{uid}")
    return state, runtime


def default_socket_path(env: Mapping[str, str] = os.environ, uid: int | None = None) -> Path:
    return default_dirs(env, uid)[1] / "peerd.sock"


def _total_memory_mb() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20)
    except (ValueError, OSError):
        return 1024


def _cpu_count() -> int:
    # The affinity mask, not the machine's core count: under a cgroup/taskset that is what we can use.
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --- validation helpers -------------------------------------------------------------------------

T = TypeVar("T")


class _Invalid(Exception):
    """One value failed validation; the message does not yet carry the key.

    ``where`` locates the bad element inside the value (``[2]`` for the third array item).
    """

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.where = where


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _expect(what: str, value: Any) -> _Invalid:
    return _Invalid(f"expected {what}, got {_show(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, int | float)) and not isinstance(value, bool)


def positive_int(value: Any) -> int:
    if not _is_int(value) or value <= 0:
        raise _expect("a positive integer", value)
    return int(value)


def non_negative_int(value: Any) -> int:
    if not _is_int(value) or value < 0:
        raise _expect("a non-negative integer", value)
    return int(value)


def positive_float(value: Any) -> float:
    if not _is_number(value) or not value > 0 or math.isnan(value) or math.isinf(value):
        raise _expect("a positive finite number", value)
    return float(value)


def positive_float_or_inf(value: Any) -> float:
    if not _is_number(value) or math.isnan(value) or not value > 0:
        raise _expect("a positive number (or inf)", value)
    return float(value)


def finite_float(value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise _expect("a finite number", value)
    return float(value)


def non_negative_float(value: Any) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise _expect("a non-negative finite number", value)
    return float(value)


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _expect("true or false", value)
    return value


def string(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _expect("a non-empty string", value)
    return value


def list_of(item: Callable[[Any], T]) -> Callable[[Any], tuple[T, ...]]:
    def parse(value: Any) -> tuple[T, ...]:
        if not isinstance(value, list):
            raise _expect("an array", value)
        out = []
        for i, v in enumerate(value):
            try:
                out.append(item(v))
            except _Invalid as exc:
                raise _Invalid(str(exc), where=f"[{i}]{exc.where}") from None
        return tuple(out)

    return parse


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if not isinstance(value, str) or value.lower() not in choices:
            raise _expect("one of " + ", ".join(f'"{c}"' for c in choices), value)
        return value.lower()

    return parse


def multiaddr(value: Any) -> str:
    # A light check only: the libp2p layer parses multiaddrs; we catch obvious typos early.
    if not isinstance(value, str) or not value.startswith("/") or "//" in value:
        raise _expect('a multiaddr such as "/ip4/0.0.0.0/tcp/4001"', value)
    return value


def bootstrap_addr(value: Any) -> str:
    addr = multiaddr(value)
    _, sep, peer = addr.rpartition("/p2p/")
    if not sep or not peer or "/" in peer:
        raise _expect('a multiaddr ending in "/p2p/<peer id>"', value)
    return addr


def peer_id(value: Any) -> str:
    if not isinstance(value, str):
        raise _expect('a peer ID such as "12D3KooW..."', value)
    try:
        public_key_from_peer_id(value)
    except ProtocolError:
        raise _expect('an Ed25519 peer ID such as "12D3KooW..."', value) from None
    return value


class _Section:
    """Reads one table, remembering which keys were used so leftovers can be reported."""

    def __init__(self, name: str, table: Any, problems: list[str]) -> None:
        self.name = name
        self.problems = problems
        if table is None:
            table = {}
        if not isinstance(table, dict):
            problems.append(f"{name}: expected a table, got {_show(table)}")
            table = {}
        self.table: dict[str, Any] = table
        self.used: set[str] = set()

    def get(self, key: str, parse: Callable[[Any], T], default: T) -> T:
        self.used.add(key)
        if key not in self.table:
            return default
        try:
            return parse(self.table[key])
        except _Invalid as exc:
            self.problems.append(f"{self.name}.{key}{exc.where}: {exc}")
            return default

    def has(self, key: str) -> bool:
        return key in self.table

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.name}.{key}: {message}")

    def finish(self) -> None:
        for key in sorted(set(self.table) - self.used):
            self.problems.append(f"{self.name}.{key}: unknown key{_suggest(key, self.used)}")


def _suggest(word: str, candidates: set[str] | list[str]) -> str:
    close = difflib.get_close_matches(word, sorted(candidates), n=1)
    return f' (did you mean "{close[0]}"?)' if close else ""


# --- the loader ---------------------------------------------------------------------------------


def load_config(path: Path | None, *, env: Mapping[str, str] = os.environ, uid: int | None = None) -> Config:
    """Load and validate ``path``; None means /etc/peerd/peerd.toml if it exists, else all defaults.

    ``uid`` overrides the effective uid used to pick default directories (for tests).
    """
    source: Path | None = None
    raw: dict[str, Any] = {}
    if path is None and DEFAULT_CONFIG_PATH.exists():
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        source = Path(path)
        try:
            with open(source, "rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            # tomllib's message ends with "(at line N, column M)".
            raise ConfigError([f"invalid TOML: {exc}"], source=source) from None
        except OSError as exc:
            raise ConfigError([f"cannot read config file: {exc.strerror or exc}"], source=source) from None
    return _build(raw, source=source, env=env, uid=uid)


def _build(raw: dict[str, Any], *, source: Path | None, env: Mapping[str, str], uid: int | None) -> Config:
    problems: list[str] = []
    base = source.parent if source is not None else Path.cwd()

    def path_value(value: Any) -> Path:
        # Relative paths are relative to the config file, not to wherever peerd was started.
        p = Path(os.path.expanduser(string(value)))
        return p if p.is_absolute() else base / p

    sections = {name: _Section(name, raw.get(name), problems) for name in _SECTION_NAMES}
    for name in sorted(set(raw) - set(_SECTION_NAMES)):
        problems.append(f"{name}: unknown section{_suggest(name, list(_SECTION_NAMES))}")

    state_default, runtime_default = default_dirs(env, uid)
    s = sections["node"]
    runtime_dir = s.get("runtime_dir", path_value, runtime_default)
    node = NodeConfig(
        state_dir=s.get("state_dir", path_value, state_default),
        runtime_dir=runtime_dir,
        socket=s.get("socket", path_value, runtime_dir / "peerd.sock"),
        socket_group=s.get("socket_group", string, None),
        log_level=s.get("log_level", one_of(*LOG_LEVELS), "info"),
    )
    if len(os.fsencode(node.socket)) > MAX_SOCKET_PATH:
        s.problem("socket", f"path is longer than {MAX_SOCKET_PATH} bytes, the limit for a Unix socket")

    s = sections["network"]
    network = NetworkConfig(
        listen=s.get("listen", list_of(multiaddr), NetworkConfig.listen),
        bootstrap=s.get("bootstrap", list_of(bootstrap_addr), ()),
        announce=s.get("announce", list_of(multiaddr), ()),
        mdns=s.get("mdns", boolean, False),
        max_msgs_per_origin_per_s=s.get("max_msgs_per_origin_per_s", positive_float, 200.0),
        max_peers=s.get("max_peers", positive_int, NetworkConfig.max_peers),
        relays=s.get("relays", list_of(bootstrap_addr), ()),
        relay_service=s.get("relay_service", boolean, False),
    )

    s = sections["adverts"]
    adverts = AdvertsConfig(
        interval_s=s.get("interval_s", positive_float, AdvertsConfig.interval_s),
        ttl_s=s.get("ttl_s", positive_float, AdvertsConfig.ttl_s),
        refresh_s=s.get("refresh_s", positive_float, None),
        network_rate=s.get("network_rate", non_negative_float, AdvertsConfig.network_rate),
        calibrate=s.get("calibrate", boolean, True),
        calibration_s=s.get("calibration_s", positive_float, AdvertsConfig.calibration_s),
    )
    if adverts.ttl_s <= adverts.interval_s:
        # Peers would drop us between two adverts and see us flap in and out of the table.
        s.problem("ttl_s", f"must be greater than adverts.interval_s ({adverts.interval_s:g})")
    if adverts.ttl_s > Advert.MAX_TTL_MS / 1000:
        # Every receiver, this node included, would drop the advert as absurd (SPEC §6).
        s.problem("ttl_s", f"must be at most {Advert.MAX_TTL_MS // 1000} seconds (an advert's MAX_TTL)")
    if adverts.refresh_s is not None and adverts.refresh_s > adverts.ttl_s / 2:
        # One lost refresh would let peers expire a live node.
        s.problem("refresh_s", f"must be at most half of adverts.ttl_s ({adverts.ttl_s:g})")
    if adverts.calibration_s > 60:
        s.problem("calibration_s", "must be at most 60 seconds")

    s = sections["offer"]
    cpus = _cpu_count()
    offer = OfferConfig(
        cores=s.get("cores", positive_int, cpus),
        gpus=s.get("gpus", list_of(non_negative_int), None),
        memory_mb=s.get("memory_mb", positive_int, _total_memory_mb() * 3 // 4),
        accept_kinds=s.get("accept_kinds", list_of(one_of(*KNOWN_TASK_KINDS)), KNOWN_TASK_KINDS),
        draining=s.get("draining", boolean, False),
        keras_backend=s.get("keras_backend", one_of(*KERAS_BACKENDS), OfferConfig.keras_backend),
        jax_cache_mb=s.get("jax_cache_mb", non_negative_int, OfferConfig.jax_cache_mb),
    )
    if offer.keras_backend == "jax" and importlib.util.find_spec("jax") is None:
        s.problem("keras_backend", "JAX is not installed here: pip install 'peerd[jax]'")
    if offer.cores > cpus:
        s.problem("cores", f"{offer.cores} is more than the {cpus} cores this process may use")
    if offer.gpus is not None and len(set(offer.gpus)) != len(offer.gpus):
        s.problem("gpus", "lists a GPU index twice")

    s = sections["market"]
    market = MarketConfig(
        bid_window_ms=s.get("bid_window_ms", positive_int, MarketConfig.bid_window_ms),
        k=s.get("k", non_negative_float, MarketConfig.k),
        dc_min=s.get("dc_min", finite_float, MarketConfig.dc_min),
        dc_max=s.get("dc_max", _dc_max, math.inf),
        lease_ttl_s=s.get("lease_ttl_s", positive_float, MarketConfig.lease_ttl_s),
        heartbeat_s=s.get("heartbeat_s", positive_float, MarketConfig.heartbeat_s),
        t_max=s.get("t_max", positive_float_or_inf, math.inf),
        retries=s.get("retries", non_negative_int, MarketConfig.retries),
        backup_after=s.get("backup_after", non_negative_float, MarketConfig.backup_after),
        backup_min_s=s.get("backup_min_s", non_negative_float, MarketConfig.backup_min_s),
    )
    if market.bid_window_ms > 60_000:
        s.problem("bid_window_ms", "must be at most 60000 (one minute)")
    if market.retries > 64:
        s.problem("retries", "must be at most 64 (a shard can move to at most 64 bidders)")
    if 0 < market.backup_after < 1:
        s.problem("backup_after", "must be 0 (off) or at least 1 (a multiple of the expected time)")
    if market.dc_max < market.dc_min:
        s.problem("dc_max", f"must be >= market.dc_min ({market.dc_min:g})")
    if market.heartbeat_s >= market.lease_ttl_s:
        # A lease must survive at least one missed heartbeat, or healthy peers lose their shards.
        s.problem("heartbeat_s", f"must be less than market.lease_ttl_s ({market.lease_ttl_s:g})")

    s = sections["policy"]
    policy = PolicyConfig(
        trusted_submitters=s.get("trusted_submitters", list_of(peer_id), ()),
        require_sandbox=s.get("require_sandbox", boolean, True),
        max_blob_mb=s.get("max_blob_mb", positive_int, PolicyConfig.max_blob_mb),
        probation=s.get("probation", boolean, PolicyConfig.probation),
        probation_share=s.get("probation_share", non_negative_float, PolicyConfig.probation_share),
        probation_floor=s.get("probation_floor", positive_float, PolicyConfig.probation_floor),
        ban_threshold=s.get("ban_threshold", non_negative_float, PolicyConfig.ban_threshold),
        decay_half_life_h=s.get("decay_half_life_h", positive_float, PolicyConfig.decay_half_life_h),
        min_measure_s=s.get("min_measure_s", non_negative_float, PolicyConfig.min_measure_s),
    )
    if policy.probation_share > 1:
        s.problem("probation_share", "must be at most 1 (a share of a task's demand)")
    if policy.probation_floor > 1e6:
        s.problem("probation_floor", "must be at most 1e6 GFLOP/s (the bound on a bid's C⁰)")
    if policy.ban_threshold >= 1:
        s.problem("ban_threshold", "must be less than 1 (a trust score is below 1; 1 would ban everyone)")
    if policy.decay_half_life_h * 3_600_000 > 2**53:
        s.problem("decay_half_life_h", "is too large")
    if policy.min_measure_s > 86_400:
        s.problem("min_measure_s", "must be at most 86400 (a day)")

    s = sections["limits"]
    limits = LimitsConfig(
        memory_mb=s.get("memory_mb", positive_int, LimitsConfig.memory_mb),
        cpu_seconds=s.get("cpu_seconds", positive_int, LimitsConfig.cpu_seconds),
        wall_seconds=s.get("wall_seconds", positive_int, LimitsConfig.wall_seconds),
        max_processes=s.get("max_processes", positive_int, LimitsConfig.max_processes),
        max_output_mb=s.get("max_output_mb", positive_int, LimitsConfig.max_output_mb),
        blob_store_mb=s.get("blob_store_mb", positive_int, LimitsConfig.blob_store_mb),
    )
    if limits.blob_store_mb < policy.max_blob_mb:
        s.problem("blob_store_mb", f"must be at least policy.max_blob_mb ({policy.max_blob_mb})")

    s = sections["rpc"]
    rpc = RpcConfig(allowed_uids=s.get("allowed_uids", list_of(non_negative_int), ()))

    s = sections["metrics"]
    metrics = MetricsConfig(listen=s.get("listen", host_port, None))

    for section in sections.values():
        section.finish()
    if problems:
        raise ConfigError(problems, source=source)
    return Config(node, network, adverts, offer, market, policy, limits, rpc, metrics, source=source)


def prepare_socket_dir(cfg: Config) -> None:
    """Create the socket's directory if missing and refuse one the daemon's user does not alone
    control (owned by another user, writable by group or others, a symlink): anyone who can
    write it can swap the socket (peerd/rpc/rundir.py). Raises :class:`ConfigError` naming the
    key and the path, so ``peerd`` exits 2 before it starts anything.

    Separate from :func:`load_config`, which only reads: peerctl loads the same file to find the
    socket and must not create the daemon's directories.
    """
    import grp

    from peerd.rpc.rundir import UnsafeSocketDir, ensure_daemon_dir

    directory = cfg.node.socket.parent
    key = "node.runtime_dir" if directory == cfg.node.runtime_dir else "node.socket"
    gid = None
    if cfg.node.socket_group is not None:
        try:
            gid = grp.getgrnam(cfg.node.socket_group).gr_gid
        except KeyError:
            raise ConfigError(
                [f"node.socket_group: no such group {cfg.node.socket_group!r}"], source=cfg.source
            ) from None
    try:
        ensure_daemon_dir(directory, gid=gid)
    except UnsafeSocketDir as exc:
        raise ConfigError([f"{key}: unsafe socket directory {exc}"], source=cfg.source) from None
    except OSError as exc:
        raise ConfigError(
            [f"{key}: cannot create the socket directory {directory}: {exc.strerror or exc}"],
            source=cfg.source,
        ) from None


def _dc_max(value: Any) -> float:
    if not _is_number(value) or math.isnan(value):
        raise _expect("a number (or inf)", value)
    return float(value)


def host_port(value: Any) -> str:
    """``"127.0.0.1:9464"`` or ``"[::1]:9464"``; port 0 lets the kernel pick one (tests)."""
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if sep and host and port.isdigit() and 0 <= int(port) <= 65535:
            return value
    raise _expect('"host:port", such as "127.0.0.1:9464"', value)


def split_host_port(value: str) -> tuple[str, int]:
    """The parts of a :func:`host_port` value (brackets of an IPv6 host removed)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


_SECTION_NAMES = ("node", "network", "adverts", "offer", "market", "policy", "limits", "rpc", "metrics")
