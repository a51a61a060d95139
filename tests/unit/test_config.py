"""peerd/config.py: defaults without a file, directory rules, strict validation with messages
that name the key, and the documentation (docs/config.md, examples/peerd.toml) kept in step."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from pathlib import Path

import pytest

import peerd.config as config_module
from peerd.config import Config, ConfigError, default_dirs, load_config, split_host_port

ROOT = Path(__file__).resolve().parents[2]
PEER = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"
ROOT_ENV: dict[str, str] = {}


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # The machine running the tests might have a real /etc/peerd/peerd.toml.
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "peerd.toml")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "peerd.toml"
    path.write_text(text)
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), env=ROOT_ENV, uid=0)
    return info.value.problems


# --- defaults -----------------------------------------------------------------------------------


def test_no_file_gives_documented_defaults() -> None:
    cfg = load_config(None, env=ROOT_ENV, uid=0)
    assert cfg.source is None
    assert cfg.node.state_dir == Path("/var/lib/peerd")
    assert cfg.node.socket == Path("/run/peerd/peerd.sock")
    assert cfg.node.log_level == "info" and cfg.node.socket_group is None
    assert cfg.network.listen == ("/ip4/0.0.0.0/tcp/4001",) and cfg.network.bootstrap == ()
    assert cfg.market.bid_window_ms == 300 and cfg.market.k == 0.2
    assert math.isinf(cfg.market.dc_max) and math.isinf(cfg.market.t_max)
    assert cfg.offer.gpus is None and cfg.offer.cores >= 1 and cfg.offer.memory_mb >= 1
    assert cfg.policy.require_sandbox is True
    assert cfg.limits.memory_mb == 2048 and cfg.rpc.allowed_uids == ()


def test_network_announce_replaces_what_peers_learn(tmp_path: Path) -> None:
    # docs/config.md: network.announce; the emulated WAN (docs/devnet.md) relies on it.
    assert load_config(None, env=ROOT_ENV, uid=0).network.announce == ()
    cfg = load_config(
        write(tmp_path, '[network]\nannounce = ["/ip4/127.0.0.1/tcp/4100"]'), env=ROOT_ENV, uid=0
    )
    assert cfg.network.announce == ("/ip4/127.0.0.1/tcp/4100",)


def test_network_relays_and_relay_service(tmp_path: Path) -> None:
    # docs/config.md: network.relays, network.relay_service (design.md §10.7).
    default = load_config(None, env=ROOT_ENV, uid=0).network
    assert (default.relays, default.relay_service) == ((), False)
    relay = "/ip4/192.0.2.7/tcp/4001/p2p/12D3KooWCfo4tYPWtKCwQv7nivvGatvrrsPGs2JunatFK5ZQQxG6"
    cfg = load_config(
        write(tmp_path, f'[network]\nrelays = ["{relay}"]\nrelay_service = true'), env=ROOT_ENV, uid=0
    )
    assert (cfg.network.relays, cfg.network.relay_service) == ((relay,), True)


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""), env=ROOT_ENV, uid=0)
    assert dataclasses.replace(cfg, source=None) == load_config(None, env=ROOT_ENV, uid=0)


def test_systemd_directories_win(tmp_path: Path) -> None:
    env = {"STATE_DIRECTORY": "/var/lib/peerd:/var/lib/other", "RUNTIME_DIRECTORY": "/run/peerd"}
    assert default_dirs(env, uid=1000) == (Path("/var/lib/peerd"), Path("/run/peerd"))


def test_root_uses_fhs_directories() -> None:
    assert default_dirs({"XDG_RUNTIME_DIR": "/run/user/0"}, uid=0) == (
        Path("/var/lib/peerd"),
        Path("/run/peerd"),
    )


def test_users_get_xdg_directories() -> None:
    env = {"XDG_STATE_HOME": "/home/a/.st", "XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/a"}
    assert default_dirs(env, uid=1000) == (Path("/home/a/.st/peerd"), Path("/run/user/1000/peerd"))


def test_users_without_xdg_fall_back_to_home_and_tmp() -> None:
    assert default_dirs({"HOME": "/home/b"}, uid=1234) == (
        Path("/home/b/.local/state/peerd"),
        Path("/tmp/peerd-1234"),
    )


def test_socket_follows_runtime_dir(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, '[node]\nruntime_dir = "/run/x"\n'), env=ROOT_ENV, uid=0)
    assert cfg.node.socket == Path("/run/x/peerd.sock")


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, '[node]\nstate_dir = "state"\nsocket = "run/s.sock"\n'), env=ROOT_ENV, uid=0
    )
    assert cfg.node.state_dir == tmp_path / "state"
    assert cfg.node.socket == tmp_path / "run/s.sock"


def test_values_are_read_and_typed(tmp_path: Path) -> None:
    text = f"""
