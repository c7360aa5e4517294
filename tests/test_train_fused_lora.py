"""The fused LoRA forward/backward (``anymask.train.fused_lora``) against peft's own, on the CPU:
the same loss and gradients on a tiny Llama (float64 to rounding; bf16 within peft's own bf16
error against float64), and peft's forward wherever the fused one would not be exact."""

from __future__ import annotations

import pytest
import torch

from anymask.train import fused_lora, model as M, tasks

from .test_train_fused import _err, _row, tiny_llama
from .test_train_helpers import config, tiny_model_dir  # noqa: F401  (fixture)

TASKS = ("sft", "prefix_lm", "embedding", "diffusion")


def _run(task_name: str, dtype: torch.dtype, fused: bool, bias: bool = False, **lora):
    vocab = 512
    task = tasks.make(task_name, mask_token_id=vocab - 1)
    model = tiny_llama(vocab, hidden_size=128, intermediate_size=256, attention_bias=bias, mlp_bias=bias)
    if bias:  # biases start at 0: make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(3))
    peft_model = M.prepare(model, task, attn="sdpa", dtype="fp32", lora_r=8, seed=1, **lora)
    peft_model.to(dtype)
    gen = torch.Generator().manual_seed(2)
    for name, p in sorted(peft_model.named_parameters()):  # B starts at 0: make the adapters non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=gen)
    taken = fused_lora.apply(peft_model) if fused else 0
    module = M.TaskModel(peft_model, task, "sdpa")
    loss = module(_row(vocab, "cpu"))
    loss.backward()
    grads = [p.grad.double() for _, p in sorted(peft_model.named_parameters()) if p.requires_grad]
    return loss.item(), grads, taken


@pytest.mark.parametrize("task,bias", [(t, False) for t in TASKS] + [("sft", True)])
def test_fused_lora_matches_peft_float64(task, bias):
    loss, grads, _ = _run(task, torch.float64, False, bias)
    loss_f, grads_f, taken = _run(task, torch.float64, True, bias)
    assert taken == 7 * 2  # q k v o gate up down, 2 layers
    assert loss_f == pytest.approx(loss, rel=1e-12)
    assert _err(grads_f, grads) < 1e-10


def test_fused_lora_bf16_within_peft_error():
    loss64, g64, _ = _run("sft", torch.float64, False)
    loss16, g16, _ = _run("sft", torch.bfloat16, False)
    loss16_f, g16_f, _ = _run("sft", torch.bfloat16, True)
    assert abs(loss16_f - loss64) <= 2 * abs(loss16 - loss64) + 1e-3 * abs(loss64)
    assert _err(g16_f, g64) <= 2 * _err(g16, g64) + 1e-3


def _layer(**lora):
    peft_model = M.prepare(tiny_llama(), tasks.make("sft"), attn="sdpa", dtype="fp32", lora_r=4, **lora)
    return peft_model, peft_model.get_base_model().model.layers[0].self_attn.q_proj


def test_plain_layer_is_taken_over(monkeypatch):
    peft_model, layer = _layer()
    x = torch.randn(3, layer.in_features)
    assert fused_lora._plain_adapter(layer, x) == "default"
    assert fused_lora._plain_adapter(layer, x.double()) is None  # input not in the adapter's dtype
    fused_lora.apply(peft_model)
    calls = []
    real = fused_lora._LoraLinear.apply
    monkeypatch.setattr(fused_lora._LoraLinear, "apply", lambda *a: calls.append(1) or real(*a))
    layer(x)
    assert calls == [1]


@pytest.mark.parametrize("case", ["dropout", "merged", "disabled", "autocast"])
def test_other_cases_run_peft_forward(case, monkeypatch):
    peft_model, layer = _layer(lora_dropout=0.1 if case == "dropout" else 0.0)
    torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
    x = torch.randn(3, layer.in_features)
    fused_lora.apply(peft_model)
    if case == "merged":
        layer.merge()
    if case == "disabled":
        peft_model.disable_adapter_layers()

    def not_here(*args):
        raise AssertionError("the fused path ran where peft's forward must")

    monkeypatch.setattr(fused_lora._LoraLinear, "apply", not_here)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "autocast"):
        assert fused_lora._plain_adapter(layer, x) is None
        layer(x)  # peft's forward, not the fused one


def test_bf16_model_trains_fp32_master_adapters_through_the_fused_path():
    """A bf16 model keeps fp32 adapters (AdamW's small updates would round away in bf16); the fused
    LoRA takes them, computing in bf16, and its loss and fp32 gradients stay within 2x peft's own bf16
    error against float64."""
    task = tasks.make("sft", mask_token_id=511)

    def run(dtype: str, fused: bool):
        model = tiny_llama(512, hidden_size=128, intermediate_size=256)
        peft_model = M.prepare(model, task, attn="sdpa", dtype=dtype, lora_r=8, seed=1)
        gen = torch.Generator().manual_seed(2)
        for name, p in sorted(peft_model.named_parameters()):
            if "lora_B" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        if fused:
            assert fused_lora.apply(peft_model) == 14
        module = M.TaskModel(peft_model, task, "sdpa")
        loss = module(_row(512, "cpu"))
        loss.backward()
        trainable = [p for _, p in sorted(peft_model.named_parameters()) if p.requires_grad]
        assert {p.dtype for p in trainable} == {torch.float32} and {p.grad.dtype for p in trainable} == {torch.float32}
        return loss.item(), [p.grad.double() for p in trainable], peft_model

    loss32, g32, _ = run("fp32", False)
    loss16, g16, peft16 = run("bf16", False)
    loss16_f, g16_f, _ = run("bf16", True)
    assert peft16.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight.dtype == torch.bfloat16
    assert abs(loss16_f - loss32) <= 2 * abs(loss16 - loss32) + 1e-3 * abs(loss32)
    assert _err(g16_f, g32) <= 2 * _err(g16, g32) + 1e-3


def test_bf16_adapters_take_updates_far_below_a_bf16_step(tiny_model_dir, tmp_path):  # noqa: F811
    """Three steps at a small learning rate on a bf16 model: every lora_A entry moves between the
    checkpoints of steps 2 and 3 (with bf16 adapters most updates rounded away)."""
    from safetensors.torch import load_file

    from anymask.train import train

    from .test_train_checkpoint import _data

    data = _data(tmp_path, "sft", 12)
    train(config(tiny_model_dir, "sft", data, tmp_path / "out", dtype="bf16", lr=2e-5, max_steps=3, save_every=1))
    a, b = (load_file(tmp_path / "out" / f"checkpoint-00000{s}" / "adapter" / "adapter_model.safetensors") for s in (2, 3))
    keys = [k for k in a if "lora_A" in k]
    assert keys and all(a[k].dtype == torch.float32 for k in keys)
    changed = sum(int((a[k] != b[k]).sum()) for k in keys) / sum(a[k].numel() for k in keys)
    assert changed > 0.99
