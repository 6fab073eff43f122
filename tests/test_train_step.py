"""`Recipe.train_step` driven from outside the loop, as bench/study.py drives it: one rank in this
process, a tiny model. A molf-train step makes no device-to-host read per micro-batch: on a GPU
each would stop the host until the device caught up.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from molf_ds.testing import HostReadCounter
from molf_ds.train.config import load_config
from molf_ds.train.recipe import Recipe
from tests.launch import one_rank_recipe

ACCUMULATION = 2  # a read per micro-batch would show up twice
# MoLFAdamW's routing read (one per step; on CPU ranks the fused kernel reads host memory and
# makes none), then the agreement before the optimizer step: without ZeRO (fp32) each rank reads
# whether its gradients are finite, and the all-reduced stop/skip flags come back as one list.
ROUTING_READS = 1
AGREEMENT_READS = 2


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Iterator[Recipe]:
    """A set-up one-rank MoLF run (fp32, no ZeRO, so that the job itself checks gradients)."""
    output_dir = tmp_path_factory.mktemp("train_step") / "run"
    config = load_config(
        None,
        [
            f"output_dir={output_dir}",
            "model=tiny-qwen2",
            "mode=molf",
            "ds_config=zero0",
            "lora_ranks=[4]",
            "micro_batch_size=2",
            f"gradient_accumulation_steps={ACCUMULATION}",
            "max_steps=4",
            "max_length=224",
            "eval_examples=1",
            # transformers' sdpa mask builder reads the padding mask on every forward: the
            # model's own reads, not the loop's (eager attention builds its mask without them)
            "attn_implementation=eager",
        ],
    )
    with one_rank_recipe(config) as job:
        yield job


def test_train_step_makes_no_host_read_per_micro_batch(recipe: Recipe) -> None:
    stream = recipe.micro_batches(0)
    recipe.train_step(stream, 0)  # the first step allocates the optimizer's state
    with HostReadCounter() as reads:
        metrics = recipe.train_step(stream, 1)
    assert reads.count <= ROUTING_READS + AGREEMENT_READS, reads.reads
    assert metrics.step == 2 and metrics.applied and not metrics.stop_requested
    assert len(metrics.losses) == ACCUMULATION
    assert metrics.tokens.device.type == "cpu" and int(metrics.tokens) > 0


def test_train_step_agrees_on_a_stop_request(recipe: Recipe) -> None:
    stream = recipe.micro_batches(2 * ACCUMULATION)
    metrics = recipe.train_step(stream, 2, stop_requested=lambda: True)
    assert metrics.stop_requested and metrics.applied and metrics.step == 3
    assert all(torch.isfinite(loss) for loss in metrics.losses)
