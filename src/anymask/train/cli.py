"""``anymask train ...``: the command line of :func:`anymask.train.train`.

``register(subparsers)`` adds the ``train`` subcommand to the ``anymask`` CLI;
``python -m anymask.train ...`` runs it alone (also under ``torchrun``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from .config import DTYPES, KERNELS, PARALLEL, TASKS, TrainConfig


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default, except where there is none to show (None, or off
    for a switch): those say in their help what happens without them."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model directory or hub name (loaded offline when cached); "
                   "for a GGUF file: its directory here and its name in --gguf-file")
    p.add_argument("--task", required=True, choices=TASKS, help="what to train for; it sets the mask and the loss")
    p.add_argument("--data", required=True, help="JSONL training data (fields depend on --task)")
    p.add_argument("--output-dir", default="anymask-train", help="checkpoints, final adapter, metrics.jsonl")
    p.add_argument("--eval-data", help="JSONL eval data (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="fraction of --data held out for eval: "
                   "its last lines (0: no eval; not with --eval-data)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between eval losses (0: at the end)")
    p.add_argument("--gguf-file", help="GGUF file inside --model to load weights and tokenizer from")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="dtype of the model's weights and compute; "
                   "LoRA adapters keep fp32 master weights (the same default on CPU and GPU)")
    p.add_argument("--attn", default="anymask", help="attention implementation (anymask, or a transformers "
                   "one with an explicit mask: sdpa, flex_attention, eager)")
    p.add_argument("--backend", default="auto", help="anymask backend under --attn anymask (auto: dispatch picks)")
    p.add_argument("--kernels", choices=KERNELS, default="auto", help="fused kernels: Liger's RMSNorm, SwiGLU "
                   "and linear cross-entropy (CUDA, liger-kernel) and/or a fused LoRA forward/backward; auto: "
                   "both where they apply; none: transformers' modules and peft's LoRA")
    p.add_argument("--tokens-per-batch", type=int, default=2048, help="packed tokens per micro-batch")
    p.add_argument("--truncate", action="store_true", help="cut examples longer than --tokens-per-batch "
                   "(without it they are an error)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (per process)")
    p.add_argument("--max-steps", type=int, help="optimizer steps to run (default: --epochs of the data)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data, when no --max-steps")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (linear warm-up, then cosine "
                   "decay to 10%% of it)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=0, help="steps of linear learning-rate warm-up")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (0: no clipping)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    p.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (the update is scaled by alpha / r)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the "
                   "backward (less memory, more time)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: final adapter only)")
    p.add_argument("--resume", help="checkpoint directory to resume from, or 'auto' (newest in --output-dir); "
                   "its learning-rate schedule and weight decay go on (default: start at step 0, in an --output-dir "
                   "without checkpoints)")
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA init, data order and diffusion masks")
    p.add_argument("--parallel", choices=PARALLEL, default="none", help="ddp or fsdp2 under torchrun "
                   "(torchrun --nproc-per-node N -m anymask train ...)")
    p.add_argument("--data-shards", type=int, help="data shards (default: the world size)")
    p.add_argument("--temperature", type=float,
                   help=f"embedding: InfoNCE temperature (default: {TrainConfig.temperature})")
    p.add_argument("--mask-token", help="diffusion: mask token (default: the tokenizer's mask, unk or pad token; "
                   "never its EOS)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        model=args.model, task=args.task, data=args.data, output_dir=args.output_dir, eval_data=args.eval_data,
        eval_fraction=args.eval_fraction, gguf_file=args.gguf_file, dtype=args.dtype, attn=args.attn,
        backend=args.backend, kernels=args.kernels, tokens_per_batch=args.tokens_per_batch, truncate=args.truncate,
        grad_accum=args.grad_accum, max_steps=args.max_steps, epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        max_grad_norm=args.max_grad_norm or None, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout, gradient_checkpointing=args.gradient_checkpointing,
        eval_every=args.eval_every, save_every=args.save_every, resume=args.resume, seed=args.seed,
        parallel=args.parallel, data_shards=args.data_shards, progress=not args.no_progress,
        temperature=TrainConfig.temperature if args.temperature is None else args.temperature,
        mask_token=args.mask_token)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    with _one_line_warnings():
        return _run(args, config)


@contextlib.contextmanager
def _one_line_warnings():
    """Warnings as ``anymask train: warning: ...`` lines, not Python's file:line and source."""
    saved = warnings.formatwarning
    warnings.formatwarning = lambda message, category, *rest, **kw: (
        f"anymask train: warning: {message}\n" if category is UserWarning else
        f"anymask train: {category.__name__}: {message}\n")
    try:
        yield
    finally:
        warnings.formatwarning = saved


