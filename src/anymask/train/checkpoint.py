"""Checkpoints that are never half-written: everything goes to a temporary directory next to the
target, which is renamed into place only when complete.

    output_dir/
      checkpoint-000020/     adapter/ (peft save_pretrained), optimizer.pt, rng.pt, state.json
      adapter/               the final LoRA adapter (peft save_pretrained) + tokenizer

Full (unsharded) state dicts are gathered through ``torch.distributed.checkpoint.state_dict``, so
the same files come out of one process, DDP or FSDP2; rank 0 writes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import re
import shutil
import warnings
from pathlib import Path

import torch

from .distributed import Dist

_CKPT = re.compile(r"^checkpoint-(\d+)$")


@contextlib.contextmanager
def atomic_dir(final: Path, d: Dist):
    """Yield a temporary directory (rank 0 writes into it); on success it replaces ``final``.

    On any error or interrupt the temporary directory is removed and ``final`` is untouched.
    """
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}"
    if d.main:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        yield tmp
        d.barrier()
        if d.main:
            old = final.parent / f".old-{final.name}"
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    d.barrier()


def clean_partial(output_dir: Path) -> None:
    """Remove temporary directories a killed run left behind (never complete checkpoints)."""
    for p in Path(output_dir).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def adapter_state(peft_model) -> dict:
    """The trainable (LoRA) parameters, gathered in full on every rank, on the CPU."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(peft_model, options=_options(ignore_frozen_params=True))


TASK_FILE = "anymask_task.json"  # beside the adapter: the task it was trained for (its attention mask)


