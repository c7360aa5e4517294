"""Plot train/eval loss per task from the metrics.jsonl that each ``anymask train`` run writes.

usage: python scripts/plot_train_curves.py RUNS_DIR OUT.png   (RUNS_DIR/<task>/metrics.jsonl)
"""

import json
import sys
from pathlib import Path

from anymask._optional import pyplot


def main(runs: Path, out: Path) -> None:
    plt = pyplot()
    tasks = sorted(p.parent.name for p in runs.glob("*/metrics.jsonl"))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rows = [json.loads(line) for line in (runs / task / "metrics.jsonl").read_text().splitlines() if line]
        train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]  # null: no loss unit
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), label="train", alpha=0.6)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval")
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend()
    fig.suptitle("anymask train: LoRA on SmolLM2-135M, CPU fp32")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
