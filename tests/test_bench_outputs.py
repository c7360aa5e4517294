"""What ``anymask bench`` writes and draws in the corner cases: only ``auto`` timed, the default
folder already holding results, non-bench JSON beside bench results, ``--tune`` with a subset
(allowed: the GPU scripts tune among the backends that matter, in a cache of their own)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from anymask.bench.__main__ import main as bench_main

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--masks", "causal", "--seqlens", "64", "--dtypes", "fp32", "--passes", "fwd", "--batch", "1",
         "--heads", "2", "--head-dim", "16", "--budget", "0.05", "--no-progress"]


@pytest.mark.usefixtures("private_cache")
def test_auto_alone_plots_and_summarises(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert bench_main(["bench", *SMALL, "--backends", "auto", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "causal.png").stat().st_size > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["out"] == str(tmp_path)


@pytest.mark.usefixtures("private_cache")
def test_default_folder_with_results_gets_a_new_run_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert bench_main(["bench", *SMALL, "--backends", "eager,sdpa", "--no-plot"]) == 0
    first, = Path("benchmarks/results").iterdir()
    kept = (first / "bench.json").read_text()
    assert bench_main(["bench", *SMALL, "--backends", "eager", "--no-plot"]) == 0
    assert (first / "bench.json").read_text() == kept
    runs = list(first.glob("run-*/bench.json"))
    assert len(runs) == 1 and "writing to" in capsys.readouterr().err


@pytest.mark.usefixtures("private_cache")
def test_default_folder_with_plots_only_is_kept_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert bench_main(["bench", *SMALL, "--backends", "eager", "--no-plot"]) == 0
    first, = Path("benchmarks/results").iterdir()
    for f in first.iterdir():
        f.unlink()
    (first / "causal.png").write_bytes(b"committed plot")
    assert bench_main(["bench", *SMALL, "--backends", "eager", "--no-plot"]) == 0
    assert (first / "causal.png").read_bytes() == b"committed plot" and list(first.glob("run-*/bench.json"))


@pytest.mark.usefixtures("private_cache")
def test_plot_only_skips_training_results_beside_bench_results(tmp_path):
    shutil.copy(ROOT / "benchmarks/results/nvidia-h200-x2/two_gpu.json", tmp_path / "two_gpu.json")
    with pytest.raises(SystemExit, match="no bench results"):
        bench_main(["bench", "--plot-only", str(tmp_path)])
    assert bench_main(["bench", *SMALL, "--backends", "eager", "--no-plot", "--out", str(tmp_path)]) == 0
    assert bench_main(["bench", "--plot-only", str(tmp_path)]) == 0


@pytest.mark.usefixtures("private_cache")
def test_tune_with_a_subset_of_backends_says_what_it_stores(tmp_path, capsys):
    assert bench_main(["bench", *SMALL, "--backends", "eager,auto", "--tune", "--out", str(tmp_path)]) == 0
    assert "stores the fastest of the listed backends" in capsys.readouterr().err


@pytest.mark.usefixtures("private_cache")
def test_config_file_with_an_unknown_option_is_refused(tmp_path, capsys):
    config = tmp_path / "grid.json"
    config.write_text(json.dumps({"masks": ["causal"], "seqlen": [64]}))
    with pytest.raises(SystemExit) as exit_:
        bench_main(["bench", "--config", str(config), "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "unknown option(s) seqlen" in capsys.readouterr().err


@pytest.mark.usefixtures("private_cache")
def test_merge_says_when_parts_ran_different_software(tmp_path, capsys):
    assert bench_main(["bench", *SMALL, "--backends", "eager", "--no-plot", "--out", str(tmp_path / "a")]) == 0
    other = json.loads((tmp_path / "a" / "bench.json").read_text())
    other["meta"]["torch"] = "0.0.0"
    (tmp_path / "b.json").write_text(json.dumps(other))
    capsys.readouterr()
    assert bench_main(["bench", "--merge", str(tmp_path / "a" / "bench.json"), str(tmp_path / "b.json"),
                       "--out", str(tmp_path / "m"), "--no-plot"]) == 0
    assert "the parts differ in torch" in capsys.readouterr().err


def test_results_json_is_strict(tmp_path):
    from anymask.bench import report

    report.write_json([], [], {"x": float("nan")}, {"ratio": float("inf")}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=pytest.fail) == \
        {"meta": {"x": None}, "summary": {"ratio": None}, "cases": [], "rows": []}


@pytest.mark.usefixtures("private_cache")
def test_summary_without_auto_says_null_not_false(tmp_path, capsys):
    assert bench_main(["bench", *SMALL, "--backends", "eager", "--no-plot", "--out", str(tmp_path)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["auto_within_5pct"] is None and line["auto_within_5pct_cases"] == "0/0"
    assert json.loads((tmp_path / "bench.json").read_text())["summary"]["auto_within_5pct"] is None


def test_config_file_syntax_error_names_the_file_line_and_column(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text('{\n  "masks": [causal]\n}\n')
    with pytest.raises(SystemExit) as exit_:
        bench_main(["bench", "--config", str(config), "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert f"anymask bench: error: {config}: invalid JSON at line 2, column 13" in capsys.readouterr().err
    config.write_bytes(b"\xff\xfe{}")
    with pytest.raises(SystemExit):
        bench_main(["bench", "--config", str(config), "--out", str(tmp_path)])
    assert f"anymask bench: error: {config}: not a text file" in capsys.readouterr().err
    if sys.version_info >= (3, 11):
        toml = tmp_path / "bad.toml"
        toml.write_text('masks = [causal]\n')
        with pytest.raises(SystemExit):
            bench_main(["bench", "--config", str(toml), "--out", str(tmp_path)])
        assert f"anymask bench: error: {toml}: invalid TOML: " in capsys.readouterr().err


def _timed(mask: str, variant: str, ms: float):
    from anymask.bench.runner import Row

    return Row(mask=mask, kind=mask, batch=1, seq=64, heads=2, kv_heads=2, head_dim=16, dtype="bf16",
               mode="fwd+bwd", variant=variant, backend=variant, status="ok", median_ms=ms, tflops=1 / ms,
               eligible=not variant.startswith("raw_") or None)


def test_best_vs_peer_counts_hand_rolled_calls_only():
    """The bar's ratio: best forced backend against dense-mask SDPA / compiled flex, plus SDPA's own
    call on full and causal (there the sdpa backend is that call); FA4 hand-rolled is not a peer."""
    from anymask.bench import report

    rows = [_timed("padding", "cudnn", 1.0), _timed("padding", "sdpa", 1.1), _timed("padding", "raw_flex", 1.5),
            _timed("padding", "raw_sdpa_dense", 3.0), _timed("padding", "raw_fa4", 0.5),
            _timed("causal", "fa4", 1.0), _timed("causal", "sdpa", 1.2), _timed("causal", "raw_flex", 2.0),
            _timed("documents", "triton", 2.0), _timed("documents", "raw_flex", 2.4)]
    cases = {c["mask"]: c for c in report.case_summaries(rows)}
    assert (cases["padding"]["best_peer"], cases["padding"]["best_vs_peer"]) == ("raw_flex", 1.5)
    assert (cases["causal"]["best_peer"], cases["causal"]["best_vs_peer"]) == ("sdpa", 1.2)
    assert cases["documents"]["best_vs_peer"] == pytest.approx(1.2)
    minima = report.summary(rows, list(cases.values()), "x")["structured_best_vs_peer_min"]
    assert minima == {"bf16 fwd+bwd": {"ratio": 1.2, "case": cases["documents"]["case"]}}  # causal is no structured mask
    assert "best/peer" in report.summary_table(list(cases.values())).splitlines()[1]


@pytest.mark.usefixtures("private_cache")
def test_summary_line_states_the_structured_minimum_against_hand_rolled(tmp_path, capsys):
    args = [a if a != "causal" else "padding" for a in SMALL]
    assert bench_main(["bench", *args, "--backends", "sdpa,eager,raw_sdpa_dense", "--no-plot", "--out", str(tmp_path)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    doc = json.loads((tmp_path / "bench.json").read_text())
    ms = {r["variant"]: r["median_ms"] for r in doc["rows"] if r["status"] == "ok"}
    best = min(ms[v] for v in ("sdpa", "eager") if v in ms)
    [(key, worst)] = line["structured_best_vs_peer_min"].items()
    assert key == "fp32 fwd" and worst["ratio"] == round(ms["raw_sdpa_dense"] / best, 3)


@pytest.mark.usefixtures("private_cache")
def test_a_wrong_auto_is_flagged_not_counted_within_5pct(tmp_path, monkeypatch, capsys):
    """auto's result is held to the forced backends' float64 bound: an auto whose output is off
    (here its call is made 1% off on purpose) is named WRONG, listed in the summary line, and never
    counted as within 5% of the best."""
    from anymask.bench import variants
    from anymask.attention import attention

    def off_when_auto(q, k, v, mask, backend="auto", scale=None):
        out = attention(q, k, v, mask, backend=backend, scale=scale)
        return out * 1.01 if backend == "auto" else out

    monkeypatch.setattr(variants, "attention", off_when_auto)
    assert bench_main(["bench", *SMALL, "--backends", "sdpa,eager,auto", "--no-plot", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    line = json.loads(lines[-1])
    wrong, = line["auto_wrong_cases"]
    assert wrong.startswith("causal ")
    assert line["auto_within_5pct"] is False
    assert any(l.lstrip().startswith("auto") and "WRONG: output error" in l for l in lines)
    doc = json.loads((tmp_path / "bench.json").read_text())
    auto, = [r for r in doc["rows"] if r["variant"] == "auto"]
    assert auto["eligible"] is False


def test_a_right_auto_is_checked_too():
    from anymask.bench import report

    from dataclasses import replace

    rows = [_timed("padding", "sdpa", 1.0), replace(_timed("padding", "auto", 1.0), auto_vs_best=1.0, eligible=True)]
    cases = report.case_summaries(rows)
    line = report.summary(rows, cases, "x")
    assert line["auto_wrong_cases"] == [] and line["auto_within_5pct"] is True


def test_auto_checked_right_is_not_a_contender_for_best():
    """auto's row, eligible once its error is checked and timed in its own pairing, never becomes the
    case's best (its ratios would be the best backend against itself)."""
    from dataclasses import replace

    from anymask.bench import report

    rows = [_timed("padding", "sdpa", 1.0), _timed("padding", "raw_flex", 1.5),
            replace(_timed("padding", "auto", 0.8), backend="sdpa", auto_vs_best=1.0, eligible=True)]
    case, = report.case_summaries(rows)
    assert case["best"] == "sdpa" and case["best_vs_peer"] == pytest.approx(1.5)
    assert report.summary(rows, [case], "x")["auto_picked_best_cases"] == "1/1"


