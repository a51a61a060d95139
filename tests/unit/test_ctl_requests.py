"""peerctl without a daemon: each subcommand's pure argv → (method, params) function, checked
against the RPC contract; socket discovery; exit codes; rendering; and its import boundary."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner
from rich.console import Console

import peerd.config as config_module
import peerd.ctl as ctl
from peerd.ctl import (
    cancel,
    connect,
    explain,
    peers,
    resolve_socket,
    result,
    show,
    status,
    submit,
    tasks,
    verify,
    watch,
)
from peerd.ctl import id as id_cmd
from peerd.ctl.main import main as peerctl
from peerd.rpc import CONTRACT

ROOT = Path(__file__).resolve().parents[2]
PEER = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"


def check(request: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The request must name a documented method with params its schema accepts."""
    method, params = request
    assert method in CONTRACT
    CONTRACT[method].params(dict(params))
    return request


# --- request builders ---------------------------------------------------------------------------


def test_simple_requests() -> None:
    assert check(status.request()) == ("node.info", {})
    assert check(id_cmd.request()) == ("node.info", {})
    assert check(peers.request()) == ("peers.list", {})
    assert check(tasks.request()) == ("task.list", {})
    assert check(show.request("t1")) == ("task.get", {"task_id": "t1"})
    assert check(watch.request("t1")) == ("task.watch", {"task_id": "t1"})
    assert check(cancel.request("t1")) == ("task.cancel", {"task_id": "t1"})
    assert check(explain.request("t1")) == ("task.explain", {"task_id": "t1"})
    assert check(result.request("t1")) == ("task.bundle", {"task_id": "t1"})
    assert check(result.chunk_request("ab" * 32, 1 << 20)) == (
        "blob.read",
        {"sha256": "ab" * 32, "offset": 1 << 20, "length": 1 << 20},
    )


def test_connect_request_checks_the_address() -> None:
    addr = f"/ip4/192.0.2.7/tcp/4001/p2p/{PEER}"
    assert check(connect.request(f"  {addr} ")) == ("network.connect", {"addr": addr})
    with pytest.raises(click.BadParameter, match="/p2p/"):
        connect.request("/ip4/192.0.2.7/tcp/4001")


def test_submit_sends_json_with_absolute_input_paths(tmp_path: Path) -> None:
    (tmp_path / "job.py").write_text("print('hi')\n")
    spec = tmp_path / "task.toml"
    # A python task's only param is args: a TOML date in it (the schema, peerd/kinds.py, refuses
    # unknown keys such as the free-form `when` this test used before).
    spec.write_text(
        'kind = "python"\nname = "t"\n[inputs]\nscript = "job.py"\n[params]\nargs = [2024-01-02]\n'
    )
    method, params = check(submit.request(spec))
    assert method == "task.submit"
    assert params["spec"]["inputs"] == {"script": str(tmp_path.resolve() / "job.py")}
    assert params["spec"]["params"]["args"] == ["2024-01-02"]  # TOML dates become ISO strings
    json.dumps(params)  # all of it is JSON


def test_submit_keeps_absolute_paths(tmp_path: Path) -> None:
    spec = tmp_path / "task.toml"
    spec.write_text('kind = "python"\n[inputs]\nscript = "/srv/jobs/job.py"\n')
    assert submit.request(spec)[1]["spec"]["inputs"]["script"] == "/srv/jobs/job.py"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('kind = "echo"\nbroken =\n', "line 2"),
        ('kind = "teleport"\n', "kind:"),
        ('kind = "echo"\nmax_shards = 0\n', "max_shards:"),
        ('kind = "echo"\nbogus = 1\n', "bogus:"),
    ],
)
def test_submit_reports_spec_errors_before_sending(tmp_path: Path, text: str, fragment: str) -> None:
    spec = tmp_path / "task.toml"
    spec.write_text(text)
    with pytest.raises(click.BadParameter, match=fragment):
        submit.request(spec)


def test_submit_of_a_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        peerctl, ["--socket", str(tmp_path / "s"), "submit", str(tmp_path / "none.toml")]
    )
    assert res.exit_code == 2 and "cannot read" in res.output


def test_every_example_task_spec_builds_a_valid_request() -> None:
    # examples/peerd.toml is the daemon's config, not a task spec.
    specs = sorted(p for p in (ROOT / "examples").glob("*.toml") if p.name != "peerd.toml")
    assert specs, "no example task specs"
    for path in specs:
        check(submit.request(path))


