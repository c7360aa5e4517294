"""``--kernels``: Liger's fused RMSNorm / SwiGLU / linear cross-entropy in ``anymask train``.

On the CPU: the choice (auto leaves Liger out with its reason, asking for it fails clearly), and
the module swap keeps every parameter tensor and name.  On a GPU: each task's loss and LoRA
gradients with Liger + the fused LoRA equal the unfused ones (fp32 tightly; bf16 within the
unfused bf16 run's own error against fp32).
"""

from __future__ import annotations

import pytest
import torch

from anymask._optional import MissingDependency
from anymask.train import fused, model as M, tasks, train
from anymask.train.packing import Packed

from .test_train_helpers import TINY, config, tiny_model_dir, transformers, write_jsonl  # noqa: F401

TASKS = ("sft", "prefix_lm", "embedding", "diffusion")
needs_liger = pytest.mark.skipif(isinstance(fused.probe("liger_kernel.transformers"), str),
                                 reason="liger-kernel is not installed")


def tiny_llama(vocab: int = 512, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**dict(TINY, **overrides), vocab_size=vocab)
    return transformers.LlamaForCausalLM(cfg)


def test_resolve_choices():
    model = tiny_llama()
    cpu = torch.device("cpu")
    assert fused.resolve("none", model, cpu) == (False, False)
    assert fused.resolve("auto", model, cpu) == (False, True)
    assert fused.resolve("lora", model, cpu) == (False, True)
    for kernels in ("liger", "liger+lora"):
        with pytest.raises(MissingDependency, match="CUDA"):
            fused.resolve(kernels, model, cpu)
    with pytest.raises(ValueError, match="unknown kernels"):
        fused.resolve("fast", model, cpu)
    assert "CUDA" in fused.describe("auto", False, True, False, model, cpu)
    assert fused.describe("none", False, False, False, model, cpu).startswith("none")


def test_unknown_kernels_rejected_before_loading():
    from anymask.train import TrainConfig

    with pytest.raises(ValueError, match="unknown kernels"):
        TrainConfig(model="x", task="sft", data="x", kernels="fast").validate()


def test_auto_on_cpu_trains_unfused_and_says_why(tiny_model_dir, tmp_path):  # noqa: F811
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hi.", "completion": f"hi {i}"} for i in range(8)])
    result = train(config(tiny_model_dir, "sft", data, tmp_path / "out", max_steps=1, tokens_per_batch=64))
    assert result.kernels.startswith("fused LoRA") and "no Liger" in result.kernels and "CUDA" in result.kernels


