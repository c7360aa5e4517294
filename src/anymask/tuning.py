"""Measured-choice cache: which backend won, on this machine, for problems like this one.

``dispatch`` asks :func:`lookup` before its static preference.  Entries live in one
human-readable JSON file, ``choices.json`` in the user cache directory (``$ANYMASK_CACHE_DIR``
overrides it; default ``$XDG_CACHE_HOME/anymask``, else ``~/.cache/anymask``, on Linux,
``~/Library/Caches/anymask`` on macOS, ``%LOCALAPPDATA%\\anymask\\Cache`` on Windows)::

    {"format": "anymask-choices/1",
     "machines": {"NVIDIA H200 | torch 2.11.0 | triton 3.6.0 | anymask 0.1.0 | ...": {
         "documents+causal|q4096|kv4096|hd128|gqa4|bfloat16|grad|d1/16": {
             "backend": "flex", "ms": {"flex": 3.1, "sdpa": 9.8}, "rejected": {}, ...}}}}

A machine is a device name (with the core count on CPU) plus the torch, triton and anymask
versions (and on CUDA those of nvidia-cudnn-frontend and flash-attn-4, where installed); a problem
signature is the mask structure (``Structure.kind()``), sequence lengths rounded to a power of two,
head dim, GQA ratio, dtype, whether gradients are needed, and the mask's density rounded to a power
of two.  A missing entry gives ``None`` and the static preference applies.

Filling the cache: ``anymask tune`` (a grid), :func:`tune` (one call's problem), or
``ANYMASK_AUTOTUNE=1`` (every unseen signature is measured on first use, on random inputs of the
same shapes).  Only backends whose output (and gradients) agree with a float64 reference, within
:func:`tolerance` of SDPA's own error at that dtype, may win.  Writes are atomic (temp file +
``os.replace``) under a file lock (``fcntl``, where available) and merge with what other
processes wrote meanwhile.  A corrupt file is ignored with a warning (and set aside as
``choices.json.corrupt`` on the next write).

:func:`lookup` is cheap: the file is read once per process (and again whenever this process stores
an entry, which also brings in what other processes stored); a problem whose shape-level signature
has no entry returns at once; otherwise the mask's density is computed once per mask object.
Processes that autotune one problem at once (DDP ranks) all keep the first choice stored, and a
file this process cannot read is never replaced.
"""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import uuid
import warnings
import weakref
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import torch

from .masks import stamp
from .problem import Problem, autocast_inputs, describe

ENV_DIR = "ANYMASK_CACHE_DIR"
ENV_AUTOTUNE = "ANYMASK_AUTOTUNE"
FORMAT = "anymask-choices/1"
FILENAME = "choices.json"

RATIO = 2.0  # a backend may be off by twice SDPA's own error at the dtype ...
ABS_SLACK = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}  # ... plus this


def tolerance(peer_error: float, dtype: torch.dtype, magnitude: float = 1.0) -> float:
    """Largest acceptable max-abs error against float64, given SDPA's error at ``dtype``."""
    return RATIO * peer_error + ABS_SLACK.get(dtype, 1e-3) * max(1.0, magnitude)


# where ------------------------------------------------------------------------------------------


def cache_path() -> Path:
    """The cache file: ``$ANYMASK_CACHE_DIR/choices.json`` or the platform's user cache dir."""
    keys = (ENV_DIR, "XDG_CACHE_HOME", "LOCALAPPDATA", "HOME", "USERPROFILE", "HOMEDRIVE", "HOMEPATH")
    return _cache_path(*(os.environ.get(k) for k in keys))


@lru_cache(maxsize=8)
def _cache_path(env_dir, xdg, local_app_data, *home) -> Path:
    """``cache_path`` for these values of the variables it reads, computed once per set of them
    (``auto`` asks on every new shape; ``home``: what ``Path.home()`` reads, there)."""
    if env_dir:
        return Path(env_dir).expanduser() / FILENAME
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif os.name == "nt":
        base = Path(local_app_data) if local_app_data else Path.home() / "AppData" / "Local"
        return base / "anymask" / "Cache" / FILENAME
    else:
        base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "anymask" / FILENAME


