"""Greedy decoding speed of a random-init Llama: transformers' sdpa against anymask (causal, auto).

Decoding runs one query per layer per token, so anymask's host time per call (validation, dispatch,
mask building) is what it adds.  The arms alternate round by round on one model, and each prints one
JSON line (median and best ms per token over the rounds); a last line gives anymask / sdpa.

    python scripts/decode_probe.py                                   # 8 tiny layers on CPU
    python scripts/decode_probe.py --device cuda --dtype bf16 --layers 16 --hidden 2048 --heads 32 --kv-heads 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import anymask.hf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    config = LlamaConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=4096)
    model = LlamaForCausalLM(config).to(args.device, DTYPES[args.dtype]).eval()
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt), device=args.device)  # [1, prompt]

    def generate() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  do_sample=False)

    def ms_per_token() -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        generate()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.new_tokens * 1e3

    arms = {"sdpa": lambda: model.set_attn_implementation("sdpa"),
            "anymask": lambda: anymask.hf.set_mask(model, "causal")}
    tokens, times = {}, {name: [] for name in arms}
    for name, switch in arms.items():  # warm-up, and both arms must pick the same tokens
        switch()
        tokens[name] = generate()
    same = torch.equal(tokens["sdpa"], tokens["anymask"])
    for _ in range(args.rounds):
        for name, switch in arms.items():
            switch()
            times[name].append(ms_per_token())
    shape = {k: getattr(args, k) for k in ("device", "dtype", "layers", "hidden", "heads", "kv_heads", "prompt",
                                           "new_tokens")}
    for name, ts in times.items():
        print(json.dumps({"arm": name, "median_ms_per_token": round(statistics.median(ts), 3),
                          "best_ms_per_token": round(min(ts), 3), **shape}))
    print(json.dumps({"anymask_vs_sdpa_median": round(statistics.median(times["anymask"])
                                                      / statistics.median(times["sdpa"]), 3),
                      "same_tokens": same, **shape}))


if __name__ == "__main__":
    main()
