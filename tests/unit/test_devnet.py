"""scripts/devnet's directories: private whatever the umask, so the daemon accepts them."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from peerd.devnet import Devnet
from peerd.rpc.rundir import ensure_daemon_dir


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


def test_node_dirs_are_private_under_umask_002(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        net = Devnet(tmp_path / "net")
        net.configure(2)
    finally:
        os.umask(old)
    assert _mode(tmp_path / "net") == 0o700
    for i in (0, 1):
        assert _mode(net.node_dir(i)) == 0o700
        assert _mode(net.node_dir(i) / "state") == 0o700
        # What the daemon checks before it binds its socket in the node directory.
        ensure_daemon_dir(net.node_dir(i))


def test_existing_node_dir_from_an_older_run_is_tightened(tmp_path: Path) -> None:
    net = Devnet(tmp_path / "net")
    node = net.node_dir(0)
    node.mkdir(parents=True)
    os.chmod(tmp_path / "net", 0o700)
    os.chmod(node, 0o775)
    net.configure(1)
    assert _mode(node) == 0o700
    ensure_daemon_dir(node)