def test_cli_liger_on_cpu_is_a_clear_error(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    from anymask.train.cli import main

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Say hi.", "completion": f"hi {i}"} for i in range(8)])
    rc = main(["--model", tiny_model_dir, "--task", "sft", "--data", data, "--output-dir", str(tmp_path / "o"),
               "--dtype", "fp32", "--kernels", "liger", "--max-steps", "1", "--no-progress"])
    assert rc == 2
    assert "--kernels liger" in capsys.readouterr().err


@needs_liger
def test_swap_keeps_parameter_tensors_and_names():
    from liger_kernel.transformers import LigerRMSNorm, LigerSwiGLUMLP

    model = tiny_llama()
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    counts = fused.apply_liger(model)
    layers = TINY["num_hidden_layers"]
    assert counts == {"rms_norm": 2 * layers + 1, "swiglu": layers}
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before
    assert isinstance(model.model.norm, LigerRMSNorm)
    assert all(isinstance(layer.mlp, LigerSwiGLUMLP) for layer in model.model.layers)
    assert model.model.layers[0].input_layernorm.variance_epsilon == model.config.rms_norm_eps


@needs_liger
def test_plain_head_only_when_frozen_linear():
    peft_model = M.prepare(tiny_llama(), tasks.make("sft"), dtype="fp32", lora_r=4)
    assert fused.plain_head(peft_model)
    assert fused.fused_head(peft_model, True) and not fused.fused_head(peft_model, False)
    assert not fused.fused_head(peft_model, True, "fsdp2")
    peft_model.get_base_model().lm_head.weight.requires_grad_(True)
    assert not fused.plain_head(peft_model)
    with pytest.raises(ValueError, match="frozen"):
        fused.linear_cross_entropy_sum(torch.randn(2, 64), peft_model.get_base_model().lm_head.weight,
                                       torch.tensor([1, 2]))


def test_fused_head_with_no_loss_position_is_zero_and_differentiable():
    hidden = torch.randn(0, 64, requires_grad=True)
    weight = torch.randn(100, 64)
    loss = fused.linear_cross_entropy_sum(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    loss.backward()
    assert hidden.grad.shape == (0, 64)


def _torch_linear_ce(hidden, weight, target, token_weight=None):
    """What Liger's fused linear cross-entropy computes, in PyTorch (a stand-in on the CPU)."""
    ce = torch.nn.functional.cross_entropy(hidden.float() @ weight.float().T, target, reduction="none")
    return (ce if token_weight is None else ce * token_weight).sum()


@pytest.mark.parametrize("task_name", ["sft", "prefix_lm", "diffusion"])
def test_fused_head_wiring_matches_logits_path(task_name, monkeypatch):
    """The fused head's plumbing (decoder hidden states at the loss positions, the tied head
    weight, diffusion's token weights) gives the logits path's loss and LoRA gradients."""
    monkeypatch.setattr(fused, "linear_cross_entropy_sum", _torch_linear_ce)
    results = []
    for fused_head in (False, True):
        results.append(_loss_and_grads(task_name, "fp32", False, torch.device("cpu"), fused_head=fused_head))
    (loss, grads), (loss_f, grads_f) = results
    assert loss_f == pytest.approx(loss, rel=1e-5)
    assert _err(grads_f, grads) < 1e-4


@needs_liger
def test_adapter_names_unchanged_by_the_swap():
    names = {}
    for liger in (False, True):
        task = tasks.make("sft")
        peft_model = M.prepare(tiny_llama(), task, dtype="fp32", lora_r=4, liger=liger)
        names[liger] = sorted(k for k, _ in peft_model.named_parameters() if "lora_" in k)
    assert names[True] == names[False] and names[True]


def _row(vocab: int, device, seed: int = 0) -> Packed:
    lengths = (40, 60, 28, 36)  # an even number of documents: embedding pairs them
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab - 1, (1, sum(lengths)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).unsqueeze(0)
    prompt = torch.cat([torch.arange(n) < n // 3 if k != 1 else torch.arange(n) < n for k, n in
                        enumerate(lengths)]).unsqueeze(0)
    return Packed(ids, pos, doc, prompt, lengths, seed).to(device)


def _loss_and_grads(task_name: str, dtype: str, liger: bool, device, lora: bool = False, fused_head=None):
    """(loss, LoRA gradients in float64) of one row; the fused head follows ``liger`` unless given."""
    vocab = 512
    # embedding at temperature 1: at the default 0.05 these random adapters saturate its InfoNCE (loss 0.0 in
    # fp32, nothing compared) or amplify bf16 rounding ~20x (5.1e-3 vs a 4.8e-3 bound on an H100)
    task = tasks.make(task_name, mask_token_id=vocab - 1, temperature=1.0)
    base = tiny_llama(vocab, hidden_size=128, intermediate_size=256).to(device)
    peft_model = M.prepare(base, task, dtype=dtype, lora_r=8, seed=1, liger=liger, fused_lora=lora)
    gen = torch.Generator(device).manual_seed(2)
    for name, p in sorted(peft_model.named_parameters()):  # B starts at 0: make the adapters non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=gen)
    module = M.TaskModel(peft_model, task, "anymask", fused_head=liger if fused_head is None else fused_head)
    row = _row(vocab, device)
    with torch.no_grad():
        eval_loss = module(row).item()
    loss = module(row)
    assert loss.item() == pytest.approx(eval_loss, rel=1e-6)  # the eval path computes the same loss
    loss.backward()
    grads = [p.grad.double() for _, p in sorted(peft_model.named_parameters()) if p.requires_grad]
    return loss.item(), grads


def _err(a, b) -> float:
    return max((x - y).abs().max().item() / (y.abs().max().item() + 1e-12) for x, y in zip(a, b))


@pytest.mark.gpu
@needs_liger
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Liger's kernels need CUDA")
@pytest.mark.parametrize("task", TASKS)
def test_liger_matches_unfused_on_gpu(task):
    cuda = torch.device("cuda")
    loss32, g32 = _loss_and_grads(task, "fp32", False, cuda)
    loss32_liger, g32_liger = _loss_and_grads(task, "fp32", True, cuda, lora=True)
    assert loss32_liger == pytest.approx(loss32, rel=1e-5)
    assert _err(g32_liger, g32) < 1e-4
    loss16, g16 = _loss_and_grads(task, "bf16", False, cuda)
    loss16_liger, g16_liger = _loss_and_grads(task, "bf16", True, cuda, lora=True)
    torch_err = abs(loss16 - loss32) / abs(loss32)
    assert abs(loss16_liger - loss32) / abs(loss32) <= 2 * torch_err + 1e-3
    assert _err(g16_liger, g32) <= 2 * _err(g16, g32) + 1e-3
