"""Load a Hugging Face decoder, switch its attention, add LoRA (peft), wrap it with its task."""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from unittest import mock

import torch

from .._optional import require
from .config import ConfigError
from .tasks import Task

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


class TaskModel(torch.nn.Module):
    """The peft model plus its task; ``forward(batch)`` returns the task's loss sum.

    With ``attn="anymask"`` the mask comes from ``anymask.hf`` (``set_mask`` + per-call kwargs +
    ``position_ids`` resets); any other transformers implementation gets the task's mask as an
    explicit 4-D mask (a dense bool tensor, or a BlockMask for ``flex_attention``).
    ``fused_head``: the LM head + cross-entropy through Liger's fused kernel.
    """

    def __init__(self, peft_model: torch.nn.Module, task: Task, attn: str = "anymask", fused_head: bool = False):
        super().__init__()
        self.peft = peft_model
        self.task = task
        self.attn = attn
        self.fused_head = fused_head

    def forward(self, batch) -> torch.Tensor:
        return self.task.loss_sum(self.peft, batch, self.attn_kwargs(batch), fused_head=self.fused_head)

    def attn_kwargs(self, batch) -> dict:
        if self.attn == "anymask":
            return self.task.call_kwargs(batch)
        from .baseline import explicit_mask

        return {"attention_mask": explicit_mask(self.task.mask(batch), batch.num_tokens, self.attn,
                                                batch.input_ids.device)}


def load_tokenizer(path: str, gguf_file: str | None = None):
    transformers = require("transformers")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        return transformers.AutoTokenizer.from_pretrained(path, **kwargs)
    except ValueError as exc:  # e.g. a model directory without tokenizer files
        hint = ("" if gguf_file or not any(Path(path).glob("*.gguf")) else
                "; it holds a GGUF file: name it with --gguf-file")
        raise ConfigError(f"cannot load a tokenizer from {path!r}: {' '.join(str(exc).split())}{hint}") from exc


def load_base(path: str, *, dtype: str = "bf16", attn: str = "anymask", gguf_file: str | None = None,
              device: torch.device | str = "cpu", progress: bool = True):
    """The pretrained model at ``path`` (a directory or hub name; ``gguf_file`` inside it);
    ``progress=False`` hides transformers' loading and GGUF conversion bars."""
    transformers = require("transformers")
    if attn == "anymask":
        import anymask.hf  # noqa: F401  (registers the implementation)
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    bars = transformers.utils.logging
    shown = bars.is_progress_bar_enabled()
    quiet = contextlib.ExitStack()
    if not progress:
        bars.disable_progress_bar()
        if gguf_file:  # its conversion bar is plain tqdm, which transformers' switch does not reach
            import transformers.modeling_gguf_pytorch_utils as gguf_utils

            quiet.enter_context(mock.patch.object(gguf_utils, "tqdm", functools.partial(gguf_utils.tqdm, disable=True)))
    try:
        with quiet:
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype],
                                                                     attn_implementation=attn, **kwargs)
    except ValueError as exc:  # e.g. a config transformers does not know, an attention it does not have
        raise ConfigError(f"cannot load a model from {path!r}: {str(exc).splitlines()[0]}") from exc
    finally:
        if shown:
            bars.enable_progress_bar()
    return model.to(device)


def prepare(model, task: Task, *, attn: str = "anymask", backend: str = "auto", dtype: str = "bf16",
            lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0, lora_targets="all-linear",
            gradient_checkpointing: bool = False, seed: int = 0, liger: bool = False, fused_lora: bool = False):
    """Set the mask policy, swap in Liger's RMSNorm/SwiGLU when ``liger`` (see
    :mod:`anymask.train.fused`), add LoRA adapters (initialised from ``seed``; with the fused
    forward of :mod:`anymask.train.fused_lora` when ``fused_lora``); returns the peft model.

    The adapters are fp32 on a bf16/fp16 model (as peft makes them by default): AdamW's updates at a
    decayed learning rate are below half a bf16 step of the weights they change, and bf16 adapters
    lost them (a third to nine tenths of ``lora_A`` unchanged per step).  The fused LoRA computes with
    them in the model's dtype (it casts them per call); peft's own forward (``--kernels none``, or
    dropout) casts its input to fp32 and computes the LoRA branch there."""
    peft = require("peft")
    model = model.to(DTYPES[dtype])
    if liger:
        from .fused import apply_liger

        apply_liger(model)
    model.config.use_cache = False
    if attn == "anymask":
        import anymask.hf

        _without_attention_dropout(model)
        anymask.hf.set_mask(model, task.spec, backend=backend)
    elif model.config._attn_implementation != attn:
        model.set_attn_implementation(attn)
    if gradient_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # its name from transformers 5.25 on
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        p.requires_grad_(False)
    config = peft.LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                             target_modules=lora_targets, task_type="CAUSAL_LM")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = peft.get_peft_model(model, config, autocast_adapter_dtype=True)  # fp32 adapters on bf16
    if fused_lora:
        from . import fused_lora as FL

        FL.apply(peft_model)
    return peft_model