def test_verify_is_local_for_a_directory(tmp_path: Path) -> None:
    assert verify.request(str(tmp_path)) is None
    assert check(verify.request("t1") or ("", {})) == ("task.bundle", {"task_id": "t1"})


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../b", "", "a//b", "./a", "a\\b", "a/"])
def test_bundle_names_that_escape_the_directory_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(Exception, match="unsafe"):
        result.bundle_path(tmp_path, name)


def test_bundle_names_may_have_subdirectories(tmp_path: Path) -> None:
    assert result.bundle_path(tmp_path, "outputs/model.npz") == tmp_path / "outputs" / "model.npz"


# --- where the socket is ------------------------------------------------------------------------


@pytest.fixture
def no_system(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_module, "DEFAULT_CONFIG_PATH", tmp_path / "absent.toml")
    monkeypatch.setattr(ctl, "SYSTEM_SOCKET", tmp_path / "system" / "peerd.sock")


def test_explicit_socket_wins(no_system: None, tmp_path: Path) -> None:
    assert resolve_socket(tmp_path / "x.sock", None, env={}, uid=1000) == tmp_path / "x.sock"


def test_socket_comes_from_the_config(no_system: None, tmp_path: Path) -> None:
    cfg = tmp_path / "peerd.toml"
    cfg.write_text(f'[node]\nsocket = "{tmp_path}/cfg.sock"\n')
    assert resolve_socket(None, cfg, env={}, uid=1000) == tmp_path / "cfg.sock"


def test_a_user_finds_the_system_service_socket(no_system: None, tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path / "user")}
    assert resolve_socket(None, None, env=env, uid=1000) == tmp_path / "user/peerd/peerd.sock"
    system = tmp_path / "system" / "peerd.sock"
    system.parent.mkdir()
    system.touch()
    assert resolve_socket(None, None, env=env, uid=1000) == system


