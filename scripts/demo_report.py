"""The demo's last step: the final accuracy, the certificates, and a plot per round.

``demo_report.py report DIR`` reads DIR/task.json (``peerctl show TASK --json``) and the
bundle's manifest, prints a summary and writes DIR/training.png.
``demo_report.py digits-spec DATA`` writes a digits variant of the demo spec and prints
its path (the fallback when Fashion-MNIST cannot be installed).
"""

from __future__ import annotations

import json
import sys
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


if __name__ == "__main__":
    cmd, arg = sys.argv[1], Path(sys.argv[2])
    sys.exit(report(arg) if cmd == "report" else digits_spec(arg))
