"""Fixtures for tests/model; the reference models and writers are in model_helpers.py."""

from pathlib import Path

import pytest

SHARED_TOKENIZERS = Path(__file__).resolve().parents[2] / ".." / "shared" / "tokenizers"


@pytest.fixture(scope="session")
def tokenizers_dir() -> Path:
    """../shared/tokenizers beside the clone: GPT-2's BPE data for offline tests."""
    if not SHARED_TOKENIZERS.is_dir():
        pytest.fail(f"test data missing: {SHARED_TOKENIZERS.resolve()} (CI keeps ../shared beside the clone)")
    return SHARED_TOKENIZERS.resolve()
