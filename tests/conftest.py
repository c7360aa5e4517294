"""Fixtures shared by several test files."""

import pytest


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh measured-choices cache (``ANYMASK_CACHE_DIR``) for one test, so a bench or tune run
    neither reads nor writes the user's."""
    from anymask import tuning

    monkeypatch.setenv("ANYMASK_CACHE_DIR", str(tmp_path / "cache"))
    tuning.reload()
    yield
    tuning.reload()
