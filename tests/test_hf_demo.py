"""The model part of ``anymask demo`` runs end to end (tiny random model: quick)."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from anymask.demo_model import run_model_demo  # noqa: E402


def test_model_demo_runs_with_the_tiny_fallback():
    lines = []
    run_model_demo(console_print=lines.append, use_weights=False)
    text = "\n".join(lines)
    assert "tiny RANDOM model" in text
    assert "bidirectional attention" in text and "prefix-LM" in text
    assert "demo done" in text
