"""Training throughput on the GPU: anymask vs transformers' own attention, per task.

A Llama-3.2-1B-shaped model (random init: hidden 2048, 16 layers, 32 heads, 8 kv heads,
intermediate 8192, vocab 128256), bf16, LoRA r=16 on every linear layer, one packed row of
``--tokens`` tokens per step (default 16384) built from documents of 256-4096 tokens.  For each task
(sft, prefix_lm, embedding, diffusion) it trains a few steps with

    anymask         attn_implementation="anymask", documents from position_ids (anymask.hf)
    sdpa            transformers' sdpa with the task's explicit 4-D bool mask
    flex_attention  transformers' flex_attention with a BlockMask of the same mask

through the same training step as ``anymask train`` (:func:`anymask.train.loop.train_step`), and
reports tokens/s (median over the timed steps) and peak memory.  An arm is ``ATTN[:KERNELS]``, the
second part ``anymask train --kernels`` (auto: Liger's fused RMSNorm/SwiGLU/linear cross-entropy
where installed + the fused LoRA; none: transformers' modules and peft's LoRA).  The default arms are anymask as ``anymask train``
runs it (``anymask:auto``) against transformers as it comes (``sdpa:none``, ``flex_attention:none``);
``speedup_vs_best`` is over the best of those, ``speedup_same_kernels`` over the best peer run with
the same kernels.  ``--profile`` adds a CUDA-time breakdown of one timed step per arm
(``profile.txt``).  Writes ``train_bench.csv`` and ``train_bench.json`` to ``$OUT`` (or ``--out``)
and prints one JSON line at the end.

    PYTHONPATH=src python3 scripts/gpu_train_bench.py            # on the H200, < 8 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ARMS = ("anymask:auto", "sdpa:none", "flex_attention:none")
TASKS = ("sft", "prefix_lm", "embedding", "diffusion")
MODEL = dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=True,
             rope_theta=500000.0, attention_dropout=0.0)
TINY = dict(MODEL, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, vocab_size=1024)  # --tiny: a CPU smoke test of this script
MASK_TOKEN_ID = 1023


def doc_lengths(rng: random.Random, total: int, lo: int = 256, hi: int = 4096) -> list[int]:
    """Document lengths in [lo, hi] that sum to exactly ``total``."""
    out, rem = [], total
    while rem > 0:
        n = rng.randint(lo, hi)
        if rem - n < lo:
            n = rem if rem <= hi else rem // 2
        out.append(n)
        rem -= n
    return out


def make_row(task: str, tokens: int, seed: int, vocab: int):
    """One packed row of exactly ``tokens`` tokens for ``task`` (random token ids)."""
    from anymask.train.packing import Packed

    rng = random.Random(seed)
    lengths = doc_lengths(rng, tokens)
    # query/positive pairs: an even number of documents, and two pairs at least (in-batch negatives;
    # a row of one pair has no loss unit, and its step would update nothing)
    while task == "embedding" and (len(lengths) % 2 or len(lengths) < 4):
        i = max(range(len(lengths)), key=lengths.__getitem__)
        lengths[i:i + 1] = [lengths[i] // 2, lengths[i] - lengths[i] // 2]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (1, tokens), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).unsqueeze(0)
    if task in ("sft", "prefix_lm"):
        prompt_lens = [int(n * rng.uniform(0.2, 0.8)) for n in lengths]
    elif task == "embedding":
        prompt_lens = [n if k % 2 == 0 else 0 for k, n in enumerate(lengths)]
    else:
        prompt_lens = [0] * len(lengths)
    prompt = torch.cat([torch.arange(n) < p for n, p in zip(lengths, prompt_lens)]).unsqueeze(0)
    return Packed(ids, pos, doc, prompt, tuple(lengths), seed)


def run_one(task_name: str, arm: str, args) -> dict:
    import transformers

    import anymask.hf  # noqa: F401
    from anymask.attention import which_backend
    from anymask.train import fused, model as M, tasks
    from anymask.train.config import TrainConfig
    from anymask.train.distributed import Dist
    from anymask.train.loop import train_step

    attn, _, kernels = arm.partition(":")
    kernels = kernels or "auto"
    dev = torch.device(args.device)
    shape = TINY if args.tiny else MODEL
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**shape)
    cfg._attn_implementation = attn
    with torch.device(dev):
        base = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    task = tasks.make(task_name, mask_token_id=MASK_TOKEN_ID)
    liger, lora = fused.resolve(kernels, base, dev)
    peft_model = M.prepare(base, task, attn=attn, dtype="bf16", lora_r=16, lora_alpha=32,
                           gradient_checkpointing=args.checkpointing, liger=liger, fused_lora=lora)
    module = M.TaskModel(peft_model, task, attn, fused_head=fused.fused_head(peft_model, liger))
    kernels_used = "+".join(k for k, on in (("liger", liger), ("lora", lora)) if on) or "none"
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    tcfg = TrainConfig(model="", task=task_name, data="", max_grad_norm=1.0)
    d = Dist(0, 1, dev, "none")
    rows = [make_row(task_name, args.tokens, 1000 + i, shape["vocab_size"]).to(dev)
            for i in range(args.warmup + args.steps)]
    backend = attn
    if attn == "anymask":
        S, H, D = args.tokens, shape["num_attention_heads"], shape["hidden_size"] // shape["num_attention_heads"]
        q = torch.empty(1, H, S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.empty(1, shape["num_key_value_heads"], S, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
        backend = "anymask:" + which_backend(q, k, k, task.mask(rows[0]))
        del q, k  # 80 MiB at the default shape: they showed up as anymask's extra peak memory
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, row in enumerate(rows):
        profiling = args.profile and i == args.warmup and dev.type == "cuda"
        prof = _profiler() if profiling else contextlib.nullcontext()
        t0 = time.perf_counter()
        with prof:
            losses.append(train_step(module, [row], task, opt, sched, params, tcfg, d))
            sync()
        if losses[-1] is None:  # no loss unit: the step did nothing, and timing it would flatter the arm
            raise ValueError(f"{task_name} row {i} has no loss unit ({task.units})")
        if i >= args.warmup and not profiling:
            times.append(time.perf_counter() - t0)
        if profiling:
            _write_profile(prof, f"{task_name} {arm} ({backend}, kernels {kernels_used})", Path(args.out))
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else 0
    del module, peft_model, base, opt, rows
    _free()
    step_s = statistics.median(times)
    return {"task": task_name, "attn": attn, "arm": arm, "kernels": kernels_used, "backend": backend,
            "tokens_per_step": args.tokens,
            "tokens_per_s": round(args.tokens / step_s, 1), "step_ms": round(1000 * step_s, 1),
            "peak_mem_gb": round(peak / 2**30, 2), "loss_first": round(losses[0], 4),
            "loss_last": round(losses[-1], 4), "timed_steps": len(times)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (a profiled step is not timed)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (compilation, autotuning)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--arms", default=",".join(ARMS), help="ATTN[:KERNELS], comma-separated (see above)")
    p.add_argument("--profile", action="store_true", help="CUDA-time breakdown of one timed step per arm")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip the remaining runs after this long")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a tiny model (smoke-test the script, e.g. on the CPU)")
    p.add_argument("--replot", metavar="JSON", help="only redraw the plot of a saved train_bench.json (to --out)")
    p.add_argument("--commit", help="record this commit in the results (default: git, else $ANYMASK_COMMIT)")
    args = p.parse_args(argv)
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        if args.commit:
            saved["env"]["commit"] = args.commit
            Path(args.replot).write_text(json.dumps(saved, indent=1))
        plot(saved, Path(args.out) / "train_bench.png")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu --tiny)", file=sys.stderr)
        return 2
    import transformers

    start, results = time.perf_counter(), []
    for task in args.tasks.split(","):
        for arm in args.arms.split(","):
            if time.perf_counter() - start > args.budget_s:
                results.append({"task": task, "arm": arm, "error": "skipped: time budget"})
                continue
            t0 = time.perf_counter()
            try:
                r = run_one(task, arm, args)
            except Exception as exc:  # one failing implementation must not hide the others
                r = {"task": task, "arm": arm, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                _free()
            r["wall_s"] = round(time.perf_counter() - t0, 1)
            results.append(r)
            print(json.dumps(r), flush=True)
    _speedups(results)
    env = {"gpu": torch.cuda.get_device_name() if args.device == "cuda" else args.device, "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "model": TINY if args.tiny else MODEL, "lora_r": 16, "dtype": "bf16", "tokens_per_step": args.tokens,
           "doc_lengths": [256, 4096], "checkpointing": args.checkpointing, "commit": args.commit or _commit()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_bench.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    keys = ["task", "arm", "attn", "kernels", "backend", "tokens_per_s", "step_ms", "peak_mem_gb", "speedup_vs_best",
            "mem_vs_best", "speedup_same_kernels", "loss_first", "loss_last", "timed_steps", "wall_s", "error"]
    with open(out / "train_bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    _table(results)
    try:
        plot({"env": env, "results": results}, out / "train_bench.png")
    except Exception as exc:  # matplotlib missing or broken: the numbers are written already
        print(f"no plot: {type(exc).__name__}: {exc}", file=sys.stderr)
    print(json.dumps({"train_bench": [{k: r.get(k) for k in ("task", "arm", "tokens_per_s", "peak_mem_gb",
                                                               "speedup_vs_best", "speedup_same_kernels")}
                                      for r in results],
                      "wall_s": round(time.perf_counter() - start, 1)}))
    return 0


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("ANYMASK_COMMIT", "unknown")


def plot(saved: dict, path: Path) -> None:
    """Bars of tokens/s per task and arm, peak memory written on each bar; a PNG at ``path``."""
    from anymask._optional import pyplot

    plt = pyplot()

    done = [r for r in saved["results"] if "tokens_per_s" in r]
    tasks = list(dict.fromkeys(r["task"] for r in done))
    arms = list(dict.fromkeys(r["arm"] for r in done))
    width = 0.8 / max(len(arms), 1)
    fig, ax = plt.subplots(figsize=(2.4 * len(tasks) + 2, 4.6))
    for j, arm in enumerate(arms):
        for i, task in enumerate(tasks):
            row = next((r for r in done if r["task"] == task and r["arm"] == arm), None)
            if row is None:
                continue
            x = i + (j - (len(arms) - 1) / 2) * width
            bar = ax.bar(x, row["tokens_per_s"] / 1000, width, color=f"C{j}", label=arm if i == 0 else None)
            ax.annotate(f"{row['peak_mem_gb']:.0f} GB", (x, bar[0].get_height()), ha="center", va="bottom",
                        fontsize=7, rotation=90, xytext=(0, 2), textcoords="offset points")
    env = saved["env"]
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel("thousand tokens/s (higher is better)")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
    ax.set_title(f"LoRA fine-tuning step, {env['tokens_per_step']} packed tokens, {env['dtype']}, {env['gpu']}\n"
                 f"torch {env['torch']}, transformers {env['transformers']}, commit {env.get('commit', 'unknown')}; "
                 "labels: peak memory", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", ncol=len(arms), title="arm = attention:kernels", title_fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _speedups(results: list[dict]) -> None:
    """Each anymask arm's tokens/s over the best transformers arm as it comes (kernels ``none``) and
    its memory over that arm's; and over the best transformers arm with the same kernels."""
    done = [r for r in results if "tokens_per_s" in r]
    for r in done:
        if r["attn"] != "anymask":
            continue
        peers = [p for p in done if p["task"] == r["task"] and p["attn"] != "anymask"]
        plain = [p for p in peers if p["kernels"] == "none"]
        same = [p for p in peers if p["kernels"] == r["kernels"]]
        if plain:
            best = max(plain, key=lambda p: p["tokens_per_s"])
            r["speedup_vs_best"] = round(r["tokens_per_s"] / best["tokens_per_s"], 3)
            if best["peak_mem_gb"]:
                r["mem_vs_best"] = round(r["peak_mem_gb"] / best["peak_mem_gb"], 3)
        if same:
            r["speedup_same_kernels"] = round(r["tokens_per_s"] / max(p["tokens_per_s"] for p in same), 3)


