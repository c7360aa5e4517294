"""GPU check of the Hugging Face integration: one LoRA step per mask mode on a Llama-3.2-1B-shaped
random-init model in bf16, ``attn_implementation="anymask"`` against transformers' own sdpa given
the equivalent explicit 4-D mask.

    python scripts/gpu_hf_check.py [--batch 4 --seq 2048 --layers 16]

Prints a table (loss, relative loss difference, LoRA-gradient error, step time, peak memory,
backend anymask chose) and one JSON line; exits 1 when a mode is not finite or not close.  The
sdpa columns are transformers' sdpa given the explicit additive 4-D mask (also for plain causal,
so its speed there is not sdpa's is_causal fast path).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import anymask
import anymask.hf
from anymask import masks

MODES = ("causal", "bidirectional", "padded_bidirectional", "packed_causal", "packed_bidirectional",
         "padded_prefix_lm")
LOSS_RTOL = 2e-2  # bf16 end to end, 16 layers
GRAD_RTOL = 0.1  # relative L2 error of all LoRA gradients together


def build_model(layers: int, device: str):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                      rope_theta=500000.0, tie_word_embeddings=True, attention_dropout=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, lora)


def base_of(mode: str) -> str:
    """causal / bidirectional / prefix_lm of a mode name such as ``packed_causal``."""
    return mode.split("_", 1)[1] if mode.startswith(("packed_", "padded_")) else mode


def make_case(mode: str, B: int, S: int, device: str):
    """(anymask inputs, reference inputs, anymask spec) for one mode; the reference carries an
    explicit additive 4-D mask built here from the rules."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128256, (B, S), generator=g)
    q = torch.arange(S).view(1, S, 1)
    kv = torch.arange(S).view(1, 1, S)
    valid = torch.ones(B, S, dtype=torch.long)
    ours, ref = {"input_ids": ids}, {"input_ids": ids}
    base = base_of(mode)
    allowed = (kv <= q).expand(B, S, S) if base in ("causal", "prefix_lm") else torch.ones(B, S, S, dtype=torch.bool)
    if mode.startswith("packed"):
        lengths = [S // 8, S // 4, S // 2, S - S // 8 - S // 4 - S // 2]
        docs = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).expand(B, S)
        pos = torch.cat([torch.arange(n) for n in lengths]).expand(B, S)
        allowed = allowed & (docs[:, :, None] == docs[:, None, :])
        ours["position_ids"] = ref["position_ids"] = pos
    else:
        if mode.startswith("padded"):
            valid[1:, : S // 8] = 0  # left padding on every row but the first
            ours["attention_mask"] = valid
        if base == "prefix_lm":
            prefix = torch.full((B,), S // 4)
            ours["prefix_lengths"] = prefix
            allowed = allowed | (kv < prefix.view(B, 1, 1))
        v = valid.bool()
        allowed = allowed & v[:, None, :] & v[:, :, None]
    lowest = torch.finfo(torch.bfloat16).min
    additive = torch.zeros(B, 1, S, S, dtype=torch.bfloat16).masked_fill(~allowed[:, None], lowest)
    ref["attention_mask"] = additive
    seen = valid.clone()
    seen[:, 1:] &= valid[:, :-1]
    labels = ids.masked_fill(seen == 0, -100)
    to = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return to({**ours, "labels": labels}), to({**ref, "labels": labels}), base


def step(model, inputs):
    """Forward + backward, twice (the second is timed); returns (loss, {name: grad}, s, peak GiB)."""
    cuda = torch.cuda.is_available()
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        loss = model(**inputs).loss
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, dt, (torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"))


def backend_for(model, B, S, mode, inputs, device):
    """Which anymask backend runs layer attention for this mode (asked, not run)."""
    cfg = model.config
    q = torch.empty(B, cfg.num_attention_heads, S, cfg.head_dim, device=device, dtype=torch.bfloat16,
                    requires_grad=True)
    k = torch.empty(B, cfg.num_key_value_heads, S, cfg.head_dim, device=device, dtype=torch.bfloat16)
    base = {"causal": masks.causal(), "bidirectional": masks.full(),
            "prefix_lm": masks.prefix_lm(inputs.get("prefix_lengths", torch.tensor([0])))}[base_of(mode)]
    mask = base
    if "position_ids" in inputs:
        pos = inputs["position_ids"]
        ids = torch.zeros_like(pos)
        ids[:, 1:] = (torch.diff(pos, dim=-1) != 1).long().cumsum(-1)
        mask = mask & masks.documents(ids)
    if "attention_mask" in inputs:
        mask = mask & masks.padding(inputs["attention_mask"])
    return anymask.which_backend(q, k, k, mask)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--device", default="cuda", help="cuda (the check); cpu only for a smoke test of the script")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    import transformers

    model = build_model(args.layers, args.device)
    model.train()
    rows, ok = [], True
    for mode in MODES:
        ours_in, ref_in, spec = make_case(mode, args.batch, args.seq, args.device)
        model.base_model.model.set_attn_implementation("sdpa")
        ref_loss, ref_grads, ref_t, ref_mem = step(model, ref_in)
        anymask.hf.set_mask(model, spec)
        loss, grads, t, mem = step(model, ours_in)
        num = sum((grads[n] - ref_grads[n]).norm() ** 2 for n in ref_grads) ** 0.5
        den = sum(g.norm() ** 2 for g in ref_grads.values()) ** 0.5
        grad_err = float(num / den) if den > 0 else float("nan")
        rel = abs(loss - ref_loss) / abs(ref_loss)
        good = all(math.isfinite(x) for x in (loss, ref_loss, grad_err))
        good = good and rel < LOSS_RTOL and grad_err < GRAD_RTOL and grads.keys() == ref_grads.keys()
        ok &= good
        tokens = args.batch * args.seq
        rows.append(dict(mode=mode, loss=loss, sdpa_loss=ref_loss, rel_loss_diff=rel, grad_rel_err=grad_err,
                         anymask_s=t, sdpa_s=ref_t, anymask_tok_s=tokens / t, sdpa_tok_s=tokens / ref_t,
                         anymask_peak_gib=mem, sdpa_peak_gib=ref_mem,
                         backend=backend_for(model, args.batch, args.seq, mode, ours_in, args.device), ok=good))
    head = (f"{'mode':22} {'loss':>8} {'sdpa':>8} {'rel':>8} {'grad err':>9} {'tok/s':>9} {'sdpa tok/s':>10} "
            f"{'GiB':>6} {'sdpa GiB':>8}  backend  ok")
    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"transformers {transformers.__version__}, torch {torch.__version__}, {where}, "
          f"B={args.batch} S={args.seq} layers={args.layers}, bf16, LoRA r=16 (second of two steps timed)")
    print(head)
    for r in rows:
        print(f"{r['mode']:22} {r['loss']:8.4f} {r['sdpa_loss']:8.4f} {r['rel_loss_diff']:8.1e} "
              f"{r['grad_rel_err']:9.2e} "
              f"{r['anymask_tok_s']:9.0f} {r['sdpa_tok_s']:10.0f} {r['anymask_peak_gib']:6.1f} {r['sdpa_peak_gib']:8.1f}  "
              f"{r['backend']:8} {'yes' if r['ok'] else 'NO'}")
    print(json.dumps({"ok": ok, "transformers": transformers.__version__, "torch": torch.__version__, "rows": rows}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
