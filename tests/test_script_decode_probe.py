"""``scripts/decode_probe.py`` (greedy decoding, transformers' sdpa against anymask) end to end on
the CPU: both arms pick the same tokens, and it prints one JSON line per arm and the ratio."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def test_decode_probe_script_on_cpu():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "decode_probe.py"), "--layers", "2", "--prompt", "5",
           "--new-tokens", "6", "--rounds", "1"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line.get("arm") for line in lines[:2]] == ["sdpa", "anymask"]
    assert all(line["median_ms_per_token"] > 0 for line in lines[:2])
    assert lines[2]["same_tokens"] is True and lines[2]["anymask_vs_sdpa_median"] > 0