def decoder_layers(peft_model) -> list[torch.nn.Module]:
    """The decoder layers (for FSDP2's per-layer sharding)."""
    base = peft_model.get_base_model()
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise ConfigError(f"cannot find decoder layers in {type(base).__name__} for FSDP2")
    return list(layers)


def _without_attention_dropout(model) -> None:
    """anymask's attention has no dropout: set the model's attention-probability dropout to 0 (what
    transformers passes as ``dropout``: a config value copied to the attention modules, or their
    ``attn_dropout`` layer), saying so when it was not 0 already."""
    found = []
    for module in model.modules():
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate:
            found.append(rate)
            module.attention_dropout = 0.0
        layer = getattr(module, "attn_dropout", None)
        if isinstance(layer, torch.nn.Dropout) and layer.p:
            found.append(layer.p)
            layer.p = 0.0
    for name in ("attention_dropout", "attn_pdrop"):
        if getattr(model.config, name, 0.0):
            found.append(getattr(model.config, name))
            setattr(model.config, name, 0.0)
    if found:
        print(f"anymask train: attention dropout {max(found)} -> 0 (anymask attention has no dropout; "
              "--attn sdpa keeps it)", file=sys.stderr)


def load_adapter(model_path: str | Path, adapter_dir: str | Path, *, task: str | None = None, dtype: str = "fp32",
                 gguf_file: str | None = None, backend: str = "auto", device="cpu"):
    """A trained model for inference: base weights + the saved LoRA adapter, the task's mask set.

    ``task`` picks the mask: ``sft`` causal, ``embedding``/``diffusion`` bidirectional,
    ``prefix_lm`` prefix-LM (bidirectional prompt, causal continuation).  By default it is the task
    the adapter was trained for, as ``anymask train`` recorded it; passing another one is an error.

    A ``prefix_lm`` model reads the prompt's length from each call: ``prefix_lengths=[P]`` (or
    ``token_type_ids``); a call without either is all prompt (bidirectional), as ``generate``'s
    prefill is, so scoring prompt + completion in one forward needs ``prefix_lengths``::

        model(input_ids=ids, prefix_lengths=[P])   # P: the prompt's token count
    """
    from . import checkpoint
    from .config import TASKS

    if not isinstance(model_path, (str, Path)):
        raise TypeError(f"load_adapter(model_path, adapter_dir): model_path is the base model's directory or hub "
                        f"name (it loads the model with anymask's attention), not a {type(model_path).__name__}")
    if not Path(adapter_dir).is_dir():
        raise ConfigError(f"adapter directory {str(adapter_dir)!r} not found")
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        inside = Path(adapter_dir) / "adapter"
        hint = (f"; anymask train saves it in {str(inside)!r}" if (inside / "adapter_config.json").is_file()
                else " (no adapter_config.json)")
        raise ConfigError(f"{str(adapter_dir)!r} holds no adapter{hint}")
    saved = checkpoint.saved_task(Path(adapter_dir))
    if task is None and saved is None:
        raise ConfigError(f"{adapter_dir} does not say which task it was trained for; pass task= "
                          f"({', '.join(TASKS)}): it sets the attention mask")
    if task is not None and task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if task is not None and saved is not None and task != saved:
        raise ConfigError(f"{adapter_dir} was trained for task {saved!r}, not {task!r}: its mask would be wrong")
    task = task or saved
    peft = require("peft")
    import anymask.hf

    base = load_base(str(model_path), dtype=dtype, gguf_file=gguf_file, device=device)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    spec = {"sft": "causal", "prefix_lm": "prefix_lm"}.get(task, "bidirectional")
    anymask.hf.set_mask(model, spec, backend=backend)
    return model.eval()
