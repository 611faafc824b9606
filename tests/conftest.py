"""Shared test settings: everything runs offline, on CPU, with real components run small."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Set before any test imports Ray, DeepSpeed or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "edtalk-torch-extensions"))

# Loopback service fixtures (S3, PostgreSQL, MLflow server, two-node Ray) for @pytest.mark.services tests.
pytest_plugins = ["services"]

REPO_ROOT = Path(__file__).resolve().parents[1]
MEDIA = REPO_ROOT.parent / "shared" / "media"


@pytest.fixture(scope="session")
def media_dir() -> Path:
    """The real talking-face clips of ../shared/media (read-only; never copied into the repo)."""
    if not (MEDIA / "MANIFEST.md").exists():
        pytest.fail(f"real test media not found at {MEDIA}: the project expects ../shared/media beside it")
    return MEDIA