@pytest.mark.parametrize("tag", ["sub/x", "..", ""])
def test_a_tag_that_is_not_a_file_name_is_refused_before_the_run(tmp_path, capsys, tag):
    """A tag with a folder crashed after the whole run and every result was lost."""
    with pytest.raises(SystemExit) as exit_:
        bench_main(["bench", *SMALL, "--backends", "eager", "--out", str(tmp_path), "--tag", tag])
    assert exit_.value.code == 2 and "plain file name" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_out_folder_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit) as exit_:
        bench_main(["bench", *SMALL, "--backends", "eager", "--out", str(tmp_path / "taken")])
    assert exit_.value.code == 2 and "cannot create --out" in capsys.readouterr().err


@pytest.mark.usefixtures("private_cache")
def test_plot_only_with_out_leaves_its_input_alone(tmp_path):
    assert bench_main(["bench", *SMALL, "--backends", "eager", "--no-plot", "--out", str(tmp_path / "run")]) == 0
    doc = json.loads((tmp_path / "run" / "bench.json").read_text())
    del doc["summary"]["auto_within_5pct"]  # as an older anymask wrote it
    (tmp_path / "run" / "bench.json").write_text(json.dumps(doc))
    before = {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()}
    assert bench_main(["bench", "--plot-only", str(tmp_path / "run"), "--out", str(tmp_path / "again"),
                       "--no-plot"]) == 0
    assert {f.name: f.read_bytes() for f in (tmp_path / "run").iterdir()} == before
    assert "auto_within_5pct" in json.loads((tmp_path / "again" / "bench.json").read_text())["summary"]
    assert (tmp_path / "again" / "bench.csv").exists()


