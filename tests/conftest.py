"""Shared fixtures: data tasks cache into a temporary folder, never into the user's cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _temporary_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))