# machine key ------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "none"


@lru_cache(maxsize=None)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "cpu"


@lru_cache(maxsize=None)
def machine_key(device: str) -> str:
    """``"<device name> | torch <v> | triton <v> | anymask <v>"`` (on CUDA also the versions of
    nvidia-cudnn-frontend and flash-attn-4, whose kernels change what wins) for a device string
    such as ``"cuda:0"``: measured choices hold only for the software that measured them."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev.index if dev.index is not None else torch.cuda.current_device())
    elif dev.type == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        name = f"{_cpu_name()} ({cores} cores)"
    else:
        name = dev.type
    from . import __version__

    key = f"{name} | torch {torch.__version__} | triton {_version('triton')} | anymask {__version__}"
    if dev.type == "cuda":
        key += "".join(f" | {dist} {_version(dist)}" for dist in ("nvidia-cudnn-frontend", "flash-attn-4"))
    return key


# signature --------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(0, round(math.log2(max(1, n))))


def density_bucket(density: float) -> str:
    """``"1"``, ``"1/2"``, ``"1/4"`` ... (nearest power of two), ``"0"`` for an empty mask."""
    if density <= 0:
        return "0"
    k = min(16, max(0, round(-math.log2(density))))
    return "1" if k == 0 else f"1/{1 << k}"


def shape_signature(p: Problem) -> str:
    """Everything in the signature but the density (no tensor is read)."""
    return "|".join((p.structure.kind(), f"q{_pow2(p.q_len)}", f"kv{_pow2(p.kv_len)}", f"hd{p.head_dim}",
                     f"gqa{p.q_heads // p.kv_heads}", str(p.dtype).replace("torch.", ""),
                     "grad" if p.requires_grad else "nograd"))


_DENSITY: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _sampled_density(p: Problem, rows: int = 64) -> float:
    """Density of an opaque mask from ``rows`` evenly spaced query rows (all keys, all batch rows)."""
    from .tiles import is_head_invariant

    heads = 1 if is_head_invariant(p.mask) else p.q_heads
    m = p.mask.to(p.device)
    q = torch.linspace(0, p.q_len - 1, min(rows, p.q_len), device=p.device).round().long()
    q = (q + p.kv_len - p.q_len).view(1, 1, -1, 1)
    b = torch.arange(p.batch, device=p.device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=p.device).view(1, -1, 1, 1)
    kv = torch.arange(p.kv_len, device=p.device).view(1, 1, 1, -1)
    return m.mask_mod(b, h, q, kv).expand(p.batch, heads, q.shape[2], p.kv_len).float().mean().item()


def density(p: Problem) -> float:
    """Fraction of visible pairs (exact for structured masks, sampled otherwise); cached per mask."""
    from .tiles import is_structured, visible_pairs

    key = (p.batch, p.q_heads, p.q_len, p.kv_len, str(p.device))
    per_mask = _DENSITY.setdefault(p.mask, {})
    now = stamp(p.mask)  # a tensor the mask holds edited in place: measured again
    held = per_mask.get(key)
    if held is None or held[0] != now:
        if is_structured(p.structure):
            pairs = visible_pairs(p.mask, p.batch, p.q_heads, p.q_len, p.kv_len, device=p.device,
                                  structure=p.structure)
            held = per_mask[key] = (now, pairs / (p.batch * p.q_heads * p.q_len * p.kv_len))
        else:
            held = per_mask[key] = (now, _sampled_density(p))
    return held[1]


def signature(p: Problem) -> str:
    """The bucketed problem signature, e.g. ``documents+causal|q4096|kv4096|hd128|gqa4|bfloat16|grad|d1/16``."""
    return f"{shape_signature(p)}|d{density_bucket(density(p))}"


# the file ---------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_STATE: dict = {"path": None, "machines": {}, "shapes": {}, "generation": 0}
_FAILED: set = set()
_BUSY = threading.local()


def _parse(text: str) -> dict:
    """The file's ``machines`` object, verbatim (entries it cannot use included: see :func:`_usable`)."""
    data = json.loads(text)
    if not isinstance(data, dict) or not isinstance(data.get("machines"), dict):
        raise ValueError("expected an object with a 'machines' object")
    return data["machines"]