def save_adapter(peft_model, path: Path, d: Dist, tokenizer=None, task: str | None = None) -> None:
    """``peft_model.save_pretrained`` (reloadable with ``PeftModel.from_pretrained``) and the task
    it was trained for (``anymask_task.json``, read by ``load_adapter``), atomically."""
    state = adapter_state(peft_model)
    with atomic_dir(path, d) as tmp:
        if d.main:
            peft_model.save_pretrained(str(tmp), state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
            if task is not None:
                (tmp / TASK_FILE).write_text(json.dumps({"task": task}))


def saved_task(adapter_dir: Path) -> str | None:
    """The task an adapter was trained for: its ``anymask_task.json``, or for a checkpoint's adapter
    the config in the checkpoint's ``state.json``; None when neither says."""
    adapter_dir = Path(adapter_dir)
    for file, read in ((adapter_dir / TASK_FILE, lambda doc: doc.get("task")),
                       (adapter_dir.parent / "state.json", lambda doc: (doc.get("config") or {}).get("task"))):
        if file.is_file():
            return read(json.loads(file.read_text()))
    return None


def save(path: Path, peft_model, optimizer, scheduler, step: int, d: Dist, extra: dict) -> None:
    """A resumable checkpoint: adapter, optimizer, scheduler, step and every rank's RNG states."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = adapter_state(peft_model)
    fresh = not optimizer.state  # no optimizer step yet (every step so far had no loss unit)
    optim = get_optimizer_state_dict(peft_model, optimizer, options=_options())
    if fresh:  # torch filled the state by a zero step to save it: AdamW's first real step would count as its second
        optimizer.state.clear()
    rngs = d.gather(_rng_state())
    with atomic_dir(path, d) as tmp:
        if d.main:
            peft_model.save_pretrained(str(tmp / "adapter"), state_dict=state)
            torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), "optimizer_fresh": fresh},
                       tmp / "optimizer.pt")
            torch.save(rngs, tmp / "rng.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, "world": d.world, **extra}, indent=1))


# Settings a checkpoint's weights or optimizer state depend on: resuming with others is an error.
MUST_MATCH = ("model", "gguf_file", "task", "dtype", "lora_r", "lora_targets")
# Settings that change what the rest of the run computes or sees: resuming with others warns.
# (lr, warmup_steps, max_steps, epochs: the checkpoint's learning-rate schedule goes on, see saved_schedule)
CHANGES_THE_RUN = ("data", "tokens_per_batch", "truncate", "grad_accum", "data_shards", "seed", "eval_fraction",
                   "lora_alpha", "lora_dropout", "weight_decay", "warmup_steps", "temperature", "mask_token",
                   "mask_token_id", "lr", "max_steps", "epochs", "max_grad_norm")
SCHEDULE = ("lr", "warmup_steps", "max_steps", "epochs")


def read_state(path: Path) -> dict:
    """The checkpoint's ``state.json``; a :class:`ConfigError` when it cannot be read or is not one."""
    from .config import ConfigError

    try:
        state = json.loads((Path(path) / "state.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {Path(path) / 'state.json'} ({exc}): {_damaged(path)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("config"), dict):
        raise ConfigError(f"{Path(path) / 'state.json'} is not a checkpoint's state (no step or config): "
                          f"{_damaged(path)}")
    return state


def _damaged(path: Path) -> str:
    """What to do about a checkpoint that cannot be read: move it away, then the one before it."""
    path = Path(path)
    found = complete(path.parent)
    earlier = found[:found.index(path)] if path in found else []
    if earlier:
        return (f"the checkpoint looks damaged; delete (or move) {path}, then --resume auto goes on from the one "
                f"before it ({earlier[-1].name})")
    return f"the checkpoint looks damaged; delete (or move) {path} to start afresh"


def saved_schedule(path: Path, steps_per_epoch: int) -> dict:
    """The learning-rate schedule of the run that saved the checkpoint at ``path``: ``{"lr",
    "warmup_steps", "total_steps"}``, as ``state.json`` records it (or, in a checkpoint saved before
    it did, from its config, with the epochs counted at ``steps_per_epoch``)."""
    state = read_state(path)
    if "schedule" in state:
        return state["schedule"]
    saved = state.get("config") or {}
    total = saved.get("max_steps") or max(1, math.ceil(saved.get("epochs", 1.0) * steps_per_epoch))
    return {"lr": saved.get("lr"), "warmup_steps": saved.get("warmup_steps", 0), "total_steps": total}


def describe_schedule(schedule: dict, total: int) -> str:
    """What the checkpoint's ``schedule`` does in a resumed run of ``total`` steps (see
    ``loop._schedule``: the lr of step s is the factor at s - 1)."""
    lr, warmup, steps = schedule["lr"], schedule["warmup_steps"], schedule["total_steps"]
    end = max(steps, warmup + 1)  # the first factor at the final 10% is the one of step end + 1
    text = (f"the learning-rate schedule (peak lr {lr:g}, {_count(warmup, 'warm-up step')}, cosine decay to 10% "
            f"of the peak over {_count(steps, 'step')}) stays the checkpoint's")
    if total > end:
        span = f"step {total}" if total == end + 1 else f"steps {end + 1}-{total}"
        return text + f": {span} of this run stay{'s' if total == end + 1 else ''} at its final lr {0.1 * lr:g}"
    if total < steps:
        return text + f": this run stops at step {total}, partway through it (the checkpoint's run ends at {steps})"
    return text


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def check_config(path: Path, config: dict, schedule: dict, total: int, data_fingerprint: dict | None = None,
                 world: int = 1) -> None:
    """Compare the run's ``config`` with the one the checkpoint at ``path`` was saved with: a
    :class:`ConfigError` for a checkpoint past this run's ``total`` steps or a setting its weights
    depend on, a warning for one that changes the run, saying what the checkpoint's lr ``schedule``
    does over this run's ``total`` steps.  The training
    data is compared by content where both runs recorded its ``data_fingerprint`` (see
    :func:`anymask.train.data.fingerprint`), else by path; ``data_shards`` unset is the number of
    processes (``world`` now, the saved ``world`` then)."""
    from .config import ConfigError

    state = read_state(path)
    if state["step"] > total:
        raise ConfigError(f"{path} is at step {state['step']}, past this run's last step {total}: nothing to "
                          "train; raise --max-steps (or --epochs), or resume from an earlier checkpoint")
    saved = dict(state["config"])
    config = json.loads(json.dumps(config))  # as it would be saved: tuples become lists
    if "data_shards" in saved:
        saved["data_shards"] = saved["data_shards"] or state.get("world", 1)
        config["data_shards"] = config.get("data_shards") or world

    def differs(key):
        if key == "model" and state.get("model_files") and isinstance(config.get(key), str):
            now = model_files(config[key])
            if now is not None:  # both local: the files decide, not the spelling or where it ran
                return any(now.get(k) != v for k, v in state["model_files"].items())  # what it recorded
        if key not in saved or saved[key] == config.get(key):
            return False
        if key == "model" and isinstance(saved[key], str) and isinstance(config.get(key), str):
            return not _same_file(saved[key], config[key])
        return True

    wrong = [f"{k} {saved[k]!r} -> {config.get(k)!r}" + (" (other files)" if k == "model" else "")
             for k in MUST_MATCH if differs(k)]
    if wrong:
        raise ConfigError(f"cannot resume from {path}: it was saved with other settings ({'; '.join(wrong)})")
    data = _data_change(saved, config, state.get("data_fingerprint"), data_fingerprint)
    changed_keys = [k for k in CHANGES_THE_RUN if k != "data" and differs(k)]
    changed = ([data] if data else []) + [f"{k} {saved[k]!r} -> {config.get(k)!r}" for k in changed_keys]
    moved = any(k in changed_keys for k in SCHEDULE) or total != schedule["total_steps"]
    if not changed and moved:  # same settings, another length (e.g. epochs over another number of ranks)
        changed = [f"this run has {total} steps, the checkpoint's {schedule['total_steps']}"]
    if changed:
        kept = [describe_schedule(schedule, total)] if moved else []
        if "weight_decay" in changed_keys:  # a param-group setting: the optimizer state brings back the saved one
            kept.append(f"weight_decay stays the checkpoint's {saved['weight_decay']!r} (the optimizer state keeps it)")
        warnings.warn(f"resuming from {path} with changed settings ({'; '.join(changed)}): the rest of the run "
                      "differs from an uninterrupted one" + "".join(f"; {k}" for k in kept), stacklevel=2)


_WEIGHTS = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


def model_files(model: str) -> dict | None:
    """What identifies a local ``--model`` directory: its ``config.json`` (sha256), its weight
    files' names and sizes, and a sha256 of :data:`_SAMPLES` evenly spaced :data:`_WINDOW`-byte
    windows of each weight file (a fine-tuned copy of the same shape differs there; reading all of a
    15 GB model at every start and resume would not pay); None for a hub name.  A checkpoint
    records it, so a resumed run compares models, not spellings (a relative path from another
    directory, a link to another model)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return None
    config = path / "config.json"
    weights = sorted(f for f in path.iterdir() if f.suffix in _WEIGHTS)
    return {"config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
            "weights": [[f.name, f.stat().st_size] for f in weights],
            "weights_sampled_sha256": _sampled_sha256(weights)}


_SAMPLES, _WINDOW = 16, 1 << 18  # 4 MiB a file: a merged LoRA's changed projections lie in every layer


def _sampled_sha256(files: list[Path]) -> str:
    """sha256 over :data:`_SAMPLES` windows of :data:`_WINDOW` bytes spread evenly over each file
    (all of a file smaller than that)."""
    digest = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        whole = size <= _SAMPLES * _WINDOW
        starts = [0] if whole else [i * (size - _WINDOW) // (_SAMPLES - 1) for i in range(_SAMPLES)]
        with f.open("rb") as handle:
            for start in starts:
                handle.seek(start)
                digest.update(handle.read(size if whole else _WINDOW))
    return digest.hexdigest()


def _same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one existing file (one path spelled two ways)."""
    a, b = Path(a), Path(b)
    return a.exists() and b.exists() and a.resolve() == b.resolve()


def _data_change(saved: dict, config: dict, saved_print: dict | None, new_print: dict | None) -> str | None:
    """How this run's training data differs from the checkpoint's, or None.  Where both fingerprints
    are known the contents decide (a copy elsewhere is the same data, a file edited in place is
    not); else (a checkpoint saved before it recorded one, or examples given in Python) the path."""
    if "data" not in saved:
        return None
    old, new = saved["data"], config.get("data")
    moved = old != new and not (isinstance(old, str) and isinstance(new, str) and _same_file(old, new))
    if saved_print is None or new_print is None:  # no contents to compare: the path decides
        return f"data {old!r} -> {new!r}" if moved else None
    if saved_print == new_print:
        return None
    if moved:
        return f"data {old!r} -> {new!r} (other contents)"
    return (f"data {new!r} changed since the checkpoint ({saved_print.get('size')} -> {new_print.get('size')} bytes, "
            f"sha256 {str(saved_print.get('sha256'))[:12]}... -> {str(new_print.get('sha256'))[:12]}...)")


def load(path: Path, peft_model, optimizer, scheduler, d: Dist) -> dict:
    """Restore what :func:`save` wrote; returns ``state.json`` (with ``step``).  A file that is
    missing or cannot be read is a :class:`ConfigError` naming it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from .config import ConfigError

    path = Path(path)
    state = read_state(path)
    try:
        adapter = _read_adapter(path / "adapter", peft_model)
        blob = torch.load(path / "optimizer.pt", weights_only=False)
        rngs = torch.load(path / "rng.pt", weights_only=False)
    except ConfigError:
        raise
    except Exception as exc:  # torch's, safetensors' and peft's errors for missing or truncated files
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"cannot read checkpoint {path} ({type(exc).__name__}: {first}): {_damaged(path)}") from None
    set_model_state_dict(peft_model, adapter, options=_options(strict=False))
    set_optimizer_state_dict(peft_model, optimizer, blob["optimizer"], options=_options())
    if blob.get("optimizer_fresh"):  # saved before any optimizer step: go on without one, as the saving run did
        optimizer.state.clear()
    scheduler.load_state_dict(blob["scheduler"])
    if len(rngs) == d.world:
        _set_rng_state(rngs[d.rank])
    elif d.main:
        warnings.warn(f"{path} was saved by {len(rngs)} processes, this run has {d.world}: random states (LoRA "
                      "dropout) start afresh", stacklevel=2)
    return state


def _read_adapter(adapter_dir: Path, peft_model) -> dict:
    """The saved adapter weights, keyed like ``peft_model``'s own state dict."""
    from peft.utils import load_peft_weights

    from .config import ConfigError

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ConfigError(f"checkpoint adapter {adapter_dir} is missing: {_damaged(adapter_dir.parent)}")

    saved = load_peft_weights(str(adapter_dir), device="cpu")  # keys without the adapter name
    own = [k for k, p in peft_model.named_parameters() if p.requires_grad]
    out = {}
    for key in own:
        short = re.sub(r"\.default(?=\.)", "", key, count=1)
        if short not in saved:
            raise ConfigError(f"checkpoint adapter {adapter_dir} has no weight for {key}: it was trained on "
                              "another model (same --model spelling, other files?)")
        out[key] = saved[short]
    return out


def complete(output_dir: Path) -> list[Path]:
    """The complete ``checkpoint-N`` directories in ``output_dir`` (those with a ``state.json``), oldest first."""
    found = [(int(m.group(1)), p) for p in Path(output_dir).glob("checkpoint-*")
             if (m := _CKPT.match(p.name)) and (p / "state.json").exists()]
    return [p for _, p in sorted(found)]


def latest(output_dir: Path) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``output_dir``, or None."""
    found = complete(output_dir)
    return found[-1] if found else None


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
