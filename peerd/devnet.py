"""A local network of N daemons on 127.0.0.1, for the demo, tests and benchmarks.

``scripts/devnet up N [--dir DIR]`` starts them (each its own state dir and socket
``DIR/node-<i>/peerd.sock``; node 0 is the bootstrap peer of the others),
``scripts/devnet down`` stops them, ``scripts/devnet status`` shows them.

``scripts/devnet up N --wan [--delay 40ms] [--jitter 10ms] [--loss 1%] [--rate 100mbit]``
puts an emulated WAN link between every pair (peerd/wanlink.py: each daemon announces only
its relay port, so peers never learn an address that bypasses it);
``scripts/devnet partition 0,1 2`` cuts the links between groups, ``scripts/devnet heal``
restores them (docs/devnet.md).

Identity keys are created here before the daemons start, so every config can name the
bootstrap peer's ID and list the devnet's peers as trusted submitters (``python``
tasks) without a second round of restarts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from peerd.wanlink import LinkParams, parse_duration, parse_percent, parse_rate, read_state, write_state
from protocol.envelope import Signer

DEFAULT_DIR = Path(".devnet")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, bool) else ("true" if v else "false")


def _private_dir(path: Path, *, tighten: bool) -> None:
    """Create ``path`` mode 0700 whatever the umask (its parents as ``mkdir -p`` would).

    ``tighten``: an existing directory (ours: a node's, from an earlier run) loses group and
    other permissions too; the devnet's top directory may be the user's own, so it is only
    created, never changed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not tighten:
            return
    os.chmod(path, 0o700)  # mkdir's mode is masked by the umask; chmod's is not


class Devnet:
    def __init__(self, directory: Path = DEFAULT_DIR) -> None:
        self.dir = Path(directory).absolute()

    def node_dir(self, i: int) -> Path:
        return self.dir / f"node-{i}"

    def socket(self, i: int) -> Path:
        return self.node_dir(i) / "peerd.sock"

    def nodes(self) -> list[int]:
        return sorted(
            int(p.name.split("-")[1]) for p in self.dir.glob("node-*") if (p / "peerd.toml").exists()
        )

    def peer_id(self, i: int) -> str:
        return Signer((self.node_dir(i) / "state" / "identity.key").read_bytes()).peer_id

    # -- lifecycle ----------------------------------------------------------------------
    def configure(
        self,
        n: int,
        overrides: dict[str, dict[str, Any]] | None = None,
        wan: LinkParams | None = None,
    ) -> None:
        _private_dir(self.dir, tighten=False)
        ports = [_free_port() for _ in range(n)]
        # With a WAN, peers learn (and bootstrap through) only the relay ports.
        public = [_free_port() for _ in range(n)] if wan is not None else ports
        for stale in ("wan.json", "wan.applied", "wan.ready", "wan.stats.json"):
            (self.dir / stale).unlink(missing_ok=True)
        if wan is not None:
            nodes = {i: {"daemon": ports[i], "relay": public[i]} for i in range(n)}
            write_state(self.dir, wan, nodes, [], 0)
        ids = []
        for i in range(n):
            # The node directory is the daemon's runtime_dir (its socket's directory): the
            # daemon refuses one its group or others can write (peerd/rpc/rundir.py), which a
            # plain mkdir under umask 002 gives (0775).
            _private_dir(self.node_dir(i), tighten=True)
            state = self.node_dir(i) / "state"
            _private_dir(state, tighten=True)
            key = state / "identity.key"
            if not key.exists():
                fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, os.urandom(32))
                os.close(fd)
            ids.append(Signer(key.read_bytes()).peer_id)
        bootstrap = f"/ip4/127.0.0.1/tcp/{public[0]}/p2p/{ids[0]}"
        for i in range(n):
            d = self.node_dir(i)
            sections: dict[str, dict[str, Any]] = {
                "node": {
                    "state_dir": str(d / "state"),
                    "runtime_dir": str(d),
                    "socket": str(d / "peerd.sock"),
                },
                "network": {
                    "listen": [f"/ip4/127.0.0.1/tcp/{ports[i]}"],
                    "bootstrap": [] if i == 0 else [bootstrap],
                    **({"announce": [f"/ip4/127.0.0.1/tcp/{public[i]}"]} if wan is not None else {}),
                },
                # A fixed advert lifetime (network_rate 0): tests wait for expiries by ttl_s.
                "adverts": {"interval_s": 2.0, "ttl_s": 10.0, "network_rate": 0, "calibration_s": 0.2},
                "market": {"lease_ttl_s": 6.0, "heartbeat_s": 1.0},
                "policy": {"trusted_submitters": ids},
                "limits": {"memory_mb": 3072},
            }
            for sec, kv in (overrides or {}).items():
                sections.setdefault(sec, {}).update(kv)
            text = "\n".join(
                f"[{sec}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in kv.items())
                for sec, kv in sections.items()
            )
            (d / "peerd.toml").write_text(text)

    def start(self, i: int) -> int:
        d = self.node_dir(i)
        log = open(d / "peerd.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("NOTIFY_SOCKET", None)
        proc = subprocess.Popen(
            [sys.executable, "-m", "peerd.daemon", "--config", str(d / "peerd.toml")],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        (d / "peerd.pid").write_text(str(proc.pid))
        return proc.pid

    def pid(self, i: int) -> int | None:
        return self._live_pid(self.node_dir(i) / "peerd.pid")

    @staticmethod
    def _live_pid(path: Path) -> int | None:
        try:
            pid = int(path.read_text())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        # A zombie child of ours counts as gone.
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                os.waitpid(pid, os.WNOHANG)
                return None
        except (OSError, ChildProcessError):
            pass
        return pid

    def wait_ready(self, i: int, timeout: float = 60.0) -> dict[str, Any]:
        from peerd.rpc.client import RpcClient

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.pid(i) is None:
                raise RuntimeError(f"node {i} exited; see {self.node_dir(i) / 'peerd.log'}")
            try:
                return dict(RpcClient(self.socket(i)).call("node.info", {}))
            except Exception as exc:  # not listening yet
                last = exc
                time.sleep(0.1)
        raise TimeoutError(f"node {i} not ready after {timeout} s: {last}")

    def up(
        self,
        n: int,
        overrides: dict[str, dict[str, Any]] | None = None,
        *,
        timeout: float = 90.0,
        wan: LinkParams | None = None,
    ) -> None:
        self.configure(n, overrides, wan)
        if wan is not None:
            self.start_wan(timeout)
        self.start(0)
        self.wait_ready(0, timeout)
        for i in range(1, n):
            self.start(i)
        for i in range(1, n):
            self.wait_ready(i, timeout)

    def stop(self, i: int, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        pid = self.pid(i)
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while self.pid(i) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pid(i) is not None:
            os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                if self.pid(i) is None:
                    break
                time.sleep(0.05)

    def down(self) -> None:
        for i in self.nodes():
            self.stop(i)
        self.stop_wan()

    # -- the emulated WAN (peerd/wanlink.py) ------------------------------------------------
    def wan_pid(self) -> int | None:
        return self._live_pid(self.dir / "wan.pid")

    def start_wan(self, timeout: float = 30.0) -> int:
        log = open(self.dir / "wan.log", "ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "peerd.wanlink", str(self.dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        (self.dir / "wan.pid").write_text(str(proc.pid))
        deadline = time.monotonic() + timeout
        while not (self.dir / "wan.ready").exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the WAN relay did not start; see {self.dir / 'wan.log'}")
            time.sleep(0.05)
        return proc.pid

    def stop_wan(self) -> None:
        pid = self.wan_pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            if self._live_pid(self.dir / "wan.pid") is None:
                return
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)

    def wan_params(self) -> LinkParams:
        return LinkParams(**read_state(self.dir)["params"])

    def wan_ports(self) -> dict[int, dict[str, int]]:
        """Per node: ``daemon`` (its private listen port) and ``relay`` (what peers dial)."""
        return {int(i): dict(v) for i, v in read_state(self.dir)["nodes"].items()}

    def wan_stats(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.dir / "wan.stats.json").read_text()))
        except (OSError, ValueError):
            return {}

    def partition(self, groups: list[list[int]], timeout: float = 10.0) -> None:
        """Cut every link between nodes of different groups (``[]``: heal); applied on return."""
        pid = self.wan_pid()
        if pid is None:
            raise RuntimeError(f"no WAN relay runs for {self.dir} (scripts/devnet up N --wan)")
        state = read_state(self.dir)
        generation = int(state["generation"]) + 1
        nodes = {int(i): v for i, v in state["nodes"].items()}
        write_state(self.dir, LinkParams(**state["params"]), nodes, groups, generation)
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if int((self.dir / "wan.applied").read_text()) >= generation:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"the WAN relay did not apply the partition in {timeout} s")

    def heal(self) -> None:
        self.partition([])

    def wait_peers(self, n: int, timeout: float = 30.0) -> bool:
        """True once every node's peer table holds all ``n`` verified adverts."""
        from peerd.rpc.client import RpcClient

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if all(
                    len(RpcClient(self.socket(i)).call("peers.list", {})["peers"]) >= n for i in self.nodes()
                ):
                    return True
            except Exception:
                pass
            time.sleep(0.2)
        return False

    def status(self) -> list[dict[str, Any]]:
        from peerd.rpc.client import RpcClient

        out = []
        for i in self.nodes():
            row: dict[str, Any] = {"node": i, "pid": self.pid(i), "socket": str(self.socket(i))}
            if row["pid"] is not None:
                try:
                    info = RpcClient(self.socket(i)).call("node.info", {})
                    row.update(
                        peer_id=info["peer_id"],
                        peers=len(RpcClient(self.socket(i)).call("peers.list", {})["peers"]),
                    )
                except Exception as exc:
                    row["error"] = str(exc)
            out.append(row)
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="devnet", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start N daemons on 127.0.0.1")
    up.add_argument("n", type=int)
    up.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=JSON",
        help="override a config key in every node, e.g. --set market.bid_window_ms=200",
    )
    up.add_argument(
        "--wan", action="store_true", help="an emulated WAN link between every pair (docs/devnet.md)"
    )
    defaults = LinkParams()
    up.add_argument("--delay", type=parse_duration, default=defaults.delay_s, help="one-way, e.g. 40ms")
    up.add_argument(
        "--jitter", type=parse_duration, default=defaults.jitter_s, help="± on the delay, e.g. 10ms"
    )
    up.add_argument("--loss", type=parse_percent, default=defaults.loss, help="per segment, e.g. 1%%")
    up.add_argument(
        "--rate", type=parse_rate, default=defaults.rate_bps, help="per link, e.g. 100mbit; 0 = none"
    )
    part = sub.add_parser("partition", help="cut the WAN links between groups, e.g. partition 0,1 2")
    part.add_argument("groups", nargs="+", metavar="A,B")
    for p in (
        up,
        part,
        sub.add_parser("heal", help="restore every WAN link"),
        sub.add_parser("down", help="stop the devnet"),
        sub.add_parser("status", help="show the devnet"),
    ):
        p.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = ap.parse_args(argv)
    net = Devnet(args.dir)
    if args.cmd == "up":
        overrides: dict[str, dict[str, Any]] = {}
        for item in args.set:
            key, _, value = item.partition("=")
            sec, _, name = key.partition(".")
            try:
                overrides.setdefault(sec, {})[name] = json.loads(value)
            except ValueError:
                overrides.setdefault(sec, {})[name] = value
        wan = None
        if args.wan:
            try:
                wan = LinkParams(args.delay, args.jitter, args.loss, args.rate)
            except ValueError as exc:
                ap.error(str(exc))
        net.down()
        net.up(args.n, overrides, wan=wan)
        if wan is not None:
            print(
                f"WAN: {wan.delay_s * 1e3:g} ms ± {wan.jitter_s * 1e3:g} ms one way, "
                f"{wan.loss:.2%} loss, {wan.rate_bps / 1e6:g} Mbit/s per link (0: unlimited)"
            )
        for row in net.status():
            print(f"node-{row['node']}  pid {row['pid']}  {row.get('peer_id', '?')}  {row['socket']}")
        return 0
    if args.cmd in ("partition", "heal"):
        groups: list[list[int]] = []
        if args.cmd == "partition":
            try:
                groups = [[int(x) for x in g.split(",") if x] for g in args.groups]
            except ValueError:
                ap.error("groups are comma-separated node numbers, e.g. partition 0,1 2")
        try:
            net.partition(groups)
        except (RuntimeError, TimeoutError, OSError) as exc:
            print(f"devnet {args.cmd}: {exc}", file=sys.stderr)
            return 1
        print(f"{args.cmd}: {' | '.join(','.join(map(str, g)) for g in groups) or 'every link up'}")
        return 0
    if args.cmd == "down":
        net.down()
        print(f"devnet in {net.dir} stopped")
        return 0
    for row in net.status():
        state = "up" if row["pid"] else "down"
        print(
            f"node-{row['node']}  {state:4}  peers {row.get('peers', '-')}  "
            f"{row.get('peer_id', '')}  {row['socket']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
