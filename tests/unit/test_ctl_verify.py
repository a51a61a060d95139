"""``peerctl verify`` on the command line: a path is a path, a task ID is a task ID.

No daemon: a path-looking argument never reaches one, and a task ID is sent to a socket
that does not exist (exit 3, "not running"), which shows it was taken as a task ID.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from peerd.ctl import ExitCode
from peerd.ctl import verify as ctl_verify
from peerd.ctl.main import main as peerctl
from tests.helpers_training import SyntheticTask


def run(tmp_path: Path, *args: str) -> Result:
    return CliRunner().invoke(peerctl, ["--socket", str(tmp_path / "no-daemon.sock"), "verify", *args])


@pytest.mark.parametrize(
    "target", ["some/missing/dir", "./missing", "missing/", "~/peerd-no-such-bundle-dir"]
)
def test_a_missing_path_is_an_error_about_the_path(tmp_path: Path, target: str) -> None:
    assert ctl_verify.request(target) is None
    res = run(tmp_path, target)
    assert res.exit_code == ExitCode.USAGE, res.output
    assert f"peerctl: {target}: no such bundle directory" in res.output
    assert "no task" not in res.output


def test_a_file_is_not_a_bundle(tmp_path: Path) -> None:
    f = tmp_path / "bundle.tar"
    f.write_bytes(b"")
    res = run(tmp_path, str(f))
    assert res.exit_code == ExitCode.USAGE, res.output
    assert f"peerctl: {f}: not a directory (a result bundle is a directory)" in res.output


def test_a_task_id_still_goes_to_the_daemon(tmp_path: Path) -> None:
    task_id = "0123456789abcdef0123456789abcdef"
    assert ctl_verify.request(task_id) == ("task.bundle", {"task_id": task_id})
    res = run(tmp_path, task_id)
    assert res.exit_code == ExitCode.NOT_RUNNING, res.output


def test_a_good_bundle_passes_and_ignored_claims_show(tmp_path: Path) -> None:
    d = SyntheticTask(rounds=1).bundle(tmp_path / "b")
    res = run(tmp_path, str(d))
    assert res.exit_code == ExitCode.OK, res.output
    assert "certificate verified" in res.output
    assert "ignored" in res.output  # the manifest's unsigned state
    res = run(tmp_path, "--json", str(d))
    report = json.loads(res.output)
    assert report["ok"] is True
    assert {c["name"] for c in report["checks"] if c["ignored"]} == {"manifest state"}


def test_a_tampered_bundle_fails_with_what_differed(tmp_path: Path) -> None:
    task = SyntheticTask(rounds=1)
    d = task.bundle(tmp_path / "b")
    m = json.loads((d / "manifest.json").read_text())
    m["files"]["../outside.txt"] = "00" * 32
    (d / "manifest.json").write_text(json.dumps(m))
    res = run(tmp_path, "--json", str(d))
    assert res.exit_code == ExitCode.ERROR, res.output
    bad = {c["name"]: c["detail"] for c in json.loads(res.output)["checks"] if not c["ok"]}
    assert bad == {
        "file ../outside.txt": (
            "refused, not opened: the manifest lists a path that leaves the bundle directory (..)"
        )
    }