[node]
socket_group = "peerd"
log_level = "DEBUG"
[network]
bootstrap = ["/ip4/192.0.2.1/tcp/4001/p2p/{PEER}"]
mdns = true
[offer]
cores = 1
gpus = [0, 1]
accept_kinds = ["echo"]
[market]
bid_window_ms = 150
dc_max = 5
t_max = inf
[policy]
trusted_submitters = ["{PEER}"]
[rpc]
allowed_uids = [1000, 1001]
"""
    cfg = load_config(write(tmp_path, text), env=ROOT_ENV, uid=0)
    assert cfg.node.socket_group == "peerd" and cfg.node.log_level == "debug"
    assert cfg.network.bootstrap == (f"/ip4/192.0.2.1/tcp/4001/p2p/{PEER}",) and cfg.network.mdns
    assert cfg.offer.cores == 1 and cfg.offer.gpus == (0, 1) and cfg.offer.accept_kinds == ("echo",)
    assert (
        cfg.market.bid_window_ms == 150 and cfg.market.dc_max == 5.0 and isinstance(cfg.market.dc_max, float)
    )
    assert cfg.policy.trusted_submitters == (PEER,)
    assert cfg.rpc.allowed_uids == (1000, 1001)


def test_config_is_frozen() -> None:
    cfg = load_config(None, env=ROOT_ENV, uid=0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.market.k = 1.0  # type: ignore[misc]


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[market]\nbid_window_ms = "x"', 'market.bid_window_ms: expected a positive integer, got "x"'),
        ("[market]\nbid_window_ms = 300.0", "market.bid_window_ms: expected a positive integer, got 300.0"),
        ("[market]\nbid_window_ms = 0", "market.bid_window_ms: expected a positive integer, got 0"),
        ("[market]\nbid_window_ms = 100000", "market.bid_window_ms: must be at most 60000"),
        ("[market]\nk = true", "market.k: expected a non-negative finite number, got true"),
        ("[market]\nk = -1", "market.k: expected a non-negative finite number, got -1"),
        ("[market]\ndc_min = 2.0\ndc_max = 1.0", "market.dc_max: must be >= market.dc_min"),
        (
            "[market]\nheartbeat_s = 10\nlease_ttl_s = 10",
            "market.heartbeat_s: must be less than market.lease_ttl_s",
        ),
        ("[market]\nt_max = 0", "market.t_max: expected a positive number (or inf), got 0"),
        ("[market]\nt_max = nan", "market.t_max: expected a positive number (or inf)"),
        ("[market]\nbid_windw = 3", 'market.bid_windw: unknown key (did you mean "bid_window_ms"?)'),
        ("[markt]\nk = 1", 'markt: unknown section (did you mean "market"?)'),
        ("market = 3", "market: expected a table, got 3"),
        ("[adverts]\ninterval_s = 5\nttl_s = 5", "adverts.ttl_s: must be greater than adverts.interval_s"),
        ("[adverts]\nttl_s = 200", "adverts.ttl_s: must be at most 120 seconds"),
        ("[adverts]\nttl_s = 60\nrefresh_s = 40", "adverts.refresh_s: must be at most half of adverts.ttl_s"),
        ("[adverts]\nnetwork_rate = -1", "adverts.network_rate: expected a non-negative finite number"),
        ("[adverts]\ncalibrate = 1", "adverts.calibrate: expected true or false, got 1"),
        ("[adverts]\ncalibration_s = 120", "adverts.calibration_s: must be at most 60 seconds"),
        ("[adverts]\ninterval_s = inf", "adverts.interval_s: expected a positive finite number"),
        ('[node]\nlog_level = "loud"', 'node.log_level: expected one of "debug"'),
        ("[node]\nsocket_group = 5", "node.socket_group: expected a non-empty string, got 5"),
        ('[node]\nsocket = "/' + "s" * 120 + '"', "node.socket: path is longer than 107 bytes"),
        ('[network]\nlisten = "/ip4/0.0.0.0/tcp/1"', "network.listen: expected an array"),
        ('[network]\nlisten = ["0.0.0.0:4001"]', "network.listen[0]: expected a multiaddr"),
        ('[network]\nannounce = ["127.0.0.1:4001"]', "network.announce[0]: expected a multiaddr"),
        ('[network]\nannounce = "/ip4/127.0.0.1/tcp/1"', "network.announce: expected an array"),
        (
            '[network]\nbootstrap = ["/ip4/192.0.2.1/tcp/4001"]',
            'network.bootstrap[0]: expected a multiaddr ending in "/p2p/',
        ),
        (
            '[network]\nrelays = ["/ip4/192.0.2.1/tcp/4001"]',
            'network.relays[0]: expected a multiaddr ending in "/p2p/',
        ),
        ("[network]\nrelay_service = 1", "network.relay_service: expected true or false, got 1"),
        ("[offer]\njax_cache_mb = -1", "offer.jax_cache_mb: expected a non-negative integer"),
        (
            "[network]\nmax_msgs_per_origin_per_s = 0",
            "network.max_msgs_per_origin_per_s: expected a positive finite",
        ),
        ("[offer]\ncores = 100000", "offer.cores: 100000 is more than the"),
        ("[offer]\ngpus = [0, -1]", "offer.gpus[1]: expected a non-negative integer, got -1"),
        ("[offer]\ngpus = [0, 0]", "offer.gpus: lists a GPU index twice"),
        ('[offer]\naccept_kinds = ["echo", "rm-rf"]', 'offer.accept_kinds[1]: expected one of "echo"'),
        (
            '[policy]\ntrusted_submitters = ["alice"]',
            "policy.trusted_submitters[0]: expected an Ed25519 peer ID",
        ),
        ("[policy]\nmax_blob_mb = -5", "policy.max_blob_mb: expected a positive integer, got -5"),
        ("[policy]\nprobation_share = 1.5", "policy.probation_share: must be at most 1"),
        ("[policy]\nprobation_share = -0.1", "policy.probation_share: expected a non-negative"),
        ("[policy]\nprobation_floor = 0", "policy.probation_floor: expected a positive"),
        ("[policy]\nprobation_floor = 1e7", "policy.probation_floor: must be at most 1e6"),
        ("[policy]\nban_threshold = 1", "policy.ban_threshold: must be less than 1"),
        ("[policy]\ndecay_half_life_h = 0", "policy.decay_half_life_h: expected a positive"),
        ("[policy]\nmin_measure_s = 100000", "policy.min_measure_s: must be at most 86400"),
        ("[limits]\nwall_seconds = 0", "limits.wall_seconds: expected a positive integer, got 0"),
        (
            '[rpc]\nallowed_uids = ["root"]',
            'rpc.allowed_uids[0]: expected a non-negative integer, got "root"',
        ),
        ("[metrics]\nlisten = 9464", 'metrics.listen: expected "host:port"'),
        ('[metrics]\nlisten = "127.0.0.1"', 'metrics.listen: expected "host:port"'),
        ('[metrics]\nlisten = "127.0.0.1:70000"', 'metrics.listen: expected "host:port"'),
    ],
)
def test_bad_values_name_their_key(tmp_path: Path, text: str, expected: str) -> None:
    found = problems(tmp_path, text)
    assert any(p.startswith(expected) for p in found), found


def test_metrics_are_off_by_default_and_listen_is_read(tmp_path: Path) -> None:
    assert load_config(None, env=ROOT_ENV, uid=0).metrics.listen is None
    cfg = load_config(write(tmp_path, '[metrics]\nlisten = "[::1]:9464"\n'), env=ROOT_ENV, uid=0)
    assert cfg.metrics.listen == "[::1]:9464"
    assert split_host_port(cfg.metrics.listen) == ("::1", 9464)


def test_bad_toml_names_the_line(tmp_path: Path) -> None:
    found = problems(tmp_path, "[node]\nlog_level = 'info'\nbroken = \n")
    assert len(found) == 1
    assert found[0].startswith("invalid TOML:") and "line 3" in found[0]


def test_all_problems_are_reported_together_with_the_file_name(tmp_path: Path) -> None:
    path = write(tmp_path, '[market]\nk = "x"\n[limits]\nmemory_mb = 0\nextra = 1\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env=ROOT_ENV, uid=0)
    assert len(info.value.problems) == 3
    assert str(info.value).count(str(path)) == 3


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml", env=ROOT_ENV, uid=0)


def test_default_path_is_used_when_it_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[market]\nbid_window_ms = 42\n")
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", path)
    cfg = load_config(None, env=ROOT_ENV, uid=0)
    assert cfg.source == path and cfg.market.bid_window_ms == 42


# --- documentation in step with the code --------------------------------------------------------


def all_keys() -> list[str]:
    keys = []
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        section_type = {f.name: f for f in dataclasses.fields(Config)}[section.name].type
        cls = getattr(config_module, str(section_type))
        keys += [f"{section.name}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def test_every_key_is_documented_in_docs_config_md() -> None:
    doc = (ROOT / "docs/config.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+\.[a-z_0-9]+)` \|", doc, flags=re.M))
    assert documented == set(all_keys())


def test_example_config_lists_every_key_and_matches_the_defaults() -> None:
    example = ROOT / "examples/peerd.toml"
    text = example.read_text()
    for key in all_keys():
        name = key.split(".")[1]
        assert re.search(rf"^#? ?{name} = ", text, flags=re.M), f"{key} missing from examples/peerd.toml"
    cfg = load_config(example, env=ROOT_ENV, uid=0)
    defaults = load_config(None, env=ROOT_ENV, uid=0)
    assert dataclasses.replace(cfg, source=None) == defaults


def test_the_example_bootstrap_line_is_valid_when_uncommented(tmp_path: Path) -> None:
    text = (ROOT / "examples/peerd.toml").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("# bootstrap = "))
    addr = re.search(r'"(/[^"]+)"', line)
    assert addr is not None
    # The placeholder peer ID is not a real key, so swap in a valid one and check the shape.
    good = re.sub(r"/p2p/\w+", f"/p2p/{PEER}", addr.group(1))
    cfg = load_config(write(tmp_path, f'[network]\nbootstrap = ["{good}"]\n'), env=ROOT_ENV, uid=0)
    assert cfg.network.bootstrap == (good,)


def test_env_defaults_come_from_the_real_environment_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", "/srv/peerd-state")
    assert load_config(None).node.state_dir == Path("/srv/peerd-state")


def test_policy_trust_keys_are_read_and_become_a_trust_policy(tmp_path: Path) -> None:
    text = "[policy]\nprobation_share = 0.5\nprobation_floor = 42.0\nban_threshold = 0\n"
    text += "decay_half_life_h = 2\n"
    cfg = load_config(write(tmp_path, text), env=ROOT_ENV, uid=0)
    tp = cfg.policy.trust_policy()
    assert (tp.probation_share, tp.probation_floor, tp.ban_threshold) == (0.5, 42.0, 0.0)
    assert tp.half_life_ms == 2 * 3_600_000
    assert load_config(None, env=ROOT_ENV, uid=0).policy.trust_policy().probation_share == 0.25


# --- [offer] keras_backend ----------------------------------------------------------------------


def test_keras_backend_defaults_to_tensorflow_and_accepts_jax(tmp_path: Path) -> None:
    assert load_config(None, env=ROOT_ENV, uid=0).offer.keras_backend == "tensorflow"
    cfg = load_config(write(tmp_path, '[offer]\nkeras_backend = "jax"\n'), env=ROOT_ENV, uid=0)
    assert cfg.offer.keras_backend == "jax"


def test_an_unknown_keras_backend_is_refused_by_name(tmp_path: Path) -> None:
    (problem,) = problems(tmp_path, '[offer]\nkeras_backend = "torch"\n')
    assert problem.startswith("offer.keras_backend:") and "jax" in problem and "tensorflow" in problem


def test_jax_without_jax_installed_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "jax" else real(name, *a)
    )
    (problem,) = problems(tmp_path, '[offer]\nkeras_backend = "jax"\n')
    assert problem == "offer.keras_backend: JAX is not installed here: pip install 'peerd[jax]'"


def test_the_jax_compilation_cache_is_for_jax_workers_and_bounded(tmp_path: Path) -> None:
    # docs/config.md: [offer] jax_cache_mb, design.md §5 "A compilation cache for JAX".
    from peerd.daemon import _jax_cache

    state = tmp_path / "state"
    state.mkdir()
    assert load_config(None, env=ROOT_ENV, uid=0).offer.jax_cache_mb == 256
    on_tf = load_config(write(tmp_path, "[offer]\njax_cache_mb = 64"), env=ROOT_ENV, uid=0)
    assert _jax_cache(on_tf, state) is None  # TensorFlow workers: no cache
    on_jax = load_config(
        write(tmp_path, '[offer]\nkeras_backend = "jax"\njax_cache_mb = 64'), env=ROOT_ENV, uid=0
    )
    assert _jax_cache(on_jax, state) == (state / "jax-cache", 64 << 20)
    assert (state / "jax-cache").stat().st_mode & 0o777 == 0o700
    off = load_config(
        write(tmp_path, '[offer]\nkeras_backend = "jax"\njax_cache_mb = 0'), env=ROOT_ENV, uid=0
    )
    assert _jax_cache(off, state) is None
