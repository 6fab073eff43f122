"""Shared pytest fixtures, and the order in which the test files run."""

from __future__ import annotations

import random

import pytest
import torch

SEED = 0
# Seconds each file's tests took on two pytest-xdist workers of a 2-core machine (pytest
# --durations=0, summed per file; files not named here take under half a minute). scripts/test
# hands whole files to its two workers (--dist loadfile) in collection order, so the heaviest go
# first: otherwise the last file to start can be a long one, run alone on one worker while the
# other sits idle. Only the order uses these numbers; a stale one costs time, never a result.
FILE_SECONDS = {  # measured on the 2-core machine (2026-12-07, warm caches), heaviest first
    "test_train.py": 295,
    "test_slurm.py": 225,
    "test_dead_ranks.py": 190,
    "test_zero_exactness.py": 180,  # on a fresh machine: it builds DeepSpeed's CPU Adam op
    "test_hf.py": 150,
    "test_disk_and_saves.py": 90,
    "test_nonfinite.py": 75,
    "test_zero_checkpoints.py": 75,
    "test_tasks.py": 40,
    "test_layers_and_wrap.py": 40,
    "test_fsdp2.py": 35,
    "test_estimate.py": 30,
    "test_zero_init.py": 30,
    "test_fsdp2_library.py": 30,
    "test_hostile_input.py": 27,
    "test_study.py": 25,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Heaviest test files first (`FILE_SECONDS`); tests keep their order within a file."""
    items.sort(key=lambda item: -FILE_SECONDS.get(item.path.name, 0))  # a stable sort


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
