"""One PNG per mask kind: TFLOP/s (visible pairs only) of every variant across sequence lengths,
one panel per (dtype, pass, heads, head dim).  matplotlib is imported lazily (``anymask[bench]``).

``auto`` is timed in a second stage, call by call against the best forced backend, so its own
times are not comparable with the first stage's; it is drawn at the best backend's TFLOP/s divided
by the paired ratio ``auto_vs_best`` (the number the summary reports)."""

from __future__ import annotations

from pathlib import Path

from .._optional import pyplot
from .runner import Row


def plot_masks(rows: list[Row], out_dir: Path, title: str = "") -> list[Path]:
    plt = pyplot()

    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    order = list(dict.fromkeys(r.variant for r in rows if r.variant != "auto"))
    colour = {v: palette[i % len(palette)] for i, v in enumerate(order)}
    colour["auto"] = "black"
    paths = []
    for mask in dict.fromkeys(r.mask for r in rows):
        mine = [r for r in rows if r.mask == mask and r.status == "ok" and r.tflops is not None]
        configs = list(dict.fromkeys((r.dtype, r.mode, r.heads, r.kv_heads, r.head_dim) for r in mine))
        if not configs:
            continue
        fig, axes = plt.subplots(1, len(configs), figsize=(4.2 * len(configs), 3.6), squeeze=False)
        for ax, cfg in zip(axes[0], configs):
            dtype, mode, hq, hkv, d = cfg
            these = [r for r in mine if (r.dtype, r.mode, r.heads, r.kv_heads, r.head_dim) == cfg]
            for variant in dict.fromkeys(r.variant for r in these):
                pts = sorted((r.seq, _throughput(r, these)) for r in these if r.variant == variant)
                pts = [(x, y) for x, y in pts if y is not None]
                ls = "--" if variant.startswith("raw_") else "-"
                ax.plot([x for x, _ in pts], [y for _, y in pts], ls, marker="o", label=variant,
                        color=colour[variant], linewidth=2.5 if variant == "auto" else 1.5)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s (visible pairs)")
            heads = f"{hq}" if hq == hkv else f"{hq}:{hkv}"
            ax.set_title(f"{dtype} {mode}, H{heads} D{d}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{mask}  {title}".strip(), fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{mask}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _throughput(row: Row, same_config: list[Row]) -> float | None:
    """TFLOP/s to draw: the row's own, or for ``auto`` the best's over the paired ratio."""
    if row.variant != "auto":
        return row.tflops
    best = [r for r in same_config if r.variant == row.best and r.seq == row.seq and r.batch == row.batch]
    if not best or not row.auto_vs_best:
        return None
    return best[0].tflops / row.auto_vs_best
