"""Where and with what a bench ran: device name, library versions, git commit, date."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import torch

from ..tuning import _cpu_name, _version


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_name()


def device_slug(device: torch.device) -> str:
    """``nvidia-h200``, ``cpu-amd-epyc-7b13-2t``: a directory name for the results."""
    name = device_name(device).lower()
    name = re.sub(r"\(r\)|\(tm\)|cpu @.*|processor", "", name)
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-")[:40].strip("-")
    if device.type == "cuda":
        return slug or "cuda"
    return f"cpu-{slug}-{torch.get_num_threads()}t" if slug else f"cpu-{torch.get_num_threads()}t"


def git_commit(package: str | Path | None = None) -> str | None:
    """``<sha>`` of the anymask checkout holding ``package`` (default: this ``anymask`` package;
    ``+dirty`` with local changes), None for an install that is not such a checkout's ``src/anymask``,
    or ``$ANYMASK_COMMIT`` when set (a copy of a working tree whose ``.git`` is not the source's)."""
    if os.environ.get("ANYMASK_COMMIT"):
        return os.environ["ANYMASK_COMMIT"]
    package = Path(package or Path(__file__).parent.parent).resolve()  # .../anymask
    cwd = package.parent
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not top or not (Path(top) / "src" / "anymask").resolve() == package:
            return None  # an installed copy inside some other repository: its commit is not ours
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def metadata(device: torch.device) -> dict:
    import anymask

    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "anymask": anymask.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if device.type == "cuda":
        meta["cuda"] = torch.version.cuda
        meta["cudnn"] = torch.backends.cudnn.version()
    return meta