def _usable(machines: dict, *, warn: bool) -> dict:
    """The entries ``{signature: {"backend": name, ...}}`` of ``machines``; the others (a hand edit,
    another anymask version's format) are skipped, with a warning, and kept in the file."""
    usable, skipped = {}, []
    for machine, entries in machines.items():
        if not isinstance(entries, dict):
            skipped.append(f"machine {machine!r}")
            continue
        usable[machine] = {sig: e for sig, e in entries.items()
                           if isinstance(e, dict) and isinstance(e.get("backend"), str)}
        skipped += [f"{machine!r} {sig!r}" for sig in entries if sig not in usable[machine]]
    if skipped and warn:
        warnings.warn(f"anymask: skipping {len(skipped)} tuning cache entr{'y' if len(skipped) == 1 else 'ies'} "
                      f"it cannot use ({', '.join(skipped[:3])}; expected signature -> {{'backend': name, ...}}); "
                      "the file keeps them", stacklevel=4)
    return usable


class _Unreadable(OSError):
    """The cache file exists but cannot be read (another user's permissions): never replaced."""


def _read(path: Path, *, for_write: bool = False) -> tuple[dict, bool]:
    """``(machines, corrupt)``; a corrupt file warns and reads as empty.  A file that cannot be read
    warns and reads as empty, or with ``for_write`` raises :class:`_Unreadable` (writing would
    replace entries this process cannot see)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, False
    except OSError as exc:
        if for_write:
            raise _Unreadable(f"it exists but cannot be read: {exc}") from exc
        warnings.warn(f"anymask: cannot read the tuning cache {path} ({exc}); ignoring it", stacklevel=3)
        return {}, False
    try:
        return _parse(text), False
    except (ValueError, TypeError) as exc:
        warnings.warn(f"anymask: ignoring the corrupt tuning cache {path} ({exc}); "
                      "`anymask tune` will rewrite it", stacklevel=3)
        return {}, True


def generation() -> int:
    """A counter that moves whenever the in-memory choices change (a read, a store, a reload)."""
    return _STATE["generation"]


def _set_state(path: Path, machines: dict) -> None:
    _STATE["generation"] += 1
    shapes = {m: {sig.rsplit("|d", 1)[0] for sig in entries} for m, entries in machines.items()}
    _STATE.update(path=path, machines=machines, shapes=shapes)


def _machines() -> dict:
    path = cache_path()
    if _STATE["path"] != path:
        with _LOCK:
            if _STATE["path"] != path:
                _set_state(path, _usable(_read(path)[0], warn=True))
    return _STATE["machines"]


def reload() -> None:
    """Forget the in-memory copy; the next lookup reads the file again."""
    with _LOCK:
        _STATE.update(path=None, machines={}, shapes={}, generation=_STATE["generation"] + 1)
        _FAILED.clear()


def entries(device="cpu") -> dict:
    """Signature -> entry for ``device``'s machine key (a copy)."""
    return dict(_machines().get(machine_key(str(torch.device(device))), {}))


@contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): atomic replace still keeps the file whole
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _atomic_write(path: Path, machines: dict) -> None:
    text = json.dumps({"format": FORMAT, "machines": machines}, indent=1, sort_keys=True) + "\n"
    tmp = path.parent / f".choices.{os.getpid()}.{threading.get_ident()}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # umask applies (mkstemp's 0600 shut a team out)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _remove_dead_temp_files(folder: Path, age_s: float = 3600.0) -> None:
    """Temp files of writes killed midway (SIGKILL): a write takes milliseconds, so one older than
    ``age_s`` is nobody's."""
    now = time.time()
    for tmp in folder.glob(".choices.*.tmp"):
        try:
            if now - tmp.stat().st_mtime > age_s:
                tmp.unlink()
        except OSError:  # gone already, or not ours to remove
            pass


