"""Who controls the socket's directory (issue 11, "A stranger's runtime directory is used as
is"): the daemon refuses a directory it does not alone control, as a config error naming the key
and the path; peerctl's client refuses to connect through one another user could have planted;
and peerctl's connection errors say what is wrong and where to point it.

Real directories on the real filesystem; "another user" is uid 65534 (nobody), which needs
root to chown to, as this suite runs.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import peerd.config as config_module
from peerd.config import ConfigError, load_config, prepare_socket_dir
from peerd.ctl.main import main as peerctl
from peerd.rpc.client import DaemonNotRunning, RpcClient, UnsafeSocket
from peerd.rpc.rundir import UnsafeSocketDir, check_client_dir, ensure_daemon_dir

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent" / "peerd.toml")


@pytest.fixture
def shared_tmp(tmp_path: Path) -> Path:
    """A /tmp look-alike: world-writable with the sticky bit."""
    d = tmp_path / "tmp"
    d.mkdir()
    d.chmod(0o1777)
    return d


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# --- the daemon's side ---------------------------------------------------------------------------


def test_a_missing_directory_is_created_0700_and_ours(shared_tmp: Path) -> None:
    d = shared_tmp / "peerd-999"
    ensure_daemon_dir(d)
    st = os.lstat(d)
    assert stat.S_ISDIR(st.st_mode) and mode(d) == 0o700 and st.st_uid == os.geteuid()
    ensure_daemon_dir(d)  # and accepted as it is next time


def test_with_a_socket_group_it_is_0750_and_chgrped(tmp_path: Path) -> None:
    gid = os.getegid()
    d = tmp_path / "run"
    ensure_daemon_dir(d, gid=gid)
    assert mode(d) == 0o750 and os.lstat(d).st_gid == gid


@needs_root
def test_a_directory_someone_else_made_first_is_refused(shared_tmp: Path) -> None:
    # The attack in issue 11: user nobody creates /tmp/peerd-999 before the daemon does.
    d = shared_tmp / "peerd-999"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(UnsafeSocketDir, match=r"is owned by uid 65534.*not by the daemon's user") as info:
        ensure_daemon_dir(d)
    assert info.value.path == d and str(d) in str(info.value)


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o702, 0o720])
def test_a_directory_others_can_write_is_refused(tmp_path: Path, bits: int) -> None:
    d = tmp_path / "run"
    d.mkdir()
    d.chmod(bits)
    with pytest.raises(UnsafeSocketDir, match=rf"writable by its group or by others \(mode {bits:04o}\)"):
        ensure_daemon_dir(d)
    assert mode(d) == bits  # reported, never "fixed" behind the operator's back


def test_a_symlink_is_refused_even_to_a_good_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "run"
    link.symlink_to(real)
    with pytest.raises(UnsafeSocketDir, match="is a symlink"):
        ensure_daemon_dir(link)


def test_a_parent_others_can_rename_in_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    parent.mkdir()
    parent.chmod(0o777)  # world-writable, no sticky bit: anyone may rename our directory away
    with pytest.raises(UnsafeSocketDir, match="writable by others without the sticky bit"):
        ensure_daemon_dir(parent / "run")


def config_for(tmp_path: Path, runtime: Path, extra: str = "") -> Path:
    cfg = tmp_path / "peerd.toml"
    cfg.write_text(f'[node]\nstate_dir = "{tmp_path}/state"\nruntime_dir = "{runtime}"\n{extra}')
    return cfg


def test_an_unsafe_runtime_dir_is_a_config_error_naming_the_key_and_path(tmp_path: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    runtime.chmod(0o777)
    cfg = load_config(config_for(tmp_path, runtime), env={})  # reading alone checks nothing
    with pytest.raises(ConfigError) as info:
        prepare_socket_dir(cfg)
    [problem] = info.value.problems
    assert problem.startswith(f"node.runtime_dir: unsafe socket directory {runtime}: ")
    assert "writable by its group or by others (mode 0777)" in problem


def test_an_explicit_socket_elsewhere_is_checked_under_its_own_key(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    elsewhere.chmod(0o775)
    cfg = load_config(config_for(tmp_path, tmp_path / "run", f'socket = "{elsewhere}/peerd.sock"\n'), env={})
    with pytest.raises(
        ConfigError, match=rf"node\.socket: unsafe socket directory {re.escape(str(elsewhere))}: "
    ):
        prepare_socket_dir(cfg)
    assert not (tmp_path / "run").exists()  # the unused runtime_dir is not created


def test_a_good_runtime_dir_is_created_by_prepare(tmp_path: Path) -> None:
    runtime = tmp_path / "deep" / "run"
    prepare_socket_dir(load_config(config_for(tmp_path, runtime), env={}))
    assert mode(runtime) == 0o700


def test_an_unknown_socket_group_is_a_config_error(tmp_path: Path) -> None:
    cfg = load_config(config_for(tmp_path, tmp_path / "run", 'socket_group = "no-such-group-xyz"\n'), env={})
    with pytest.raises(ConfigError, match=r"node\.socket_group: no such group 'no-such-group-xyz'"):
        prepare_socket_dir(cfg)


# --- the client's side ----------------------------------------------------------------------------


@needs_root
def test_the_client_refuses_a_strangers_directory_in_a_shared_one(shared_tmp: Path) -> None:
    d = shared_tmp / "peerd-999"
    d.mkdir(mode=0o700)
    os.chown(d, NOBODY, NOBODY)
    with pytest.raises(UnsafeSocketDir, match=r"owned by uid 65534.*any user can create files"):
        check_client_dir(d)


@needs_root
def test_the_client_accepts_the_system_services_directory(tmp_path: Path) -> None:
    # /run/peerd: owned by the peerd user, 0750, made by systemd in root's 0755 /run.
    run = tmp_path / "run"
    run.mkdir(mode=0o755)
    d = run / "peerd"
    d.mkdir(mode=0o750)
    os.chown(d, NOBODY, NOBODY)
    check_client_dir(d)


@pytest.mark.parametrize("bits", [0o777, 0o1777, 0o770])
def test_the_client_refuses_a_directory_others_can_write(tmp_path: Path, bits: int) -> None:
    d = tmp_path / "peerd-999"
    d.mkdir()
    d.chmod(bits)
    with pytest.raises(UnsafeSocketDir, match="writable by its group or by others"):
        check_client_dir(d)


def test_the_client_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeSocketDir, match="is a symlink"):
        check_client_dir(tmp_path / "link")


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Path]:
    """A listening socket in a world-writable directory: connect() would succeed."""
    d = tmp_path / "peerd-999"
    d.mkdir()
    path = d / "peerd.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    d.chmod(0o777)
    yield path
    srv.close()


def test_rpc_client_does_not_connect_through_an_unsafe_directory(listening: Path) -> None:
    with pytest.raises(
        UnsafeSocket, match=rf"refusing to connect to {re.escape(str(listening))}: unsafe socket directory"
    ):
        RpcClient(listening).connect()


def test_peerctl_refuses_an_unsafe_directory_with_exit_2(listening: Path) -> None:
    res = CliRunner().invoke(peerctl, ["--socket", str(listening), "status"])
    assert res.exit_code == 2, res.output
    [line] = res.output.strip().splitlines()
    assert line.startswith(f"peerctl: refusing to connect to {listening}: unsafe socket directory")
    assert "mode 0777" in line


# --- connection errors say what is wrong ----------------------------------------------------------


def test_a_regular_file_is_not_reported_as_connection_refused(tmp_path: Path) -> None:
    path = tmp_path / "peerd.sock"
    path.write_text("not a socket")
    with pytest.raises(DaemonNotRunning) as info:
        RpcClient(path).connect()
    assert str(info.value) == f"{path} is a regular file, not peerd's socket"
    res = CliRunner().invoke(peerctl, ["--socket", str(path), "status"])
    assert res.exit_code == 3
    assert res.output.strip().splitlines() == [
        f"peerctl: {path} is a regular file, not peerd's socket; "
        "start peerd, or point --socket or $PEERD_SOCKET at its socket"
    ]


def test_a_directory_is_not_reported_as_connection_refused(tmp_path: Path) -> None:
    path = tmp_path / "peerd.sock"
    path.mkdir()
    with pytest.raises(
        DaemonNotRunning, match=rf"^{re.escape(str(path))} is a directory, not peerd's socket$"
    ):
        RpcClient(path).connect()


def test_a_socket_nobody_listens_on_says_so(tmp_path: Path) -> None:
    path = tmp_path / "peerd.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # bound, never listening: what a killed daemon leaves behind
    dead.close()
    with pytest.raises(
        DaemonNotRunning,
        match=rf"connection refused at {re.escape(str(path))}: a socket left by a daemon that stopped",
    ):
        RpcClient(path).connect()


def test_no_socket_names_the_options_to_point_peerctl_elsewhere(tmp_path: Path) -> None:
    res = CliRunner().invoke(peerctl, ["--socket", str(tmp_path / "none.sock"), "peers"])
    assert res.exit_code == 3
    assert res.output.strip().splitlines() == [
        f"peerctl: peerd is not running (no socket at {tmp_path}/none.sock); "
        "start peerd, or point --socket or $PEERD_SOCKET at its socket"
    ]
