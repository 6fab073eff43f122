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