def store(machine: str, sig: str, entry: dict, *, keep_existing: bool = False) -> str:
    """Add or replace one entry: lock, re-read, merge, write atomically, refresh memory.  With
    ``keep_existing`` an entry another process stored meanwhile stays, so processes measuring the
    same problem at once (DDP ranks) all take the first one stored.  Returns the stored backend."""
    if not isinstance(entry.get("backend"), str):
        raise ValueError("entry needs a 'backend' name")
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            machines, corrupt = _read(path, for_write=True)  # verbatim: other versions' entries are written back
            if corrupt:
                os.replace(path, path.with_name(path.name + ".corrupt"))
            if not isinstance(machines.get(machine), dict):
                machines[machine] = {}
            there = machines[machine].get(sig)
            if keep_existing and isinstance(there, dict) and isinstance(there.get("backend"), str):
                entry = there
            else:
                machines[machine][sig] = entry
                _atomic_write(path, machines)
                _remove_dead_temp_files(path.parent)
            with _LOCK:  # under the file lock: a store that read the file later cannot be overwritten here
                _set_state(path, _usable(machines, warn=False))
    except OSError as exc:  # a read-only home (containers, CI): the choice still serves this process
        warnings.warn(f"anymask: cannot save the tuning cache {path} ({exc}); keeping this choice in memory "
                      f"only. Set {ENV_DIR} to a writable directory to keep it", stacklevel=3)
        machines = {m: dict(e) for m, e in _machines().items()}
        machines.setdefault(machine, {})[sig] = entry
        with _LOCK:
            _set_state(path, machines)
    return entry["backend"]


# lookup and tuning ------------------------------------------------------------------------------


def autotune_enabled() -> bool:
    """``ANYMASK_AUTOTUNE``: 1/true/yes/on, or 0/false/no/off/unset; anything else is a ValueError
    (a typo must not silently leave measuring off).  ``auto`` reads it on every call."""
    return _parse_autotune(os.environ.get(ENV_AUTOTUNE, ""))


