"""Fixtures of the Hugging Face tests (helpers: hf_models.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hf_models import make_llama


@pytest.fixture(scope="session")
def hf_llama(tmp_path_factory) -> Path:
    """A tiny random transformers Llama with the sample tokenizer as tokenizer.json."""
    return make_llama(tmp_path_factory.mktemp("hf") / "llama")
