"""The command line as a user runs it."""

import subprocess
import sys

from anymask import masks as M
from anymask.cli import main


def test_info_lists_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("eager", "sdpa"):
        assert name in out


def test_draw(capsys):
    assert main(["draw", "prefix_lm", "--seq", "8"]) == 0
    assert capsys.readouterr().out.strip() == M.CATALOGUE["prefix_lm"](1, 8).picture(8)
    assert main(["draw", "nope"]) == 2


def test_demo_small(capsys):
    assert main(["demo", "--seq", "24", "--batch", "1", "--heads", "2", "--head-dim", "8", "--no-model"]) == 0
    out = capsys.readouterr().out
    for name in M.CATALOGUE:
        assert f"== {name}" in out
    assert out.count("auto ->") == len(M.CATALOGUE)
    assert "<- auto" in out


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "anymask", "draw", "causal", "--seq", "3"],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "# . .\n# # .\n# # #"


def test_bad_sizes_are_usage_errors(capsys):
    for argv in (["draw", "causal", "--seq", "0"], ["demo", "--heads", "-1"], ["demo", "--seq", "x"]):
        try:
            main(argv)
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
    err = capsys.readouterr().err
    assert "0 is not 1 or more" in err and "'x' is not a whole number" in err and "Traceback" not in err


def test_bench_bad_options_are_one_line_errors(tmp_path, capsys):
    missing = str(tmp_path / "missing.toml")
    cases = {("--masks", "bogus"): "unknown mask 'bogus'", ("--heads", "abc"): "heads 'abc'",
             ("--heads", "3:2"): "positive multiple of kv heads", ("--dtypes", "fp8"): "unknown dtype 'fp8'",
             ("--seqlens", "x"): "seqlens: 'x' is not a whole number", ("--seqlens", "0"): "1 or more",
             ("--backends", "bogus"): "unknown backend 'bogus'", ("--config", missing): "missing.toml",
             ("--device", "foo"): "cpu or cuda"}
    for (flag, value), message in cases.items():
        for command in ("bench", "tune"):
            if command == "tune" and flag == "--backends":
                continue
            try:
                out = ["--out", str(tmp_path)] if command == "bench" else []
                main([command, "--quick", "--no-progress", *out, flag, value])
            except SystemExit as exc:
                assert exc.code == 2, (command, flag, value)
            else:
                raise AssertionError(f"{command} {flag} {value} was accepted")
            err = capsys.readouterr().err
            assert message in err and f"anymask {command}: error:" in err, (command, flag, err)
