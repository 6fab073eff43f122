"""Shared pytest fixtures, and the order in which the test files run."""

from __future__ import annotations

import random

import pytest
import torch

SEED = 0
# Seconds each file's tests took on three pytest-xdist workers of a 2-core machine (pytest
# --durations=0, summed per file, 2026-12-07; files not named here take under 25 s). scripts/test
# hands whole files to its workers (--dist loadfile) in collection order, so the heaviest go
# first: otherwise the last file to start can be a long one, run alone on one worker while the
# others sit idle. Only the order uses these numbers; a stale one costs time, never a result.
FILE_SECONDS = {
    "test_train.py": 365,
    "test_dead_ranks.py": 250,
    "test_slurm.py": 235,
    "test_hf.py": 235,
    "test_zero_exactness.py": 180,  # fresh machine: builds DeepSpeed's CPU Adam op (80 s warm)
    "test_disk_and_saves.py": 150,
    "test_zero_checkpoints.py": 100,
    "test_nonfinite.py": 65,
    "test_tasks.py": 55,
    "test_zero_init.py": 55,
    "test_layers_and_wrap.py": 50,
    "test_hostile_input.py": 45,
    "test_fsdp2.py": 40,
    "test_study.py": 35,
    "test_fsdp2_library.py": 35,
    "test_estimate.py": 25,
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
