"""Shared pytest fixtures."""

from __future__ import annotations

import random

import pytest
import torch

SEED = 0


@pytest.fixture(autouse=True)
def seed_everything():
    """Seed Python's and torch's RNGs before every test so failures reproduce."""
    random.seed(SEED)
    torch.manual_seed(SEED)


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' Arrow cache of the test files inside the test's tmp_path (modules that
    read files through `datasets` use it for every test: ``pytest.mark.usefixtures``)."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


@pytest.fixture(scope="module")
def tok():
    """molf-train's byte-level tokenizer (one token per byte)."""
    from molf_ds.train.tokenizer import byte_tokenizer

    return byte_tokenizer()
