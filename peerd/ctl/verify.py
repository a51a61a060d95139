"""``peerctl verify TASK_OR_DIR``: check a result's certificate.

For a directory (a bundle written by ``peerctl result``) everything happens locally and no
daemon is needed, so someone outside the network can check a result. For a task ID the
bundle is first exported to a temporary directory. An argument that looks like a path
(it has a ``/``, starts with ``.`` or ``~``, or exists) is always a path: a missing one is
an error about the path (exit 2), never a task lookup. The checks themselves (signatures,
committee draw, recomputed aggregate) live in :func:`peerd.verify.verify_bundle`, imported
only here because it needs numpy.

The report is expected to have ``ok: bool`` and ``checks``: items with ``name``, ``ok`` and
``detail`` (attributes or keys); anything else is printed as it is.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from peerd.ctl import CtlState, ExitCode, fail, json_option, pass_state, rpc_errors
from peerd.ctl import render as r
from peerd.ctl.result import export_bundle


def looks_like_path(target: str) -> bool:
    """Task IDs are 32 hex digits: anything with a path separator, a leading ``.`` or
    ``~``, or that exists on disk is meant as a bundle directory."""
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (
        any(sep in target for sep in seps)
        or target.startswith((".", "~"))
        or Path(target).expanduser().exists()
    )


def request(target: str) -> tuple[str, dict[str, Any]] | None:
    """None when ``target`` is a local bundle directory; else the export's first call."""
    if looks_like_path(target):
        return None
    return "task.bundle", {"task_id": target}


def bundle_dir(target: str) -> Path:
    """The bundle directory ``target`` names; a usage error (exit 2) about the path when
    there is none."""
    path = Path(target).expanduser()
    if not path.exists():
        fail(f"{target}: no such bundle directory", ExitCode.USAGE)
    if not path.is_dir():
        fail(f"{target}: not a directory (a result bundle is a directory)", ExitCode.USAGE)
    return path


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def report_to_json(report: Any) -> Any:
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        # ``ok`` is a property of the report, so asdict leaves it out; scripts need it.
        return {"ok": bool(_get(report, "ok")), **dataclasses.asdict(report)}
    if isinstance(report, dict):
        return report
    return {"ok": bool(_get(report, "ok")), "report": str(report)}


def render(report: Any, console: Console) -> None:
    checks = _get(report, "checks")
    if checks:
        t = r.table("check", "result", "detail")
        for c in checks:
            if _get(c, "ignored"):
                status = r.styled("ignored", "yellow")
            else:
                status = r.styled("ok", "green") if _get(c, "ok") else r.styled("FAILED", "red")
            t.add_row(str(_get(c, "name", "?")), status, str(_get(c, "detail", "") or ""))
        console.print(t)
    elif not isinstance(report, dict):
        console.print(str(report))
    ok = _get(report, "ok")
    console.print(r.styled("certificate verified", "green") if ok else r.styled("verification FAILED", "red"))


def _verify_dir(path: Path) -> Any:
    try:
        from peerd.verify import verify_bundle
    except ImportError as exc:
        fail(f"this installation has no verifier ({exc})")
    return verify_bundle(path)


@click.command("verify")
@click.argument("target", metavar="TASK_OR_DIR")
@json_option
@pass_state
def command(state: CtlState, target: str, as_json: bool) -> None:
    """Verify a result certificate: every signature, the committee draw, and the aggregate."""
    if request(target) is None:
        report = _verify_dir(bundle_dir(target))
    else:
        with tempfile.TemporaryDirectory(prefix="peerctl-verify-") as tmp:
            with rpc_errors(), state.client() as rpc:
                export_bundle(rpc, target, Path(tmp))
            report = _verify_dir(Path(tmp))
    if as_json:
        r.emit_json(report_to_json(report))
    else:
        render(report, r.stdout())
    raise SystemExit(int(ExitCode.OK if _get(report, "ok") else ExitCode.ERROR))
