"""One PNG per mask kind: TFLOP/s (visible pairs only) of every variant across sequence lengths,
one panel per (dtype, pass, heads, head dim); a panel with one sequence length is a bar chart, fastest
on top, each bar labelled.  Files are ``<mask>.png`` for the default tag ``bench``, else
``<tag>-<mask>.png`` (the prefix is kept in the result's meta), so runs with different
``--tag`` in one folder keep their own plots.  matplotlib is imported lazily (``anymask[bench]``).

``auto`` is timed in a second stage, call by call against the best forced backend, so its own
times are not comparable with the first stage's; it is drawn at the best backend's TFLOP/s divided
by the paired ratio ``auto_vs_best`` (the number the summary reports)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from .._optional import pyplot
from .runner import Row


def plot_masks(rows: list[Row], out_dir: Path, title: str = "", prefix: str = "") -> list[Path]:
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
            if len({r.seq for r in these}) == 1:
                _bars(ax, these, colour)
            else:
                _lines(ax, these, colour)
            heads = f"{hq}" if hq == hkv else f"{hq}:{hkv}"
            ax.set_title(f"{dtype} {mode}, H{heads} D{d}", fontsize=9)
            ax.grid(alpha=0.3)
        fig.suptitle(textwrap.fill(f"{mask}  {title}".strip(), width=int(52 * len(configs))), fontsize=10)
        fig.tight_layout()
        path = out_dir / f"{prefix}{mask}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _lines(ax, these: list[Row], colour: dict) -> None:
    """TFLOP/s against sequence length, one line per variant (hand-rolled ones dashed)."""
    for variant in dict.fromkeys(r.variant for r in these):
        pts = sorted((r.seq, _throughput(r, these)) for r in these if r.variant == variant)
        pts = [(x, y) for x, y in pts if y is not None]
        if not pts:
            continue
        wrong = any(r.eligible is False for r in these if r.variant == variant)
        ls = ":" if wrong else "--" if variant.startswith("raw_") else "-"
        ax.plot([x for x, _ in pts], [y for _, y in pts], ls, marker="x" if wrong else "o",
                label=f"{variant} (failed check)" if wrong else variant,
                color=colour[variant], linewidth=2.5 if variant == "auto" else 1.5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length")
    ax.set_ylabel("TFLOP/s (visible pairs)")
    ax.legend(fontsize=7)


def _bars(ax, these: list[Row], colour: dict) -> None:
    """One sequence length: a horizontal bar per variant, fastest on top, hand-rolled ones hatched,
    a backend that failed the float64 check named so and drawn faded."""
    values = {r.variant: _throughput(r, these) for r in these}
    wrong = {r.variant for r in these if r.eligible is False}
    ranked = sorted(((v, y) for v, y in values.items() if y is not None), key=lambda vy: vy[1])
    if not ranked:
        ax.text(0.5, 0.5, "nothing to compare\n(auto alone: no best backend timed)", ha="center", va="center",
                transform=ax.transAxes, fontsize=8)
        ax.set_axis_off()
        return
    names = [v for v, _ in ranked]
    labels = [f"{v} (failed check)" if v in wrong else v for v in names]
    bars = ax.barh(labels, [y for _, y in ranked], color=[colour[v] for v in names], edgecolor="white")
    for bar, name in zip(bars, names):
        bar.set_hatch("//" if name.startswith("raw_") else "")
        bar.set_alpha(0.35 if name in wrong else 1.0)
    top = max(y for _, y in ranked)
    ax.bar_label(bars, fmt="%.0f" if top >= 20 else "%.2g", fontsize=7, padding=2)
    ax.set_xlim(0, top * 1.18)
    ax.set_xlabel(f"TFLOP/s (visible pairs), S={these[0].seq}")
    ax.tick_params(axis="y", labelsize=8)


def _throughput(row: Row, same_config: list[Row]) -> float | None:
    """TFLOP/s to draw: the row's own, or for ``auto`` the best's over the paired ratio."""
    if row.variant != "auto":
        return row.tflops
    best = [r for r in same_config if r.variant == row.best and r.seq == row.seq and r.batch == row.batch]
    if not best or not row.auto_vs_best:
        return None
    return best[0].tflops / row.auto_vs_best
