"""`anymask train` on two GPUs (DDP and FSDP2) against one GPU on the same global batch.

A Llama-3.2-1B-shaped model (random init, the dimensions of ``gpu_train_bench.MODEL``) with
SmolLM2's tokenizer (``--tokenizer``: a saved tokenizer directory), bf16, LoRA r=16, packed
micro-batches of ``--tokens`` tokens from documents of 256-4096 tokens (synthetic word text, one
word per token).  For each task (default: ``diffusion``, bidirectional, and ``sft``, causal
within documents) it runs the real CLI three times with the same data shards and global batch:

    single   python -m anymask.train --parallel none --grad-accum 2 --data-shards 2   (GPU 0)
    ddp      torchrun --nproc-per-node 2 ... --parallel ddp   --grad-accum 1 --data-shards 2
    fsdp2    torchrun --nproc-per-node 2 ... --parallel fsdp2 --grad-accum 1 --data-shards 2

so every step sees the same two micro-batches: one GPU accumulates them, two GPUs take one each.
Reads each run's ``metrics.jsonl`` and writes ``two_gpu.json`` / ``two_gpu.csv`` to ``--out``:
the loss curves, the largest relative loss difference to the single-GPU run, tokens/s per GPU
(median over the steps after ``--warmup``) and scaling efficiency = 2-GPU tokens/s / (2 x 1-GPU).

    PYTHONPATH=src python3 scripts/gpu_two_gpu.py --tokenizer .gpu_assets/smollm2-tokenizer --out $OUT
    PYTHONPATH=src python3 scripts/gpu_two_gpu.py --tiny --device cpu ...   # CPU smoke test (gloo)
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_train_bench import MODEL, TINY, doc_lengths  # noqa: E402

WORDS = ("the river stone walks under a quiet bright garden near old city light and small house over "
         "green field with cold wind across blue sea after long day in warm room before dark night").split()
MODES = ("single", "ddp", "fsdp2")
LOSS_RTOL = 1e-2  # bf16: the reductions run in a different order on 1 and 2 GPUs


def make_model(path: Path, tokenizer: str, tiny: bool, device: str) -> None:
    """A random-init Llama of the 1B shape (or tiny) with the tokenizer beside it, in bf16."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tokenizer)
    dims = dict(TINY if tiny else MODEL, vocab_size=max(len(tok), 1024) if tiny else MODEL["vocab_size"])
    cfg = transformers.LlamaConfig(**dims, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)


