"""``peerctl result TASK -o DIR``: write a task's result bundle into DIR.

The bundle (outputs, certificate, the signed messages behind them) is listed by
``task.bundle`` and fetched in chunks of at most 1 MiB with ``blob.read``; every file is
checked against its sha256 and size before it is moved into place, so DIR never holds a
partial or corrupt file. The same export backs ``peerctl verify TASK``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path, PurePosixPath
from typing import Any

import click
from rich.console import Console

from peerd.ctl import CtlState, json_option, pass_state, rpc_errors
from peerd.ctl import render as r
from peerd.rpc.client import ConnectionLost, RpcClient

CHUNK = 1 << 20


def request(task_id: str) -> tuple[str, dict[str, Any]]:
    return "task.bundle", {"task_id": task_id}


def chunk_request(sha256: str, offset: int, length: int = CHUNK) -> tuple[str, dict[str, Any]]:
    return "blob.read", {"sha256": sha256, "offset": offset, "length": length}


def bundle_path(out_dir: Path, name: str) -> Path:
    """Where bundle file ``name`` goes under ``out_dir``; names come from the daemon, so a name
    that would escape ``out_dir`` (absolute, ``..``, empty parts) is refused."""
    pure = PurePosixPath(name)
    if (
        not name
        or "\\" in name
        or "\0" in name
        or pure.is_absolute()
        or any(p in ("", ".", "..") for p in pure.parts)
        or name != str(pure)
    ):
        raise ConnectionLost(f"peerd listed an unsafe bundle file name {name!r}")
    return out_dir.joinpath(*pure.parts)


def _fetch(rpc: RpcClient, entry: dict[str, Any], dest: Path) -> None:
    sha, size = str(entry["sha256"]), int(entry["size"])
    tmp = dest.with_name(f".{dest.name}.part")
    digest = hashlib.sha256()
    offset = 0
    with open(tmp, "wb") as f:
        while True:
            chunk = rpc.call(*chunk_request(sha, offset))
            try:
                data = base64.b64decode(chunk["data_b64"], validate=True)
            except (binascii.Error, KeyError, TypeError):
                raise ConnectionLost(f"peerd sent a malformed chunk of {sha}") from None
            f.write(data)
            digest.update(data)
            offset += len(data)
            if chunk.get("eof") or offset > size:
                break
            if not data:
                raise ConnectionLost(f"peerd sent an empty chunk before the end of {sha}")
        f.flush()
        os.fsync(f.fileno())
    if offset != size or digest.hexdigest() != sha:
        tmp.unlink(missing_ok=True)
        raise ConnectionLost(f"{entry.get('name')}: content does not match its sha256/size; nothing written")
    os.replace(tmp, dest)


def export_bundle(rpc: RpcClient, task_id: str, out_dir: Path) -> list[dict[str, Any]]:
    """Write every file of ``task_id``'s bundle under ``out_dir``; returns the file list."""
    files: list[dict[str, Any]] = rpc.call(*request(task_id)).get("files", [])
    targets = [(entry, bundle_path(out_dir, str(entry.get("name", "")))) for entry in files]
    for entry, dest in targets:
        dest.parent.mkdir(parents=True, exist_ok=True)
        _fetch(rpc, entry, dest)
    return files


def render(result: dict[str, Any], console: Console) -> None:
    t = r.table(
        "file",
        "size",
        "sha256",
        title=f"wrote {len(result['files'])} files to {result['dir']}",
        right=("size",),
    )
    for f in result["files"]:
        t.add_row(str(f.get("name")), r.size(f.get("size")), str(f.get("sha256")))
    console.print(t)


@click.command("result")
@click.argument("task_id", metavar="TASK")
@click.option(
    "-o",
    "--output",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Directory to write the bundle into (created if missing).",
)
@json_option
@pass_state
def command(state: CtlState, task_id: str, out_dir: Path, as_json: bool) -> None:
    """Write TASK's result bundle (outputs, certificate, signed messages) into DIR."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with rpc_errors(), state.client() as rpc:
        files = export_bundle(rpc, task_id, out_dir)
    r.emit({"task_id": task_id, "dir": str(out_dir), "files": files}, as_json, render)
