"""The learning-rate schedule of every mode: a linear warm-up, then linear, cosine or constant
decay to ``max_steps``, as a factor of the peak rate (`lr_factor`) and as the ``lr_scheduler``
argument DeepSpeed takes (`scheduler`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from molf_ds.train.config import TrainConfig

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(
    *, warmup_steps: int, max_steps: int, schedule: str = "cosine"
) -> Callable[[int], float]:
    """``step -> factor`` of the peak rate: ``(step + 1) / (warmup_steps + 1)`` during the
    warm-up, then ``schedule`` over the steps left (``constant``: 1)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        if schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def config_lr_factor(cfg: TrainConfig) -> Callable[[int], float]:
    """`lr_factor` of a job's options (``warmup_steps``, ``max_steps``, ``schedule``)."""
    return lr_factor(warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps, schedule=cfg.schedule)


def scheduler(
    factor: Callable[[int], float],
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """DeepSpeed's ``lr_scheduler`` argument: optimizer → `LambdaLR` of ``factor``."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
