"""The command line as a user runs it."""

import json
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
    padding = out.split("== padding")[1].split("auto ->")[0].splitlines()[1:]
    assert padding[0].split() == ["#"] * 4 + ["."] * 8  # the padded row: 4 of 12 tokens


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


def test_draw_padding_shows_padding(capsys):
    assert main(["draw", "padding", "--seq", "10"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert rows[0] == "# # # # . . . . . ." and rows[-1] == ". " * 9 + "."  # 4 of 10 tokens, 6 padded


def test_draw_refuses_sizes_no_terminal_shows(capsys):
    assert main(["draw", "causal", "--seq", "200"]) == 0
    capsys.readouterr()
    for seq in ("201", "100000"):
        try:
            main(["draw", "causal", "--seq", seq])
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError(f"draw --seq {seq} was accepted")
        err = capsys.readouterr().err
        assert f"anymask draw: error: argument --seq: {seq} is more than 200" in err


def _usage_error(argv, capsys) -> str:
    try:
        main(argv)
    except SystemExit as exc:
        assert exc.code == 2, argv
    else:
        raise AssertionError(f"{argv} was accepted")
    return capsys.readouterr().err


TINY = {"masks": ["causal"], "seqlens": [16], "passes": ["fwd"], "heads": [2], "head_dims": [8], "batch": 1}
TINY_RUN = ["--backends", "eager", "--no-plot", "--no-progress"]  # what a wrongly accepted option runs


def test_bench_seconds_must_be_finite_and_positive(tmp_path, capsys):
    config = tmp_path / "grid.json"
    config.write_text(json.dumps(TINY))
    for flag in ("--budget", "--deadline"):
        for value in ("-1", "0", "nan", "inf"):
            err = _usage_error(["bench", "--config", str(config), *TINY_RUN, "--out", str(tmp_path), flag, value],
                               capsys)
            assert f"anymask bench: error: argument {flag}: {value} is not a finite number of seconds above 0" in err
    for options, message in (({"seqlens": [float("inf")]}, "seqlens: inf is not a whole number"),
                             ({"tokens": float("nan")}, "tokens: nan is not a whole number"),
                             ({"heads": [[4.5, 2]]}, "heads: 4.5 is not a whole number")):
        config.write_text(json.dumps(dict(TINY, **options)))
        err = _usage_error(["bench", "--config", str(config), *TINY_RUN, "--out", str(tmp_path)], capsys)
        assert f"anymask bench: error: {message}" in err and "Traceback" not in err


def test_bench_quick_and_grid_are_one_choice(tmp_path, capsys):
    for command in ("bench", "tune"):
        err = _usage_error([command, "--quick", "--grid", "gpu"], capsys)
        assert f"anymask {command}: error: argument --grid: not allowed with argument --quick" in err