def test_a_broken_explicit_config_is_a_usage_error(no_system: None, tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[node\n")
    res = CliRunner().invoke(peerctl, ["--config", str(cfg), "status"])
    assert res.exit_code == 2 and "invalid TOML" in res.output


# --- exit codes ---------------------------------------------------------------------------------


def test_daemon_not_running_is_exit_3_with_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(peerctl, ["--socket", str(tmp_path / "none.sock"), "status"])
    assert res.exit_code == 3
    assert res.output.strip().splitlines() == [
        f"peerctl: peerd is not running (no socket at {tmp_path}/none.sock); "
        "start peerd, or point --socket or $PEERD_SOCKET at its socket"
    ]


def test_env_var_selects_the_socket(tmp_path: Path) -> None:
    res = CliRunner().invoke(peerctl, ["peers"], env={"PEERD_SOCKET": str(tmp_path / "env.sock")})
    assert res.exit_code == 3 and "env.sock" in res.output


def test_permission_denied_is_exit_4(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Root ignores file modes, so the kernel's EACCES is simulated at connect().
    def denied(self: socket.socket, address: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(socket.socket, "connect", denied)
    res = CliRunner().invoke(peerctl, ["--socket", str(tmp_path / "s.sock"), "id"])
    assert res.exit_code == 4
    assert res.output.startswith(f"peerctl: permission denied opening {tmp_path}/s.sock")


# --- rendering ----------------------------------------------------------------------------------


def rendered(render: Any, data: Any) -> str:
    buf = io.StringIO()
    render(data, Console(file=buf, width=200, color_system=None, markup=False))
    return buf.getvalue()


def test_explain_shows_every_bid_with_cost_and_reason() -> None:
    out = rendered(
        explain.render,
        {
            "task_id": "t1",
            "demand": 3000.0,
            "params": {"k": 0.2, "dc_min": 0.0, "dc_max": None},
            "max_shards": 3,
            "under_capacity": False,
            "total_capacity": 3000.34,
            "total_cost": 2900.338,
            "bids": [
                {
                    "peer_id": "peer-two",
                    "c0": 1500,
                    "load": 0.8,
                    "delta_c": 0.16,
                    "capacity": 1500.16,
                    "cost": 1200.128,
                    "chosen": False,
                    "why": "a cheaper set covers R without it",
                },
                {
                    "peer_id": "peer-one",
                    "c0": 1000,
                    "load": 0.5,
                    "delta_c": 0.1,
                    "capacity": 1000.1,
                    "cost": 500.05,
                    "chosen": True,
                    "why": "in the cheapest set covering R",
                },
            ],
        },
    )
    assert "2900.338" in out and "1200.128" in out and "ΔC_max ∞" in out
    assert out.index("peer-one") < out.index("peer-two")  # chosen bids first
    assert "a cheaper set covers R without it" in out


def test_show_renders_shards_rounds_and_result() -> None:
    out = rendered(
        show.render,
        {
            "task_id": "t7",
            "kind": "keras-train",
            "state": "done",
            "demand": 12.5,
            "under_capacity": True,
            "shards": [{"index": 0, "peer_id": PEER, "state": "done", "share": 0.25, "attempts": 2}],
            "rounds": [
                {
                    "round": 1,
                    "participants": [PEER, "x"],
                    "loss": 0.5,
                    "accuracy": 0.8123,
                    "val_loss": None,
                    "val_accuracy": 0.8,
                    "certified": True,
                }
            ],
            "result": {
                "outputs": [{"name": "model.npz", "sha256": "f" * 64, "size": 407_000}],
                "metrics": {"test_accuracy": 0.8712},
                "certificate": {"votes": []},
            },
            "events": [{"at": 0, "state": "bidding", "message": "announced"}],
        },
    )
    assert "under capacity" in out and "0.250" in out and "0.8123" in out and "0.8712" in out
    assert "model.npz" in out and "397.5 KB" in out and "announced" in out


def test_watch_describes_rounds_and_state_changes() -> None:
    line = watch.describe_event(
        {"state": "running", "round": 2, "metrics": {"participants": ["a", "b", "c"], "accuracy": 0.85}}, 5
    )
    assert line == "round 2/5  peers 3  acc 0.8500"
    assert watch.describe_event({"state": "bidding", "message": "3 bids"}) == "bidding      3 bids"
    assert watch.exit_code({"state": "done"}) == 0 and watch.exit_code({"state": "cancelled"}) == 1


def test_status_and_peers_survive_sparse_objects() -> None:
    # The daemon may omit fields (no GPUs, no advert yet); output must still render.
    assert "12D3" in rendered(status.render, {"peer_id": "12D3KooWx"})
    assert "no peers" in rendered(peers.render, {"peers": []})
    assert "no tasks" in rendered(tasks.render, {"tasks": []})


# --- the import boundary ------------------------------------------------------------------------


def test_peerctl_imports_no_heavy_or_async_modules() -> None:
    code = (
        "import sys, peerd.ctl.main\n"
        "loaded = {m.split('.')[0] for m in sys.modules}\n"
        "bad = sorted(loaded & {'trio', 'libp2p', 'numpy', 'tensorflow', 'msgpack'})\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"peerctl imports {out.stdout.strip()}"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            'kind = "echo"\nmax_shards = 0\n',
            "peerctl: invalid task spec: max_shards: must be an integer from 1 to 64, got 0",
        ),
        ('kind = "echo"\n[params]\ndta = "x"\n', "peerctl: invalid task spec: params.dta"),
        ('kind = "echo"\nbroken =\n', "peerctl: invalid task spec: invalid TOML"),
    ],
)
def test_local_spec_errors_are_one_line_and_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    spec = tmp_path / "task.toml"
    spec.write_text(text)
    res = CliRunner().invoke(peerctl, ["--socket", str(tmp_path / "s"), "submit", str(spec)])
    assert res.exit_code == 2
    assert res.output.startswith(expected), res.output
    assert "Usage:" not in res.output and len(res.output.strip().splitlines()) == 1


def test_help_lists_every_exit_code_and_points_to_the_docs() -> None:
    from peerd.ctl import ExitCode

    res = CliRunner().invoke(peerctl, ["--help"])
    assert res.exit_code == 0
    for code in ExitCode:
        assert re.search(rf"^\s+{int(code)}  \S", res.output, flags=re.M), (code, res.output)
    for doc in ("docs/tasks.md", "docs/rpc.md", "docs/config.md", "docs/metrics.md"):
        assert doc in res.output
        assert (Path(__file__).resolve().parents[2] / doc).is_file()
