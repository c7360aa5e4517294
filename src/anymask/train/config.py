"""``TrainConfig``: every knob of one training run, shared by the CLI and the Python API."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

TASKS = ("sft", "embedding", "diffusion", "prefix_lm")
PARALLEL = ("none", "ddp", "fsdp2")
DTYPES = ("bf16", "fp32")
KERNELS = ("auto", "liger+lora", "liger", "lora", "none")
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 64 - 1  # what torch.manual_seed takes


class ConfigError(ValueError):
    """A setting that cannot work (unknown task, attention, mask token, checkpoint...): the CLI prints
    it as one line instead of a traceback."""


@dataclass
class TrainConfig:
    """One training run.  Sizes are in tokens; ``tokens_per_batch`` is one packed micro-batch.

    A step consumes ``grad_accum`` micro-batches on every rank, so the global batch of a step is
    ``world_size * grad_accum`` micro-batches.  The data is cut into ``data_shards`` shards
    (default: the world size); each rank packs its own shards, and micro-batch ``j`` of a step
    comes from the rank's shard ``j % shards_per_rank``.  Runs with the same ``data_shards`` and
    the same global batch therefore see the same micro-batches whatever the world size.
    """

    model: str
    task: str
    data: str
    output_dir: str = "anymask-train"
    eval_data: str | None = None
    eval_fraction: float = 0.0  # hold out this fraction of ``data`` (only without ``eval_data``)
    gguf_file: str | None = None  # load ``model`` from this GGUF file inside the model dir
    dtype: str = "bf16"
    attn: str = "anymask"  # or a transformers implementation (sdpa, flex_attention, eager)
    backend: str = "auto"  # anymask backend
    kernels: str = "auto"  # fused kernels: Liger's and/or our LoRA (see train/fused.py): auto, liger+lora, liger, lora, none
    tokens_per_batch: int = 2048
    truncate: bool = False
    grad_accum: int = 1
    max_steps: int | None = None
    epochs: float = 1.0
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: str | list[str] = "all-linear"
    gradient_checkpointing: bool = False
    eval_every: int = 0  # steps; 0 = only at the end (when there is eval data)
    save_every: int = 0  # steps; 0 = only the final adapter
    resume: str | None = None  # a checkpoint dir, or "auto" for the newest in output_dir
    seed: int = 0
    parallel: str = "none"
    data_shards: int | None = None
    progress: bool = True
    temperature: float = 0.05  # embedding: InfoNCE temperature (cosine similarities)
    mask_token: str | None = None  # diffusion: the token that replaces masked tokens
    mask_token_id: int | None = None  # diffusion: the same, as an id (wins over mask_token)

    def validate(self) -> None:
        """Raise :class:`ConfigError` (a ``ValueError``) for settings that cannot work, before anything is loaded."""
        if self.task not in TASKS:
            raise ConfigError(f"unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.parallel not in PARALLEL:
            raise ConfigError(f"unknown parallel mode {self.parallel!r}; choose from {', '.join(PARALLEL)}")
        if self.kernels not in KERNELS:
            raise ConfigError(f"unknown kernels {self.kernels!r}; choose from {', '.join(KERNELS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; choose from {', '.join(DTYPES)}")
        for name in ("tokens_per_batch", "grad_accum", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.task == "embedding" and self.tokens_per_batch < 2:
            raise ConfigError(f"tokens_per_batch {self.tokens_per_batch} cannot hold an embedding pair: a query and "
                              "its positive take 2 tokens at least")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1, got {self.max_steps}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction and self.eval_data is not None:
            raise ConfigError(f"--eval-fraction {self.eval_fraction} holds out part of --data for eval, but "
                              f"--eval-data {self.eval_data} is the eval data: drop one of them")
        if not (isinstance(self.seed, int) and SEED_MIN <= self.seed <= SEED_MAX):
            raise ConfigError(f"seed must be a 64-bit integer (a Python int), from {SEED_MIN} to {SEED_MAX}, "
                              f"got {self.seed!r}")
        for name in ("eval_every", "save_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)
                and self.weight_decay >= 0):
            raise ConfigError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        for name in ("epochs", "lr", "temperature", "lora_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_grad_norm is not None and not self.max_grad_norm >= 0:
            raise ConfigError(f"max_grad_norm must be >= 0 (0 or None: no clipping), got {self.max_grad_norm}")
        if self.lora_dropout > 0 and self.kernels in ("liger+lora", "lora"):
            raise ConfigError(f"--kernels {self.kernels}: the fused LoRA has no dropout; use --lora-dropout 0, "
                              "or --kernels auto / liger to run peft's LoRA with dropout")
        if self.data_shards is not None and self.data_shards < 1:
            raise ConfigError(f"data_shards must be >= 1, got {self.data_shards}")
        if self.resume not in (None, "auto") and not (Path(self.resume) / "state.json").is_file():
            raise ConfigError(f"no checkpoint at {self.resume!r} (no state.json there); "
                              "give a checkpoint directory, or 'auto' for the newest in output_dir")
        self._check_task_options()
        self._check_backend()
        self.model = check_model_path(self.model)
        if self.attn != "anymask":
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            known = ("anymask", "eager", *ALL_ATTENTION_FUNCTIONS.valid_keys())
            if self.attn not in known:
                raise ConfigError(f"unknown attention {self.attn!r}; choose from {', '.join(known)}")

    def _check_task_options(self) -> None:
        """Settings of one task given to another would be ignored: refuse them."""
        if self.task != "diffusion":
            for name in ("mask_token", "mask_token_id"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"{name} is for --task diffusion (the token that replaces masked tokens); "
                                      f"--task {self.task} has no mask token: drop it")

    def _check_backend(self) -> None:
        """An anymask backend that exists, asked for only where anymask's attention runs."""
        if self.backend == "auto":
            return
        from ..backend import get

        try:
            get(self.backend, missing_ok=True)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.attn != "anymask":
            raise ConfigError(f"--backend {self.backend} picks a backend of anymask's attention, but --attn "
                              f"{self.attn} runs transformers' attention: use --attn anymask, or drop --backend")


def check_model_path(model: str) -> str:
    """``model`` with a leading ``~`` expanded; refused when it is a GGUF file (that goes in
    ``gguf_file``), or a path (starting with ``/``, ``.`` or ``~``) that does not exist.  Anything
    else may be a hub name (``org/name``), looked up by transformers."""
    model = str(model)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        raise ConfigError(f"--model {model} is a GGUF file: give its directory as --model and the file name as "
                          f"--gguf-file (--model {str(path.parent)!r} --gguf-file {path.name!r})")
    if model.startswith(("/", ".", "~")) and not path.exists():
        raise ConfigError(f"model path {model!r} does not exist (give a model directory, or a hub name like "
                          "org/name)")
    return str(path) if model.startswith("~") else model