def _run(args: argparse.Namespace, config) -> int:
    from .._optional import MissingDependency
    from .config import ConfigError
    from .data import DataError
    from .loop import train

    try:
        if args.temperature is not None and args.task != "embedding":
            raise ConfigError(f"--temperature is for --task embedding (its InfoNCE loss); --task {args.task} "
                              "has none: drop it")
        config.validate()
        result = train(config)
    except DataError as exc:
        print(f"anymask train: bad data: {exc}", file=sys.stderr)
        return 2
    except MissingDependency as exc:
        print(f"anymask train: error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"anymask train: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a model that cannot load (transformers raises OSError), or an output write
        print(f"anymask train: {describe_os_error(exc, config)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (see loop._sigterm_as_interrupt)
        if os.environ.get("RANK", "0") == "0":
            print(f"anymask train: interrupted; {_where_to_go_on(config)}", file=sys.stderr)
        return 130
    if result.adapter_dir and os.environ.get("RANK", "0") == "0":
        print(summary(result))
    return 0


def _where_to_go_on(config: TrainConfig) -> str:
    """After an interrupt: the newest checkpoint to resume from, or that there is none."""
    from . import checkpoint

    newest = checkpoint.latest(config.output_dir)
    if newest is None:
        again = ("delete --output-dir's metrics.jsonl or choose another --output-dir"
                 if (Path(config.output_dir) / "metrics.jsonl").exists() else "run the same command")
        return ("no checkpoint was saved" + ("" if config.save_every else " (--save-every N saves them)")
                + f"; to start again, {again}")
    return f"the newest checkpoint is {newest}: go on with --resume auto"


def describe_os_error(exc: OSError, config: TrainConfig) -> str:
    """One line for an ``OSError`` out of a run: a file in ``--output-dir`` that cannot be written,
    else the model (or its files) that cannot be loaded."""
    first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    out = os.path.abspath(config.output_dir)
    for name in (exc.filename, exc.filename2):
        if isinstance(name, (str, os.PathLike)) and os.path.commonpath([os.path.abspath(name), out]) == out:
            return f"cannot write to --output-dir {config.output_dir!r}: {first}"
    return f"cannot load {config.model!r} or its files: {first}"


def summary(result) -> str:
    """The line a finished run prints: steps, first and last loss (of the steps that had a loss
    unit), the last eval loss, where the adapter is and which kernels ran."""
    losses = [x for x in result.losses if x is not None]
    steps = len(result.history)
    if not steps:
        text = "nothing left to train (resumed at the run's last step)"
    else:
        text = f"trained {steps} step{'' if steps == 1 else 's'}: " + (
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "none had a loss unit")
    if result.evals:
        text += f", eval loss {result.evals[-1]['eval_loss']:.4f}"
    return text + f"; adapter in {result.adapter_dir}; kernels: {result.kernels}"


def register(subparsers) -> argparse.ArgumentParser:
    """Add ``train`` to the ``anymask`` CLI's subparsers."""
    p = subparsers.add_parser("train", help="LoRA fine-tuning with the mask a task needs",
                              description="LoRA fine-tuning of a Hugging Face decoder with the mask its task needs "
                              "(sft, prefix_lm, embedding, diffusion) on packed JSONL data.",
                              formatter_class=HelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anymask train", description="LoRA fine-tuning with any mask.",
                                     formatter_class=HelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))
