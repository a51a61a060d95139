"""``peerctl status``: this node's identity, advert, sandbox and counters (``node.info``)."""

from __future__ import annotations

from typing import Any

import click
from rich.console import Console, Group
from rich.text import Text

from peerd.ctl import CtlState, call, json_option, pass_state
from peerd.ctl import render as r


def request() -> tuple[str, dict[str, Any]]:
    return "node.info", {}


def _capacity(advert: dict[str, Any]) -> str:
    return f"C0 {r.num(advert.get('c0'))}   L {r.num(advert.get('load'))}   C {r.num(advert.get('capacity'))}"


def _gpus(gpus: list[dict[str, Any]]) -> str:
    if not gpus:
        return "none"
    return ", ".join(
        f"#{g.get('index')} {g.get('model', '?')} ({r.megabytes(g.get('vram_free_mb'))} free of "
        f"{r.megabytes(g.get('vram_total_mb'))}, {r.num(g.get('util_pct'), 0)}% busy)"
        for g in gpus
    )


def _offer(offer: dict[str, Any]) -> str:
    gpus = offer.get("gpus")
    memory = r.megabytes(offer.get("memory_mb"))
    kinds = ", ".join(offer.get("kinds", [])) or "none"
    text = f"{offer.get('cores', '?')} cores, GPUs {gpus if gpus else 'none'}, {memory}; kinds: {kinds}"
    return text + ("  [DRAINING]" if offer.get("draining") else "")


def render(info: dict[str, Any], console: Console) -> None:
    advert = info.get("advert") or {}
    cpu, memory = advert.get("cpu") or {}, advert.get("memory") or {}
    sandbox = info.get("sandbox") or {}
    sandbox_text = Text(
        "available" if sandbox.get("available") else "UNAVAILABLE (untrusted tasks refused)",
        style="green" if sandbox.get("available") else "red",
    )
    if sandbox.get("detail"):
        sandbox_text.append(f" — {sandbox['detail']}", style="dim")
    rows: list[tuple[str, Any]] = [
        ("peer", info.get("peer_id", "-")),
        ("version", info.get("version", "-")),
        ("uptime", r.duration(info.get("uptime_s"))),
        ("listen", "\n".join(info.get("listen_addrs") or []) or "-"),
        ("capacity", _capacity(advert)),
        (
            "cpu",
            f"{cpu.get('cores', '?')} cores, {cpu.get('model', '?')}, {r.num(cpu.get('gflops'), 1)} GFLOP/s",
        ),
        (
            "memory",
            f"{r.megabytes(memory.get('available_mb'))} free of {r.megabytes(memory.get('total_mb'))}",
        ),
        ("gpus", _gpus(advert.get("gpus") or [])),
        ("offer", _offer(advert.get("offer") or {})),
        ("sandbox", sandbox_text),
    ]
    parts: list[Any] = [r.key_values(rows)]
    counters = info.get("counters") or {}
    if counters:
        t = r.table("counter", "value", title="\ncounters", right=("value",))
        for name in sorted(counters):
            t.add_row(name, str(counters[name]))
        parts.append(t)
    console.print(Group(*parts))


@click.command("status")
@json_option
@pass_state
def command(state: CtlState, as_json: bool) -> None:
    """Show this node: peer ID, capacity advert, sandbox and counters."""
    r.emit(call(state, *request()), as_json, render)
