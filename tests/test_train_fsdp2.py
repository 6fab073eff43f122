"""molf-train's FSDP2 engine from inside: a set-up one-rank ``engine=fsdp2`` Recipe in this
process (its parameters are DTensors on a 1-rank mesh, as on N ranks), stepped by
`Recipe.train_step` as bench/study.py steps it.

What is checked here is what a multi-rank run cannot show from its outputs: that the FSDP2
options reach ``fully_shard`` (bf16 compute over fp32 shards, CPU offload, no reshard after the
forward), and that a step with a non-finite gradient is skipped by the job's own check, as
without ZeRO (tests/test_nonfinite.py holds the cross-rank agreement on DeepSpeed). The 2-rank
run through torchrun is in tests/test_train.py, the Slurm one in tests/test_slurm.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.distributed.tensor import DTensor

from molf_ds.train.config import load_config
from molf_ds.train.recipe import Recipe
from tests.launch import one_rank_recipe

pytestmark = pytest.mark.slow  # builds and steps a model


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Iterator[Recipe]:
    output_dir = tmp_path_factory.mktemp("fsdp2") / "run"
    config = load_config(
        None,
        [
            f"output_dir={output_dir}",
            "engine=fsdp2",
            "bf16=true",
            "fsdp_offload=true",
            "fsdp_reshard_after_forward=false",
            "model=tiny-qwen2",
            "lora_ranks=[4]",
            "micro_batch_size=1",
            "gradient_accumulation_steps=2",
            "max_steps=4",
            "warmup_steps=8",  # the LR changes at every applied step, not at a skipped one
            "eval_examples=1",
        ],
    )
    # one thread, as a rank of a 2-rank job on 2 cores: the suite runs test files side by side
    with one_rank_recipe(config, threads=1) as job:
        yield job


def _full_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def test_fsdp2_options_reach_fully_shard(recipe: Recipe) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule

    from molf_ds.model import named_decoder_blocks

    blocks = [block for _, block in named_decoder_blocks(recipe.model)]
    assert len(blocks) == 4 and isinstance(recipe.model, FSDPModule)
    for block in blocks:
        assert isinstance(block, FSDPModule)
        group = block._get_fsdp_state()._fsdp_param_group  # torch 2.13's FSDPParamGroup
        assert group.mp_policy.param_dtype == torch.bfloat16
        assert group.mp_policy.reduce_dtype == torch.float32
        assert isinstance(group.offload_policy, CPUOffloadPolicy)
        assert group.post_forward_mesh_info is None  # not resharded after the forward
    # the shards stay fp32 DTensors: the master weights the optimizer steps
    assert all(isinstance(p, DTensor) for p in recipe.model.parameters())
    assert all(p.dtype == torch.float32 for p in recipe.model.parameters())
    assert type(recipe.optimizer).__name__ == "MoLFAdamW"


def test_fsdp2_nonfinite_gradient_skips_the_step(recipe: Recipe) -> None:
    """Step 1 applies; step 2, whose logits' gradient is NaN, is skipped: no weight, moment,
    step count or LR change, counted once; step 3 applies again. The forward computes in
    bf16 (the policy) all along."""
    stream = recipe.micro_batches(0)
    seen_dtypes: set[torch.dtype] = set()
    poison = {"on": False}

    def hook(module, args, output):
        seen_dtypes.add(module.weight.dtype)
        if poison["on"]:
            output.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return output

    handle = recipe.model.get_output_embeddings().register_forward_hook(hook)
    try:
        first = recipe.train_step(stream, 0)
        assert first.applied
        before = _full_copy(recipe.model)
        moments = {
            id(p): s["exp_avg"].full_tensor().clone() for p, s in recipe.optimizer.state.items()
        }
        steps = {id(p): s["step"] for p, s in recipe.optimizer.state.items()}
        lr = recipe.engine.get_lr()
        poison["on"] = True
        second = recipe.train_step(stream, 1)
        poison["on"] = False
        assert not second.applied and recipe.engine.skipped_steps == 1
        after = _full_copy(recipe.model)
        for name, value in before.items():
            assert torch.equal(after[name], value), name
        for param, state in recipe.optimizer.state.items():
            assert state["step"] == steps[id(param)]
            assert torch.equal(state["exp_avg"].full_tensor(), moments[id(param)])
        assert recipe.engine.get_lr() == lr  # the schedule did not advance
        third = recipe.train_step(stream, 2)
        assert third.applied and recipe.engine.skipped_steps == 1
        assert recipe.engine.get_lr() != lr
    finally:
        handle.remove()
    assert seen_dtypes == {torch.bfloat16}


def test_fsdp2_refuses_the_other_engines_checkpoint_in_one_line(recipe: Recipe, tmp_path) -> None:
    """A run directory whose checkpoints DeepSpeed wrote (no engine_state.json beside its
    files), resumed with engine=fsdp2, is one line naming both engines, said once, before any
    file is read (DeepSpeed, given a DCP checkpoint, failed with a bare AssertionError)."""
    from molf_ds.errors import EveryRankError

    (tmp_path / "step1").mkdir()
    (tmp_path / "step1" / "mp_rank_00_model_states.pt").write_bytes(b"")
    (tmp_path / "latest").write_text("step1")
    other = Recipe(recipe.config.model_copy(update={"resume": str(tmp_path)}))
    message = "was written by engine=deepspeed, but this run has engine=fsdp2: resume with "
    with pytest.raises(EveryRankError, match=message):
        other._resume()
