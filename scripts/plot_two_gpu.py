"""Plot ``two_gpu.json`` (from ``gpu_two_gpu.py``): loss per step of the 1-GPU, DDP and FSDP2 runs
of each task overlaid, and tokens/s per GPU with the scaling efficiency.

usage: python scripts/plot_two_gpu.py two_gpu.json OUT.png
"""

import json
import sys
from pathlib import Path

from anymask._optional import pyplot

STYLE = {"single": dict(lw=4, alpha=0.35), "ddp": dict(ls="--", marker="o", ms=3), "fsdp2": dict(ls=":", marker="x")}


def main(path: Path, out: Path) -> None:
    plt = pyplot()

    doc = json.loads(path.read_text())
    rows = [r for r in doc["rows"] if "losses" in r]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks) + 1, figsize=(4.2 * (len(tasks) + 1), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for r in (r for r in rows if r["task"] == task):
            label = r["mode"] if r["mode"] == "single" else f"{r['mode']} (max rel diff {r['max_rel_loss_diff']:.0e})"
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=label, **STYLE.get(r["mode"], {}))
        ax.set_title(f"{task}: loss, same global batch")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("loss")
    bars = axes[0][-1]
    names = [f"{r['task']}\n{r['mode']}" for r in rows]
    values = [r["tokens_per_s_per_gpu"] / 1e3 for r in rows]
    bars.bar(range(len(rows)), values, color=["#999" if r["mode"] == "single" else "#4a7" for r in rows])
    for i, r in enumerate(rows):
        if r.get("scaling_efficiency"):
            bars.text(i, values[i], f"{r['scaling_efficiency']:.0%}", ha="center", va="bottom", fontsize=8)
    bars.set_xticks(range(len(rows)), names, fontsize=7)
    bars.set_ylabel("k tokens/s per GPU")
    bars.set_title("throughput (label: scaling efficiency)")
    meta = doc["meta"]
    fig.suptitle(f"anymask train, {meta['model']}, LoRA, {meta['dtype']}, {meta['tokens_per_micro_batch']} tokens "
                 f"per GPU per step; {meta['device']} x{meta['gpus']}, torch {meta['torch']}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