@pytest.mark.parametrize("extra", [["--masks", "full"], ["--plot-only", "x.json"], ["--tune"], ["--layout", "bshd"],
                                   ["--sets", "5"]])
def test_merge_refuses_options_it_would_ignore(tmp_path, capsys, extra):
    with pytest.raises(SystemExit) as exit_:
        bench_main(["bench", "--merge", "a.json", "--out", str(tmp_path), *extra])
    assert exit_.value.code == 2 and "runs nothing" in capsys.readouterr().err


@pytest.mark.parametrize("config, match", [
    ({"masks": ["causal"], "passes": ["fwd", 3]}, "passes takes names"),
    ({"dtypes": [32]}, "dtypes takes names"),
    ({"grid": ["cpu"]}, "grid takes one value"),
    ({"backends": 5}, "backends takes names"),
    ({"backends": [5]}, "backends takes names"),
    ({"seqlens": [[64]]}, "seqlens takes numbers"),
    ({"heads": [{"q": 4}]}, "heads takes numbers"),
    ({"heads": [True]}, "heads takes numbers"),
])
@pytest.mark.parametrize("command", ["bench", "tune"])
def test_config_values_of_the_wrong_type_are_usage_errors(tmp_path, capsys, config, match, command):
    path = tmp_path / "grid.json"
    path.write_text(json.dumps(config))
    with pytest.raises(SystemExit) as exit_:
        bench_main([command, "--config", str(path), "--no-progress"])
    assert exit_.value.code == 2 and match in capsys.readouterr().err


