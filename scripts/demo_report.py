"""The demo's last step: the final accuracy, the certificates, and a plot per round.

``demo_report.py report DIR`` reads DIR/task.json (``peerctl show TASK --json``) and the
bundle's manifest, prints a summary and writes DIR/training.png.
``demo_report.py digits-spec DATA`` writes a digits variant of the demo spec and prints
its path (the fallback when Fashion-MNIST cannot be installed).
``demo_report.py sized-spec SPEC PEERS OUT`` writes SPEC with its ``work`` sized to the peers
in PEERS (``peerctl peers --json``) into the folder OUT, and prints its path.
"""

from __future__ import annotations

import json
import re
import sys
import tomllib
from pathlib import Path


def report(out: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = json.loads((out / "task.json").read_text())
    rounds = task.get("rounds") or []
    metrics = (task.get("result") or {}).get("metrics") or {}
    cert = (task.get("result") or {}).get("certificate") or {}
    print(f"task {task['task_id']}: {task['state']}")
    for rd in rounds:
        print(
            f"  round {rd['round']}: {len(rd.get('participants', []))} peers, "
            f"train acc {rd.get('accuracy', float('nan')):.4f}, "
            f"val acc {rd.get('val_accuracy') or float('nan'):.4f}, "
            f"certified by {len(rd.get('signers', []))} committee votes"
        )
    if "test_accuracy" in metrics:
        print(f"final test accuracy: {metrics['test_accuracy']:.4f}")
    if cert:
        print(f"final certificate: round {cert['round']}, rule {cert['rule']}, output {cert['output'][:16]}…")
        print(f"  committee {', '.join(cert['committee'])}")
        print(f"  signed by {', '.join(cert['signers'])}")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [rd["round"] for rd in rounds]
    for key, label in (("accuracy", "train (participants)"), ("val_accuracy", "validation (submitter)")):
        ax1.plot(xs, [rd.get(key) for rd in rounds], marker="o", label=label)
    if "test_accuracy" in metrics:
        ax1.axhline(
            metrics["test_accuracy"],
            linestyle="--",
            color="gray",
            label=f"final test {metrics['test_accuracy']:.3f}",
        )
    ax1.set(title="accuracy per round", xlabel="round", ylabel="accuracy", xticks=xs)
    ax1.legend()
    for key, label in (("loss", "train (participants)"), ("val_loss", "validation (submitter)")):
        ax2.plot(xs, [rd.get(key) for rd in rounds], marker="o", label=label)
    ax2.set(title="loss per round", xlabel="round", ylabel="loss", xticks=xs)
    ax2.legend()
    fig.suptitle(f"peerd: {task.get('name') or task['task_id']} — {len(rounds)} certified rounds")
    fig.tight_layout()
    png = out / "training.png"
    fig.savefig(png, dpi=100)
    print(f"plot: {png}")
    return 0 if task["state"] == "done" else 1


def digits_spec(data: Path) -> int:
    root = Path(__file__).resolve().parent.parent
    text = (root / "examples" / "fashion-mnist.toml").read_text()
    text = text.replace('name = "fashion-mnist-fedavg"', 'name = "digits-fedavg"')
    text = text.replace('"data/', f'"{data}/').replace('"seed-mlp.json"', f'"{data}/model.json"')
    spec = data / "digits.toml"
    spec.write_text(text)
    print(spec)
    return 0


#: R as a share of ΣC over the peers: any two of three similar peers give ~2/3 of it, so the
#: cheapest set covering R is all three.
DEMAND_SHARE = 0.9


def sized_spec(spec: Path, peers_json: Path, out: Path) -> int:
    """The demo's spec with ``work`` = DEMAND_SHARE × ΣC × deadline_s over the peers seen.

    C is calibrated per machine at start (docs/design.md §4), so a fixed ``work`` needs three
    peers on one machine and two on a faster or quieter one; the demo shows three."""
    peers = json.loads(peers_json.read_text())["peers"]
    total = sum(float(p.get("capacity") or 0.0) for p in peers)
    if total <= 0:
        print(f"no capacity among the peers in {peers_json}", file=sys.stderr)
        return 1
    text = spec.read_text()
    deadline = float(tomllib.loads(text)["deadline_s"])
    work = round(DEMAND_SHARE * total * deadline, 1)
    text = re.sub(
        r"^work = .*$",
        f"work = {work}  # {DEMAND_SHARE} × ΣC of the {len(peers)} peers × deadline_s (scripts/demo)",
        text,
        count=1,
        flags=re.M,
    )
    # Paths in the spec are relative to its own folder; the copy lives elsewhere.
    text = re.sub(r'= "([^"/][^"]*\.(?:npz|json))"', lambda m: f'= "{_beside(spec, m.group(1))}"', text)
    sized = out / f"{spec.stem}.sized.toml"
    sized.write_text(text)
    print(sized)
    return 0


def _beside(spec: Path, name: str) -> Path:
    return (spec.parent / name).resolve()


if __name__ == "__main__":
    cmd, arg = sys.argv[1], Path(sys.argv[2])
    if cmd == "sized-spec":
        sys.exit(sized_spec(arg, Path(sys.argv[3]), Path(sys.argv[4])))
    sys.exit(report(arg) if cmd == "report" else digits_spec(arg))