def make_data(path: Path, task: str, docs: int, lo: int, hi: int, seed: int) -> None:
    """``docs`` JSONL records of ``lo``-``hi`` words (one token each) for ``task``."""
    rng = random.Random(seed)
    lengths = doc_lengths(rng, docs * (lo + hi) // 2, lo, hi)
    with open(path, "w", encoding="utf-8") as f:
        for n in lengths:
            words = " ".join(rng.choice(WORDS) for _ in range(n - 2))
            if task == "sft":
                cut = int(len(words) * rng.uniform(0.2, 0.8))
                cut = words.rfind(" ", 0, cut) if " " in words[:cut] else len(words) // 2
                f.write(json.dumps({"prompt": words[:cut], "completion": words[cut:]}) + "\n")
            else:
                f.write(json.dumps({"text": words}) + "\n")


def run_mode(mode: str, task: str, model: Path, data: Path, out: Path, args) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, ["src", os.environ.get("PYTHONPATH")])),
           "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
    common = ["--model", str(model), "--task", task, "--data", str(data), "--output-dir", str(out),
              "--max-steps", str(args.steps), "--tokens-per-batch", str(args.tokens), "--dtype", args.dtype,
              "--lr", str(args.lr), "--data-shards", "2", "--no-progress", "--seed", "0"]
    if mode == "single":
        cmd = [sys.executable, "-m", "anymask.train", *common, "--parallel", "none", "--grad-accum", "2"]
        if args.device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "anymask.train", *common, "--parallel", mode, "--grad-accum", "1"]
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = "1"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.run_timeout)
    wall = time.perf_counter() - t0
    (out.parent / f"{task}-{mode}.log").write_text(proc.stdout + proc.stderr)
    row = {"task": task, "mode": mode, "gpus": 1 if mode == "single" else 2, "rc": proc.returncode,
           "wall_s": round(wall, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:300]
        return row
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    timed = steps[args.warmup:] or steps
    tok_s = statistics.median(r["tokens"] / r["seconds"] for r in timed)
    peak = [r["peak_memory_bytes"] for r in records if "peak_memory_bytes" in r]
    row.update(losses=[r["loss"] for r in steps], tokens_per_step=steps[0]["tokens"],
               tokens_per_s=round(tok_s), tokens_per_s_per_gpu=round(tok_s / row["gpus"]),
               peak_memory_gb=round(peak[-1] / 1e9, 2) if peak else None,
               eval_loss=[r["eval_loss"] for r in records if "eval_loss" in r])
    return row


def compare(rows: list[dict]) -> None:
    """Loss difference and scaling efficiency of each 2-GPU run against its task's single run."""
    single = {r["task"]: r for r in rows if r["mode"] == "single" and "losses" in r}
    for r in rows:
        base = single.get(r["task"])
        if r["mode"] == "single" or base is None or "losses" not in r:
            continue
        diffs = [abs(a - b) / abs(b) for a, b in zip(r["losses"], base["losses"])]
        r["max_rel_loss_diff"] = max(diffs)
        r["first_step_rel_diff"] = diffs[0]
        r["losses_match"] = max(diffs) <= LOSS_RTOL and len(r["losses"]) == len(base["losses"])
        r["scaling_efficiency"] = round(r["tokens_per_s"] / (2 * base["tokens_per_s"]), 3)


def write(rows: list[dict], out: Path, args) -> None:
    """``two_gpu.json`` and ``two_gpu.csv`` with what has run so far (rewritten after every run)."""
    compare(rows)
    meta = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor(),
            "gpus": torch.cuda.device_count(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__,
            "model": "Llama-3.2-1B shape, random init" if not args.tiny else "tiny",
            "tokens_per_micro_batch": args.tokens, "steps": args.steps, "lr": args.lr, "dtype": args.dtype,
            "loss_rtol": LOSS_RTOL, "commit": os.environ.get("ANYMASK_COMMIT", "")}
    (out / "two_gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    fields = ["task", "mode", "gpus", "rc", "tokens_per_step", "tokens_per_s", "tokens_per_s_per_gpu",
              "scaling_efficiency", "peak_memory_gb", "max_rel_loss_diff", "first_step_rel_diff", "losses_match",
              "wall_s", "error"]
    with open(out / "two_gpu.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True, help="a saved tokenizer directory (SmolLM2's)")
    p.add_argument("--tasks", default="diffusion,sft")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--tokens", type=int, default=16384, help="tokens per micro-batch (one per GPU per step)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s (compilation)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--docs", type=int, default=260)
    p.add_argument("--run-timeout", type=float, default=150)
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--work", default="/tmp/anymask-two-gpu")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model and short documents (CPU smoke test)")
    args = p.parse_args()

    out, work = Path(args.out), Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True)
    lo, hi = (8, 48) if args.tiny else (256, 4096)
    model = work / "model"
    make_model(model, args.tokenizer, args.tiny, args.device)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the runs are other processes; keep GPU 0 free for them
    rows = []
    for task in args.tasks.split(","):
        data = work / f"{task}.jsonl"
        make_data(data, task, args.docs, lo, hi, seed=1)
        for mode in args.modes.split(","):
            row = run_mode(mode, task, model, data, work / f"{task}-{mode}", args)
            rows.append(row)
            shown = {k: v for k, v in row.items() if k not in ("losses", "eval_loss")}
            print(json.dumps(shown), flush=True)
            shutil.copy(work / f"{task}-{mode}.log", out / f"two_gpu-{task}-{mode}.log")
            write(rows, out, args)
    summary = [{k: r.get(k) for k in ("task", "mode", "tokens_per_s_per_gpu", "scaling_efficiency",
                                       "max_rel_loss_diff", "losses_match", "peak_memory_gb", "error")}
               for r in rows]
    print(json.dumps({"two_gpu": summary}))
    return 0 if all(r["rc"] == 0 for r in rows) and all(r.get("losses_match", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