@lru_cache(maxsize=8)
def _parse_autotune(raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
        raise ValueError(f"{ENV_AUTOTUNE}={raw!r}: use 1 (measure unseen problems) or 0")
    return value in ("1", "true", "yes", "on")


def lookup(p: Problem) -> str | None:
    """The measured winner for ``p``'s signature on this machine, or ``None``.

    With ``ANYMASK_AUTOTUNE=1`` an unseen signature is measured now and stored.
    """
    machine = machine_key(str(p.device))
    known = _machines().get(machine)
    if known and shape_signature(p) in _STATE["shapes"].get(machine, ()):
        entry = known.get(signature(p))
        if entry is not None:
            return entry["backend"]
    if autotune_enabled() and not getattr(_BUSY, "on", False):
        return _autotune(p, machine)
    return None


def _autotune(p: Problem, machine: str) -> str | None:
    if _tracing():
        return None
    if p.device_type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None
    try:
        sig = signature(p)  # reads the mask's density: data a tracer may not have
    except Exception as exc:  # autotuning must never break the user's call
        warnings.warn(f"anymask: cannot autotune this call ({type(exc).__name__}: {exc}); using the static "
                      "preference", stacklevel=3)
        return None
    with _LOCK:
        if (machine, sig) in _FAILED or (machine, sig) in _MEASURING:  # another thread measures it: this
            return None  # call takes the static preference, and later ones the stored choice
        _MEASURING.add((machine, sig))
    try:
        return _measure_and_store(p, machine, sig, first=None)
    except Exception as exc:  # autotuning must never break the user's call
        _FAILED.add((machine, sig))
        warnings.warn(f"anymask: autotuning {sig} failed ({type(exc).__name__}: {exc}); "
                      "using the static preference", stacklevel=3)
        return None
    finally:
        with _LOCK:
            _MEASURING.discard((machine, sig))


_MEASURING: set[tuple[str, str]] = set()  # (machine, signature) a thread of this process is measuring


def _tracing() -> bool:
    """Whether Dynamo traces this very call or ``torch.export`` runs (``torch.compiler.is_compiling``
    is also true while any other thread compiles, which would skip measuring there)."""
    checks = [getattr(torch.compiler, name, None) for name in ("is_dynamo_compiling", "is_exporting")]
    checks = [check for check in checks if check is not None] or [torch.compiler.is_compiling]
    return any(check() for check in checks)


def _measure_and_store(p: Problem, machine: str, sig: str, first) -> str | None:
    from .bench.choose import measure_problem

    def measure():
        _BUSY.on = True
        with torch.set_grad_enabled(p.requires_grad):
            return measure_problem(p, first=first)

    choice = _in_a_fresh_thread(measure, p.device)
    short = sorted(n for n, why in choice.rejected.items() if why == "out of memory")
    if choice.winner is None or (short and first is None):
        # nothing won, or (autotune, inside the user's step) a backend lacked memory only while
        # measuring: three input sets and a float64 reference beside the caller's tensors; no
        # verdict to keep on disk, and this process does not measure the signature again
        _FAILED.add((machine, sig))
        if short:
            warnings.warn(f"anymask: autotuning {sig}: {', '.join(short)} ran out of memory while measuring; "
                          "nothing stored (run `anymask tune` or anymask.tune() outside training to keep a choice)",
                          stacklevel=4)
        return choice.winner
    return remember(p, choice.entry(), machine=machine, sig=sig, keep_existing=first is None)


def _in_a_fresh_thread(fn, device: torch.device):
    """``fn()`` run in a new thread, which starts with none of the caller's thread-local state: its
    ``torch.autocast`` (a float32 call would be timed, and checked, with bf16 kernels), saved-tensor
    hooks (non-reentrant checkpointing would record the measurement's tensors, and its recomputation
    then fail; offloading would skew the timings), ``no_grad`` / ``inference_mode``, and also
    ``torch.set_default_device``, dispatch modes and the profiler (the measurement names its device).
    On CUDA it runs on the caller's device and stream, so it is ordered after the caller's pending work."""
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    box, done = {}, threading.Event()

    def work():
        try:
            if stream is None:
                box["value"] = fn()
                return
            with torch.cuda.device(device), torch.cuda.stream(stream):
                box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc
        finally:
            done.set()

    threading.Thread(target=work, name="anymask-autotune").start()
    interrupted = None
    while not done.is_set():  # Ctrl-C: the measurement ends first (torch ops do not stop midway;
        try:  # left running, it would go on beside the caller's handler and hold the interpreter's exit)
            done.wait()
        except BaseException as exc:
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
    if "error" in box:
        raise box.pop("error")  # popped: the box would otherwise hold the traceback's frames
    return box.pop("value")


def remember(p: Problem, entry: dict, *, machine: str | None = None, sig: str | None = None,
             keep_existing: bool = False) -> str:
    """Store ``entry`` (``{"backend": name, ...}``) as the measured choice for ``p``'s signature;
    the backend stored (see :func:`store` for ``keep_existing``)."""
    entry = dict(entry, measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return store(machine or machine_key(str(p.device)), sig or signature(p), entry, keep_existing=keep_existing)


def tune(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, *, scale: float | None = None,
         force: bool = False) -> str | None:
    """Measure every backend that can run this call, store the fastest correct one for its
    signature, and return its name (the cached winner, without measuring, unless ``force``).

    Gradients are part of the signature: call it with inputs that require grad (and grad enabled)
    to tune training, without to tune inference.  ``q, k, v`` serve as one of the input sets.
    Under ``torch.autocast`` they are cast as :func:`anymask.attention` casts them.
    """
    q, k, v = autocast_inputs(q, k, v)
    p = describe(q, k, v, mask, scale)
    machine, sig = machine_key(str(p.device)), signature(p)
    if not force:
        entry = _machines().get(machine, {}).get(sig)
        if entry is not None:
            return entry["backend"]
    return _measure_and_store(p, machine, sig, first=(q, k, v))


__all__ = ["lookup", "tune", "remember", "signature", "machine_key", "cache_path", "store", "entries", "reload",
           "tolerance", "density_bucket"]
