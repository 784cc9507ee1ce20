"""Session fixtures shared by the engine and integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of built test models for the whole session (also used as LORASERVE_CACHE)."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["LORASERVE_CACHE"] = str(path)
    return path