def test_tune_refuses_a_config_naming_backends(tmp_path, capsys):
    """tune measured every backend whatever the config's backends said."""
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"masks": ["causal"], "backends": ["eager"]}))
    with pytest.raises(SystemExit) as exit_:
        bench_main(["tune", "--config", str(path), "--no-progress"])
    assert exit_.value.code == 2 and "backends is a bench option" in capsys.readouterr().err


@pytest.mark.usefixtures("private_cache")
def test_plots_follow_the_tag_and_a_rerun_drops_plots_it_no_longer_draws(tmp_path):
    pytest.importorskip("matplotlib")
    two = [*SMALL[:1], "causal,full", *SMALL[2:], "--backends", "eager", "--out", str(tmp_path)]
    assert bench_main(["bench", *two]) == 0
    assert bench_main(["bench", *two, "--tag", "other"]) == 0
    assert {p.name for p in tmp_path.glob("*.png")} == {"causal.png", "full.png", "other-causal.png",
                                                         "other-full.png"}
    assert bench_main(["bench", *SMALL, "--backends", "eager", "--out", str(tmp_path), "--tag", "other"]) == 0
    assert {p.name for p in tmp_path.glob("*.png")} == {"causal.png", "full.png", "other-causal.png"}
    (tmp_path / "mine.png").write_bytes(b"not ours")
    assert bench_main(["bench", *SMALL, "--backends", "eager", "--out", str(tmp_path), "--no-plot"]) == 0
    assert {p.name for p in tmp_path.glob("*.png")} == {"other-causal.png", "mine.png"}


@pytest.mark.usefixtures("private_cache")
def test_plot_only_redraws_results_from_before_tagged_plots_in_place(tmp_path):
    pytest.importorskip("matplotlib")
    assert bench_main(["bench", *SMALL, "--backends", "eager", "--out", str(tmp_path), "--tag", "gpu"]) == 0
    assert [p.name for p in tmp_path.glob("*.png")] == ["gpu-causal.png"]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    del doc["meta"]["plot_prefix"]  # as results committed before 2026-12-08 are
    (tmp_path / "gpu.json").write_text(json.dumps(doc))
    (tmp_path / "gpu-causal.png").unlink()
    assert bench_main(["bench", "--plot-only", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.glob("*.png")] == ["causal.png"]


@pytest.mark.usefixtures("private_cache")
def test_plot_only_without_matplotlib_exits_1_and_still_rewrites_the_summaries(tmp_path, monkeypatch, capsys):
    """It exited 0 and told the user to run the command they had just run."""
    from anymask.bench import cli

    assert bench_main(["bench", *SMALL, "--backends", "eager", "--no-plot", "--out", str(tmp_path)]) == 0
    (tmp_path / "bench.csv").unlink()
    monkeypatch.setattr(cli, "probe", lambda name: f"{name} is not importable; pip install 'anymask[bench]'")
    capsys.readouterr()
    assert bench_main(["bench", "--plot-only", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "no plots (matplotlib is not importable; pip install 'anymask[bench]')" in err and "later" not in err
    assert (tmp_path / "bench.csv").exists() and not list(tmp_path.glob("*.png"))


@pytest.mark.usefixtures("private_cache")
def test_a_rerun_leaves_plots_it_did_not_draw_under_its_tag_alone(tmp_path):
    """A rerun of a tag whose earlier JSON recorded no prefix deleted <mask>.png of bench.json."""
    pytest.importorskip("matplotlib")
    assert bench_main(["bench", *SMALL, "--backends", "eager", "--out", str(tmp_path), "--tag", "gpu"]) == 0
    doc = json.loads((tmp_path / "gpu.json").read_text())
    del doc["meta"]["plot_prefix"]  # as results committed before 2026-12-08 are
    (tmp_path / "gpu.json").write_text(json.dumps(doc))
    assert bench_main(["bench", *SMALL, "--backends", "eager", "--out", str(tmp_path)]) == 0  # causal.png
    full = [*SMALL[:1], "full", *SMALL[2:]]
    assert bench_main(["bench", *full, "--backends", "eager", "--out", str(tmp_path), "--tag", "gpu"]) == 0
    assert {p.name for p in tmp_path.glob("*.png")} == {"causal.png", "gpu-causal.png", "gpu-full.png"}
