"""``anymask bench`` / ``tune`` / ``demo`` say how a run ended: exit status and one line, never a
traceback, and results are never lost to a second run or an unwritable folder."""

import os

import pytest

from anymask.bench import cli as bench_cli
from anymask.bench import runner
from anymask.bench.__main__ import main as bench_main
from anymask.cli import main

pytestmark = pytest.mark.usefixtures("private_cache")

TUNE = ["--quick", "--masks", "causal", "--seqlens", "16", "--dtypes", "fp32", "--passes", "fwd", "--no-progress"]
TINY = [*TUNE, "--budget", "0.01", "--no-plot"]


def _interrupt_after(monkeypatch, calls: int):
    real, seen = runner.run_case, []

    def run_case(*args, **kwargs):
        seen.append(1)
        if len(seen) > calls:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "run_case", run_case)


def test_an_interrupted_bench_exits_130_and_keeps_what_it_measured(tmp_path, monkeypatch, capsys):
    """It exited 0, saying nothing."""
    _interrupt_after(monkeypatch, 1)
    assert bench_main(["bench", *TINY, "--masks", "causal,padding", "--out", str(tmp_path)]) == 130
    assert "anymask bench: interrupted; 1 case not started" in capsys.readouterr().err
    assert '"variant": "sdpa"' in (tmp_path / "bench.json").read_text().replace("'", '"')


def test_a_failed_variant_or_nothing_measured_exits_1(tmp_path, monkeypatch, capsys):
    """Both exited 0."""
    from anymask import backend as B

    def broken(q, k, v, p):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(B.get("eager"), "run", broken)
    assert bench_main(["bench", *TINY, "--backends", "eager", "--out", str(tmp_path / "a")]) == 1
    assert "1 variant(s) failed" in capsys.readouterr().err
    monkeypatch.setattr(runner, "run_case", lambda case, *a, **k: [runner._row(case, "", "eager", "-", "skipped",
                                                                              reason="not here")])
    assert bench_main(["bench", *TINY, "--out", str(tmp_path / "b")]) == 1
    assert "nothing was measured" in capsys.readouterr().err


def test_results_that_cannot_be_written_are_refused_before_measuring(tmp_path, monkeypatch, capsys):
    """A bench.json that is a directory cost the whole run and printed a traceback."""
    (tmp_path / "bench.json").mkdir()
    monkeypatch.setattr(runner, "run", lambda *a, **k: pytest.fail("measured before checking the output"))
    with pytest.raises(SystemExit) as stop:
        bench_main(["bench", *TINY, "--out", str(tmp_path)])
    assert stop.value.code == 2
    assert "is a directory" in capsys.readouterr().err


def test_two_runs_into_the_default_folder_get_two_folders(tmp_path):
    """Both wrote run-<same second>/bench.json; one run's results were lost."""
    base = tmp_path / "results"
    first, second, third = (bench_cli._default_out(base) for _ in range(3))
    assert first == base and len({first, second, third}) == 3 and second.parent == third.parent == base
    assert (first / ".anymask-bench.running").read_text() == str(os.getpid())


def test_a_dead_runs_claim_is_taken_over(tmp_path):
    import subprocess

    dead = subprocess.run(["true"]).args and subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / ".anymask-bench.running").write_text(str(dead.pid))
    assert bench_cli._default_out(tmp_path) == tmp_path


def test_tune_with_an_unwritable_cache_is_refused_before_measuring(tmp_path, monkeypatch, capsys):
    """It measured, warned, exited 0 and named the cache it had not written."""
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("ANYMASK_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(SystemExit) as stop:
        bench_main(["tune", *TUNE])
    assert stop.value.code == 2
    assert "cannot write the tuning cache" in capsys.readouterr().err


def test_tune_marks_cached_choices_and_an_interrupt_keeps_its_results(monkeypatch, capsys):
    args = ["tune", *TUNE, "--masks", "causal,padding"]
    assert bench_main(args) == 0
    assert "(cached" not in capsys.readouterr().out
    assert bench_main(args) == 0
    assert capsys.readouterr().out.count("(cached; --force re-measures)") == 2
    from anymask import tuning

    real, calls = tuning.tune, []

    def tune_then_stop(*a, **k):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(tuning, "tune", tune_then_stop)
    assert bench_main(args) == 130
    out, err = capsys.readouterr()
    assert "causal" in out and "interrupted after 1 of 2 cases" in err and "Traceback" not in err


def test_ctrl_c_in_demo_is_one_line(monkeypatch, capsys):
    import anymask.demo

    def interrupted(**kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(anymask.demo, "run_demo", interrupted)
    assert main(["demo", "--no-model"]) == 130
    assert capsys.readouterr().err.strip() == "anymask demo: interrupted"


def test_a_case_that_never_started_says_so_in_the_table():
    """Its header read ``(, density 0.000, 0 GFLOP)``."""
    from anymask.bench import report
    from anymask.bench.cases import GRIDS, expand

    case = expand(GRIDS["quick"])[0]
    rows = [runner._row(case, "", "*", "-", "skipped", reason="not started: interrupted")]
    assert "(not started)" in report.full_table(rows).splitlines()[0]


def test_sigterm_in_demo_is_one_line_and_exit_130(monkeypatch, capsys):
    """SIGTERM (``timeout``, a scheduler) killed demo and tune with status 143 and no word."""
    import signal
    import time

    import anymask.demo

    def terminated(**kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(anymask.demo, "run_demo", terminated)
    assert main(["demo", "--no-model"]) == 130
    assert capsys.readouterr().err.strip() == "anymask demo: interrupted"
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_config_value_the_command_line_overrides_is_not_read():
    """``"batch": 0`` in the file was an error even with ``--batch 1``."""
    from anymask.bench.cases import override_parts

    parts = override_parts("quick", {"batch": 0, "seqlens": [16]}, {"batch": 1, "seqlens": None})
    assert {g.batch for g in parts} == {1} and {g.seqlens for g in parts} == {(16,)}
    with pytest.raises(ValueError, match="batch"):
        override_parts("quick", {"batch": 0}, {"batch": None})
