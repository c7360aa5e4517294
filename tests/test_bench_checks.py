"""The bench's float64 check holds every call to a bound that a wrong SDPA cannot widen: SDPA sets
the bound (it is what users run), so a wrong SDPA used to pass its own check, win, and be stored as
auto's choice; hand-rolled peers off the bound are no peer to beat."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from anymask.backend.sdpa import Sdpa
from anymask.bench import report
from anymask.bench.__main__ import main as bench_main
from anymask.bench.errors import Errors, rejections
from anymask.bench.reference import Reference
from anymask.bench.runner import Row

CASE = ["--masks", "causal", "--seqlens", "64", "--dtypes", "fp32", "--passes", "fwd+bwd", "--batch", "1",
        "--heads", "2", "--head-dim", "16", "--budget", "0.02", "--no-progress", "--no-plot"]


def _reference():
    out = torch.ones(1, 1, 4, 2, dtype=torch.float64)
    return Reference(out, torch.ones(1, 1, 4, dtype=torch.bool), (out, out, out))


def test_a_wrong_or_nan_sdpa_does_not_widen_the_bound():
    ref, good = _reference(), Errors(3e-7, 4e-7)
    for wrong in (Errors(0.1, 4e-7), Errors(math.nan, math.nan)):
        verdict = rejections({"sdpa": wrong, "eager": good, "varlen": good}, ref, torch.float32)
        assert verdict["sdpa"] and verdict["eager"] is None and verdict["varlen"] is None
    two = rejections({"sdpa": Errors(0.1, None), "eager": Errors(3e-7, None)}, ref, torch.float32)
    assert two["sdpa"] and two["eager"] is None
    fine = rejections({"sdpa": Errors(3e-7, 4e-7), "eager": Errors(1e-7, 1e-7)}, ref, torch.float32)
    assert fine == {"sdpa": None, "eager": None}  # a more precise backend does not shut SDPA out
    bf16 = rejections({"sdpa": Errors(8e-3, 0.0531), "eager": Errors(4e-3, 0.0077)}, ref, torch.bfloat16)
    assert bf16 == {"sdpa": None, "eager": None}  # SDPA's bf16 gradients at S 4096 on CPU: 7x eager's, correct
    all_nan = rejections({"sdpa": Errors(1e-7, math.nan), "eager": Errors(1e-7, math.nan)}, ref, torch.float32)
    assert all(all_nan.values())  # NaN gradients everywhere pass nothing
    peers = rejections({"sdpa": good}, ref, torch.float32, also={"raw_flex": Errors(0.1, None)})
    assert peers["sdpa"] is None and peers["raw_flex"]


@pytest.mark.usefixtures("private_cache")
@pytest.mark.parametrize("backends", ["eager,sdpa,varlen,raw_sdpa_dense,auto", "eager,sdpa,raw_sdpa_dense,auto"],
                         ids=["three", "two"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_wrong_sdpa_backend_is_caught_in_a_bench_run(backends, dtype, tmp_path, monkeypatch):
    right = Sdpa.run
    monkeypatch.setattr(Sdpa, "run", lambda self, q, k, v, p: right(self, q, k, v, p) * 1.05)
    case = [dtype if x == "fp32" else x for x in CASE]
    assert bench_main(["bench", *case, "--backends", backends, "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert rows["sdpa"]["eligible"] is False and rows["eager"]["eligible"] is True
    assert rows["raw_sdpa_dense"]["eligible"] is True
    case, = doc["cases"]
    assert case["best"] in ("eager", "varlen") and case["best_peer"] == "raw_sdpa_dense"
    assert rows["auto"]["backend"] == "sdpa"  # the static preference on CPU: auto runs the wrong SDPA
    assert rows["auto"]["eligible"] is False and doc["summary"]["auto_within_5pct"] is False


@pytest.mark.usefixtures("private_cache")
def test_a_peer_off_the_bound_is_no_peer_and_a_wrong_auto_is_not_within(tmp_path):
    assert bench_main(["bench", *CASE, "--backends", "eager,sdpa,raw_sdpa_dense,auto", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "bench.json").read_text())
    rows = [Row(**{("mode" if k == "pass" else k): v for k, v in r.items()}) for r in doc["rows"]]
    off = [replace(r, eligible=False) if r.variant in ("raw_sdpa_dense", "sdpa") else r for r in rows]
    case, = report.case_summaries(off)
    assert case["best"] == "eager" and case["best_peer"] is None and case["best_vs_peer"] is None
    wrong = [replace(r, eligible=False, reason="output error 1 > bound 0", auto_vs_best=None) if r.variant == "auto"
             else replace(r, eligible=False) for r in rows]  # auto off the bound, no forced backend to pair it with
    line = report.summary(wrong, report.case_summaries(wrong), str(tmp_path))
    assert line["auto_within_5pct"] is False and line["auto_within_5pct_cases"] == "0/1"
