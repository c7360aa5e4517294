"""Optional dependencies: a hint naming what is missing (the dependency of a dependency too), a
module older than anymask needs is said to be, and commands that need one end in one line."""

from __future__ import annotations

import sys

import pytest

from anymask import _optional
from anymask.cli import main


@pytest.fixture
def modules(tmp_path, monkeypatch):
    """A folder on sys.path for throwaway modules; they leave sys.modules afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        sys.modules.pop(name, None)


def test_the_hint_names_the_module_that_is_missing(modules):
    """Triton's CPU interpreter without numpy said 'pip install triton' to a user who had it."""
    (modules / "anymask_probe_a.py").write_text("import anymask_no_such_module_b\n")
    reason = _optional.probe("anymask_probe_a")
    assert isinstance(reason, str)
    assert "anymask_probe_a is installed but imports anymask_no_such_module_b, which is missing" in reason
    assert _optional.probe("anymask_no_such_module_c").endswith("pip install anymask_no_such_module_c")


def test_a_module_older_than_anymask_needs_is_refused_with_the_version(modules, monkeypatch):
    """transformers 4.46 failed inside transformers (no AttentionInterface) with no version said."""
    (modules / "anymask_probe_old.py").write_text("__version__ = '4.46.3'\n")
    (modules / "anymask_probe_new.py").write_text("__version__ = '5.1.0'\n")
    monkeypatch.setitem(_optional.MIN_VERSIONS, "anymask_probe_old", "4.56")
    monkeypatch.setitem(_optional.MIN_VERSIONS, "anymask_probe_new", "4.56")
    with pytest.raises(_optional.MissingDependency, match=r"anymask_probe_old 4.46.3 is too old \(anymask needs "
                                                           r"anymask_probe_old>=4.56\)"):
        _optional.require("anymask_probe_old")
    assert _optional.require("anymask_probe_new").__version__ == "5.1.0"


def test_a_command_missing_an_optional_dependency_is_one_line(monkeypatch, capsys):
    from anymask import demo, demo_model

    def needs_transformers(*args, **kwargs):
        raise _optional.MissingDependency("transformers is not importable; pip install 'anymask[hf]'")

    monkeypatch.setattr(demo_model, "run_model_demo", needs_transformers)
    monkeypatch.setattr(demo, "run_demo", lambda **kwargs: needs_transformers())
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "anymask demo: error: transformers is not importable; pip install 'anymask[hf]'"


def test_the_demo_skips_its_model_part_without_transformers(monkeypatch, capsys):
    """A core install printed every mask's table, then a traceback and exit 1."""
    from anymask import demo, demo_model

    def needs_transformers():
        raise _optional.MissingDependency("transformers is not importable; pip install 'anymask[hf]'")

    monkeypatch.setattr(demo_model, "run_model_demo", needs_transformers)
    assert demo.run_demo(seq=16, batch=1, heads=1, head_dim=8) == 0
    assert "anymask demo: model part skipped: transformers is not importable" in capsys.readouterr().err
