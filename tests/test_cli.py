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
