"""``anymask bench``: the quick grid end to end on CPU, FLOPs over visible pairs, auto's reported
choice, the chunked float64 reference, grid parsing and timing statistics."""

import csv
import json

import pytest
import torch

import anymask
from anymask import masks as M
from anymask.bench import reference as R
from anymask.bench.__main__ import main as bench_main
from anymask.bench.inputs import make_inputs
from anymask.bench.cases import GRIDS, Case, bench_mask, doc_lengths, expand, grid_dict, load_config, override, parse_heads
from anymask.bench.runner import BWD_FACTOR, COLUMNS, run
from anymask.bench.timing import Settings, Timing, measure, paired_ratio

FAST = Settings(warmup=1, rounds=2, budget_s=0.01, max_iters=4, min_iters=2)


pytestmark = pytest.mark.usefixtures("private_cache")


def test_quick_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "results"
    assert bench_main(["bench", "--quick", "--out", str(out), "--no-progress", "--tune"]) == 0
    stdout = capsys.readouterr().out
    line = json.loads(stdout.strip().splitlines()[-1])
    [quick] = GRIDS["quick"]
    n_cases = len(quick.cases())
    assert line["bench"] == "anymask" and line["cases"] == n_cases and line["out"] == str(out)
    assert line["failed"] == 0
    assert isinstance(line["auto_within_5pct"], bool)

    with open(out / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == COLUMNS
    for col in ("median_ms", "p20_ms", "p80_ms", "tflops", "peak_mem_mb", "max_err", "first_call_s", "pass"):
        assert col in COLUMNS
    variants = {r["variant"] for r in rows}
    assert {"auto", "raw_sdpa_dense", "sdpa", "eager"} <= variants
    assert len(rows) == line["rows"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(float(r["median_ms"]) > 0 and float(r["tflops"]) > 0 for r in ok)
    assert all(float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]) for r in ok)
    assert all(r["peak_mem_mb"] == "" for r in ok)  # CPU: no allocator statistic, no guess
    assert all(float(r["max_err"]) < 1e-4 for r in ok)  # fp32
    assert all(r["grad_err"] != "" for r in ok if r["pass"] == "fwd+bwd")
    skipped = [r for r in rows if r["status"] == "skipped"]
    assert all(r["reason"] for r in skipped)
    if "flex" in anymask.backends() and anymask.backends()["flex"]["available"]:
        assert any(r["variant"] == "raw_flex" and r["pass"] == "fwd+bwd" and "backward" in r["reason"]
                   for r in skipped)
    assert {r["mask"] for r in rows} == set(quick.masks)

    doc = json.loads((out / "bench.json").read_text())
    for key in ("device", "torch", "triton", "transformers", "git_commit", "date", "grid_options"):
        assert key in doc["meta"]
    assert doc["summary"] == line and len(doc["rows"]) == len(rows) and len(doc["cases"]) == n_cases
    for mask in quick.masks:
        png = out / f"{mask}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "summary" in stdout and "auto/best" in stdout

    # --merge: the same run split in two parts by mask (as one part per GPU would be) merges back
    first = set(quick.masks[:2])
    parts = []
    for k, keep in enumerate((lambda m: m in first, lambda m: m not in first)):
        part = dict(doc, rows=[r for r in doc["rows"] if keep(r["mask"])])
        parts.append(tmp_path / f"part{k}.json")
        parts[-1].write_text(json.dumps(part))
    merged = tmp_path / "merged"
    capsys.readouterr()
    assert bench_main(["bench", "--merge", *map(str, parts), "--out", str(merged), "--tag", "all"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["cases"], again["rows"], again["failed"]) == (line["cases"], line["rows"], line["failed"])
    assert again["auto_within_5pct_cases"] == line["auto_within_5pct_cases"]
    whole = json.loads((merged / "all.json").read_text())
    assert [p["file"] for p in whole["meta"]["parts"]] == [p.name for p in parts]
    assert sorted(map(json.dumps, whole["rows"])) == sorted(map(json.dumps, doc["rows"]))
    assert (merged / "all.csv").exists() and all((merged / f"all-{m}.png").exists() for m in quick.masks)
    # a re-run of the first part's cases replaces their rows in the merged result; its parts are kept
    rerun = dict(json.loads(parts[0].read_text()))
    rerun["rows"] = [dict(r, median_ms=(r["median_ms"] or 0) + 1.0) for r in rerun["rows"]]
    parts.append(tmp_path / "rerun.json")
    parts[-1].write_text(json.dumps(rerun))
    assert bench_main(["bench", "--merge", str(merged / "all.json"), str(parts[-1]), "--out", str(merged),
                       "--tag", "again"]) == 0
    again = json.loads((merged / "again.json").read_text())
    assert len(again["rows"]) == len(doc["rows"])
    assert sorted(map(json.dumps, again["rows"])) == sorted(
        map(json.dumps, rerun["rows"] + [r for r in doc["rows"] if r["mask"] not in first]))
    assert [p["file"] for p in again["meta"]["parts"]] == [p.name for p in parts]
    # a re-run cut short: its placeholder rows (cases never started) replace nothing
    cut = dict(rerun, rows=[dict(r, variant="*", backend="*", status="skipped", reason="not started")
                            for r in rerun["rows"] if r["variant"] == "auto"])
    parts.append(tmp_path / "cut.json")
    parts[-1].write_text(json.dumps(cut))
    assert bench_main(["bench", "--merge", str(merged / "again.json"), str(parts[-1]), "--out", str(merged),
                       "--tag", "cut"]) == 0
    assert sorted(map(json.dumps, json.loads((merged / "cut.json").read_text())["rows"])) == \
        sorted(map(json.dumps, again["rows"]))
    # parts with inputs in different memory layouts would replace each other's cases: refused
    other = tmp_path / "bshd.json"
    other.write_text(json.dumps(dict(doc, meta=dict(doc["meta"], layout="bshd"))))
    assert doc["meta"]["layout"] == "bhsd"
    with pytest.raises(SystemExit, match="different input layouts"):
        bench_main(["bench", "--merge", str(parts[0]), str(other), "--out", str(merged)])
    with pytest.raises(SystemExit, match="no such file"):
        bench_main(["bench", "--plot-only", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="no bench results"):
        bench_main(["bench", "--plot-only", str(merged / "all.csv")])
    with pytest.raises(SystemExit, match="not bench results"):
        bench_main(["bench", "--merge", str(out / "bench.csv").replace(".csv", ".json"), str(merged / "all.csv"),
                    "--out", str(merged)])
    with pytest.raises(SystemExit, match="--merge: no such file: .*missing.json"):
        bench_main(["bench", "--merge", str(parts[0]), str(tmp_path / "missing.json"), "--out", str(merged)])


def _hand_pairs(kind, batch, seq):
    if kind == "causal":
        return batch * seq * (seq + 1) // 2
    if kind == "full":
        return batch * seq * seq
    if kind == "documents_causal":
        return batch * sum(n * (n + 1) // 2 for n in doc_lengths(seq))  # batch rows differ: see below
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["causal", "full", "padding", "documents_causal"])
def test_flops_count_visible_pairs_only(kind):
    batch, seq, heads, d = 2, 16, 2, 8
    if kind == "padding":  # rows 16 and round(16 * 0.35) = 6 valid tokens: keys and queries
        per_head = 16 * 16 + 6 * 6
    elif kind == "documents_causal":  # each batch row has its own documents
        per_head = sum(n * (n + 1) // 2 for row in range(batch) for n in doc_lengths(seq, seed=row))
    else:
        per_head = _hand_pairs(kind, batch, seq)
    cases = [Case(kind, batch, seq, heads, heads, d, "fp32", mode) for mode in ("fwd", "fwd+bwd")]
    rows = run(cases, device="cpu", names=["sdpa"], settings=FAST, sets=2, progress=False)
    fwd, both = rows
    assert fwd.pairs == both.pairs == heads * per_head
    assert fwd.gflop * 1e9 == pytest.approx(4 * d * heads * per_head)
    assert both.gflop == pytest.approx(BWD_FACTOR * fwd.gflop)
    for r in rows:
        assert r.tflops == pytest.approx(r.gflop * 1e9 / (r.median_ms * 1e-3) / 1e12)
        assert r.density == pytest.approx(per_head / (batch * seq * seq))


def test_auto_reports_dispatch_choice():
    cases = [Case(kind, 2, 32, 4, 2, 16, "fp32", mode) for kind in ("causal", "padding", "custom")
             for mode in ("fwd", "fwd+bwd")]
    rows = run(cases, device="cpu", names=["sdpa", "auto"], settings=FAST, sets=2, progress=False)
    autos = [r for r in rows if r.variant == "auto"]
    assert len(autos) == len(cases)
    for case, row in zip(cases, autos):
        mask = bench_mask(case.mask, case.batch, case.seq)
        q = torch.randn(case.batch, case.heads, case.seq, case.head_dim, requires_grad=case.grad)
        k = torch.randn(case.batch, case.kv_heads, case.seq, case.head_dim, requires_grad=case.grad)
        v = torch.randn_like(k, requires_grad=case.grad)
        with torch.set_grad_enabled(case.grad):
            assert row.backend == anymask.which_backend(q, k, v, mask)
        assert row.auto_vs_best is not None and row.best == "sdpa"


@pytest.mark.parametrize("mask_name", ["padding", "documents_causal", "custom", "prefix_lm"])
def test_chunked_reference_matches_autograd_float64(mask_name, monkeypatch):
    monkeypatch.setitem(R._CHUNK, "cpu", 64)  # force many row blocks
    B, Hq, Hkv, Sq, Skv, D = 2, 4, 2, 11, 19, 8
    mask = M.CATALOGUE[mask_name](B, Skv)
    q = torch.randn(B, Hq, Sq, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hkv, Skv, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hkv, Skv, D, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(B, Hq, Sq, D, dtype=torch.float64)
    out = anymask.attention(q, k, v, mask, backend="eager")
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref = R.reference(q, k, v, mask, None, dout)
    torch.testing.assert_close(ref.out, out.detach(), rtol=1e-10, atol=1e-10)
    for mine, theirs in zip(ref.grads, grads):
        torch.testing.assert_close(mine, theirs, rtol=1e-9, atol=1e-9)
    dense = mask.to_dense(B, Hq, Sq, Skv)
    assert torch.equal(ref.row_has_key.expand(B, Hq, Sq), dense.any(dim=-1))
    assert torch.equal(R.rows_with_keys(mask, B, Hq, Sq, Skv, "cpu"), ref.row_has_key)


def test_grid_options_and_config(tmp_path):
    grid = override(GRIDS["cpu"][0], masks="causal,padding", seqlens="64", heads="4,8:2", dtypes="bf16,float32",
                    passes="fwd", batch=3)
    cases = grid.cases()
    assert len(cases) == 2 * 1 * 2 * 2 * 1
    assert {(c.heads, c.kv_heads) for c in cases} == {(4, 4), (8, 2)}
    assert {c.dtype for c in cases} == {"bf16", "fp32"} and {c.batch for c in cases} == {3}
    assert parse_heads("32:8") == (32, 8)
    assert grid_dict((grid, grid)) == grid_dict((grid,))  # parts made equal by overrides are listed once
    with pytest.raises(ValueError):
        parse_heads("6:4")
    with pytest.raises(ValueError):
        override(GRIDS["cpu"][0], masks="nope")
    toml = tmp_path / "cases.toml"
    toml.write_text('grid = "quick"\nmasks = ["full"]\nseqlens = [32, 64]\nheads = ["4:1"]\n')
    assert load_config(toml) == {"grid": "quick", "masks": ["full"], "seqlens": [32, 64], "heads": ["4:1"]}
    js = tmp_path / "cases.json"
    js.write_text(json.dumps({"passes": ["fwd+bwd"], "head-dims": [16]}))
    assert override(GRIDS["quick"][0], **load_config(js)).cases()[0].head_dim == 16
    gpu = expand(GRIDS["gpu"])
    n = len(M.CATALOGUE)  # every catalogue mask
    assert len(gpu) == len(set(gpu)) == n * 2 * 2 + n + n
    assert {c.dtype for c in gpu} == {"bf16", "fp32"} and {(c.heads, c.kv_heads) for c in gpu} == {(16, 16), (32, 8)}
    assert all(c.batch * c.seq == 16384 for c in gpu)


def test_bench_masks_follow_the_issue():
    for seq in (4096, 16384):
        lengths = [doc_lengths(seq, seed=row) for row in range(4)]
        assert all(sum(ls) == seq for ls in lengths)
        assert all(256 <= n <= 2048 for ls in lengths for n in ls[:-1])
    window = bench_mask("sliding_window", 1, 16384)
    assert window.to_dense(1, 1, 16384, 16384)[0, 0, 5000].sum() == 1025  # 1024 back + itself


def test_timing_statistics_and_failures():
    t = Timing(0.5, (1.0, 2.0, 3.0, 4.0, 5.0), None)
    assert t.median_ms == 3.0 and t.p20_ms == pytest.approx(1.8) and t.p80_ms == pytest.approx(4.2)
    preempted = Timing(0, (10.0, 10.2, 14.0, 18.0, 14.1, 10.1, 18.2, 10.0, 14.0, 10.1), None)
    quiet = Timing(0, (10.0, 10.1, 10.0, 10.2, 10.1, 10.0, 10.1, 10.2, 10.0, 10.1), None)
    assert paired_ratio(preempted, quiet) == pytest.approx(1.0, abs=0.01)
    assert paired_ratio(Timing(0, (20.0,) * 5, None), quiet) == pytest.approx(2.0, abs=0.02)

    def boom(i):
        raise RuntimeError("no kernel for this")

    timings, outputs = measure({"ok": lambda i: i, "boom": boom}, 3, "cpu", FAST)
    assert "no kernel" in timings["boom"] and isinstance(timings["ok"], Timing)
    assert outputs["ok"] == 0  # the last timed call on input set 0


def test_deadline_reports_cases_not_started():
    cases = [Case("causal", 1, 16, 2, 2, 8, "fp32", "fwd"), Case("full", 1, 16, 2, 2, 8, "fp32", "fwd")]
    rows = run(cases, device="cpu", names=["sdpa"], settings=FAST, progress=False, deadline_s=0.0)
    assert [(r.mask, r.variant, r.status) for r in rows] == [("causal", "*", "skipped"), ("full", "*", "skipped")]
    assert all("not started" in r.reason for r in rows)


def test_commit_from_the_environment(monkeypatch):
    """A run on a copy of the working tree (the GPU machine) records the commit it was given."""
    from anymask.bench import env

    monkeypatch.setenv("ANYMASK_COMMIT", "abc1234")
    assert env.git_commit() == "abc1234"
    monkeypatch.delenv("ANYMASK_COMMIT")
    assert env.git_commit() != "abc1234"


def test_commit_only_of_an_anymask_checkout(tmp_path, monkeypatch):
    """An anymask installed inside another project's repository does not record that project's commit."""
    import shutil
    import subprocess

    from anymask.bench import env

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    monkeypatch.delenv("ANYMASK_COMMIT", raising=False)
    for package in (tmp_path / "src" / "anymask", tmp_path / ".venv" / "site-packages" / "anymask"):
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    sha = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert env.git_commit(tmp_path / "src" / "anymask") == sha
    assert env.git_commit(tmp_path / ".venv" / "site-packages" / "anymask") is None


def test_inputs_in_either_layout():
    """``bshd``: the same kind of inputs, [B, S, H, D] in memory, viewed as [B, H, S, D]; padded
    query rows get a zero output gradient in either layout; and a bench run takes ``--layout``."""
    has_key = torch.tensor([[True, True, False]]).view(1, 1, 3)  # [B, H|1, Sq]
    for layout in ("bhsd", "bshd"):
        x = make_inputs(1, 2, 2, 3, 3, 8, torch.float32, "cpu", sets=2, row_has_key=has_key, layout=layout)
        for t in (*x.q, *x.k, *x.v, *x.dout):
            assert t.dim() == 4 and t.shape[2] == 3 and t.shape[3] == 8
            assert t.is_contiguous() == (layout == "bhsd")
            assert t.transpose(1, 2).is_contiguous() == (layout == "bshd")
        assert all(bool((d[:, :, 2] == 0).all()) and bool((d[:, :, :2] != 0).all()) for d in x.dout)
    with pytest.raises(ValueError, match="unknown layout"):
        make_inputs(1, 1, 1, 2, 2, 8, torch.float32, "cpu", layout="sbhd")
    rows = run([Case("padding", 2, 64, 2, 2, 16, "fp32", "fwd+bwd")], device="cpu", names=["sdpa", "eager"],
               settings=FAST, progress=False, layout="bshd")
    assert {r.variant for r in rows if r.status == "ok"} == {"sdpa", "eager"}
    assert all(r.max_err < 1e-4 and r.grad_err < 1e-4 for r in rows if r.status == "ok")


def _resolved_cases(argv: list[str]) -> list:
    from anymask.bench.cli import _resolve
    from anymask.cli import build_parser

    return _resolve(build_parser().parse_args(["bench", "--device", "cpu", *argv]))[2]


def _cases(argv: list[str]) -> set[tuple]:
    return {(c.mask, c.seq, c.heads, c.kv_heads, c.mode) for c in _resolved_cases(argv)}


def test_grid_options_give_the_cases_asked_for(tmp_path):
    both = {("causal", 64, 4, 4, "fwd"), ("causal", 64, 4, 4, "fwd+bwd")}
    assert _cases(["--grid", "cpu", "--masks", "causal", "--seqlens", "64"]) == both  # no GQA 4:1 case
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"grid": "cpu", "masks": ["causal"], "seqlens": [64]}))
    assert _cases(["--config", str(config)]) == both
    # an option the extra parts do not vary keeps them: the cpu grid for causal has its GQA case
    assert ("causal", 1024, 4, 1, "fwd+bwd") in _cases(["--grid", "cpu", "--masks", "causal"])
    assert {c[1:4] for c in _cases(["--grid", "gpu", "--masks", "causal", "--dtypes", "bf16"])} == \
        {(4096, 16, 16), (16384, 16, 16), (4096, 32, 8)}  # the fp32 part dropped
    # options the parts only restrict keep them: every gpu part is fwd+bwd already, the cpu GQA case too
    gpu = {(c.dtype, c.seq, c.heads, c.kv_heads)
           for c in _resolved_cases(["--grid", "gpu", "--masks", "causal", "--passes", "fwd+bwd"])}
    assert gpu == {("bf16", 4096, 16, 16), ("fp32", 4096, 16, 16), ("bf16", 16384, 16, 16), ("bf16", 4096, 32, 8)}
    assert ("causal", 1024, 4, 1, "fwd+bwd") in _cases(["--grid", "cpu", "--masks", "causal", "--passes", "fwd+bwd"])
