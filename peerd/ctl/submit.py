"""``peerctl submit FILE [--wait]``: send a TOML task spec to the daemon (``task.submit``).

The spec is checked here first with the daemon's own parser (:func:`peerd.taskspec.parse_spec`)
so mistakes show up before anything is sent, naming the field. Input files named in the spec
are read by the *daemon*, not by peerctl, so relative paths are made absolute against the spec
file's directory; they must be readable by the daemon's user (docs/rpc.md, task.submit).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import tomllib
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.text import Text

from peerd.ctl import CtlState, ExitCode, fail, json_option, pass_state, rpc_errors
from peerd.ctl import render as r
from peerd.ctl import result as result_command
from peerd.ctl.watch import follow_task
from peerd.rpc.client import RpcCallError
from peerd.rpc.jsonrpc import ErrorCode

#: How a spec error starts, from peerctl and from the daemon alike (peerd/api.py, task.submit).
SPEC_ERROR = "invalid task spec: "

#: ``submit --wait`` prints a done task's outputs when there are at most this many files, each
#: at most this many bytes of UTF-8 text (an echo, a word count); else it says where they are.
SMALL_FILES = 4
SMALL_BYTES = 4096


def _jsonable(value: Any) -> Any:
    # TOML has dates and times, JSON does not: send them as ISO 8601 strings.
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def spec_from_toml(text: str, base_dir: Path) -> dict[str, Any]:
    """The JSON form of a TOML task spec, validated, with input paths absolute.

    Raises ``click.BadParameter`` naming the TOML line or the spec field.
    """
    from peerd.taskspec import SpecError, parse_spec

    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise click.BadParameter(f"{SPEC_ERROR}invalid TOML: {exc}", param_hint="FILE") from None
    try:
        # TOML dates and times become ISO strings first: the wire carries JSON-like values only.
        spec = parse_spec(_jsonable(raw), base_dir=base_dir.resolve())
    except SpecError as exc:
        raise click.BadParameter(f"{SPEC_ERROR}{exc}", param_hint="FILE") from None
    result: dict[str, Any] = _jsonable(spec.to_json())
    return result


def request(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="FILE") from None
    return "task.submit", {"spec": spec_from_toml(text, path.parent)}


def render(result: dict[str, Any], console: Console) -> None:
    console.print(result.get("task_id"), markup=False, highlight=False, soft_wrap=True)


@click.command("submit")
@click.argument("path", metavar="FILE", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--wait", is_flag=True, help="Follow the task until it ends (like `peerctl watch`).")
@json_option
@pass_state
def command(state: CtlState, path: Path, wait: bool, as_json: bool) -> None:
    """Submit the TOML task spec FILE; prints the task ID."""
    # One format and one exit code for a spec error, whoever finds it (docs/tasks.md): peerctl
    # (the spec's fields and params) or the daemon (e.g. an input file it cannot read).
    try:
        method, params = request(path)
    except click.BadParameter as exc:
        fail(exc.message, ExitCode.USAGE)
    with rpc_errors(), state.client() as rpc:
        try:
            result = rpc.call(method, params)
        except RpcCallError as exc:
            if exc.code == ErrorCode.INVALID_PARAMS and exc.message.startswith(SPEC_ERROR):
                fail(exc.message, ExitCode.USAGE)
            raise
    if not wait:
        r.emit(result, as_json, render)
        return
    if not as_json:
        r.stdout().print(f"submitted {result.get('task_id')}", highlight=False)
    code, task = follow_task(state, str(result["task_id"]), as_json)
    if not as_json and task.get("state") == "done" and (task.get("result") or {}).get("outputs"):
        print_small_outputs(state, str(result["task_id"]), r.stdout())
    raise SystemExit(int(code))


def small_outputs(files: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The bundle's output files when they are few and small enough to print, else None."""
    outs = [f for f in files if str(f.get("name", "")).startswith("outputs/")]
    if not outs or len(outs) > SMALL_FILES:
        return None
    if any(not isinstance(f.get("size"), int) or f["size"] > SMALL_BYTES for f in outs):
        return None
    return outs


def print_small_outputs(state: CtlState, task_id: str, console: Console) -> None:
    """After ``--wait``: a small text output is printed; otherwise the hint above says where."""
    with rpc_errors(), state.client() as rpc:
        outs = small_outputs(rpc.call(*result_command.request(task_id)).get("files") or [])
        if outs is None:
            return
        texts = []
        for f in outs:
            chunk = rpc.call(*result_command.chunk_request(str(f["sha256"]), 0, SMALL_BYTES))
            data = base64.b64decode(chunk.get("data_b64", ""))
            if hashlib.sha256(data).hexdigest() != f["sha256"]:
                return  # not all of it, or not it: leave it to `peerctl result`
            try:
                texts.append((str(f["name"]), data.decode("utf-8")))
            except UnicodeDecodeError:
                return  # binary: `peerctl result` writes it
    for name, text in texts:
        console.print(Text(f"{name}:", style="bold"))
        console.print(Text(text.rstrip("\n")))