def _profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CUDA])


CATEGORIES = (  # (category, substrings of CUDA kernel names), first match wins
    ("attention", ("_fwd_kernel", "_dkdv_kernel", "_dq_kernel", "_delta_kernel", "flex", "flash", "fmha",
                   "attention", "triton_tem")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")),
    ("liger", ("_rms_norm", "_swiglu", "liger", "cross_entropy_kernel", "element_mul")),
    ("norm/act/elementwise", ("elementwise", "vectorized", "unrolled", "reduce", "softmax", "cat", "copy",
                              "index", "fill", "triton_")),
)


def _write_profile(prof, title: str, out: Path) -> None:
    """Append ``title``'s per-category and top-kernel CUDA times (ms per step) to ``out/profile.txt``."""
    kernels: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name] = kernels.get(e.name, 0.0) + e.device_time_total / 1000.0
    cats: dict[str, float] = {}
    for name, ms in kernels.items():
        low = name.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
    total = sum(kernels.values())
    lines = [f"== {title}: {total:.1f} ms of CUDA kernels in one step"]
    lines += [f"   {c:<22} {ms:8.1f} ms {100 * ms / total:5.1f}%" for c, ms in sorted(cats.items(), key=lambda x: -x[1])]
    lines += [f"   {ms:8.2f} ms  {name[:110]}" for name, ms in sorted(kernels.items(), key=lambda x: -x[1])[:25]]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "profile.txt", "a") as f:
        f.write("\n".join(lines) + "\n\n")
    print("\n".join(lines[:8]), flush=True)


def _table(results: list[dict]) -> None:
    print(f"{'task':<10} {'arm':<21} {'backend':<18} {'tok/s':>9} {'GB':>6} {'x best':>7} {'x same':>7}")
    for r in results:
        if "error" in r:
            print(f"{r['task']:<10} {r['arm']:<21} {r['error']}")
            continue
        print(f"{r['task']:<10} {r['arm']:<21} {r['backend']:<18} {r['tokens_per_s']:>9.0f} "
              f"{r['peak_mem_gb']:>6.1f} {r.get('speedup_vs_best', ''):>7} {r.get('speedup_same_kernels', ''):>7}")


if __name__ == "__main__":
    sys.exit(main())
