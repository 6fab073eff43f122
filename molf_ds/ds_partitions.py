"""Segments from DeepSpeed's flat fp32 partitions: the one module that reads DeepSpeed internals.

Written against DeepSpeed 0.19.8; it relies on

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and bf16 + ZeRO-1 (``BF16_Optimizer``): the client
  optimizer's param group holds this rank's flat fp32 partition, with ``.grad`` set when ``step``
  is called; each model parameter's ``param._hp_mapping`` (``deepspeed/utils/tensor_fragment.py``
  ``tensor_fragment``: ``hp_fragment_address.start/numel``, ``param_group_index``) is the slice of
  that partition it occupies on this rank, or ``None``. ``link_hp_params`` sets it, and
  ``load_checkpoint`` replaces it, so it is read at every step, never cached.
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): see `Stage3Segments`.
- The CPU accelerator's comm op: see `turn_off_cpu_shm_comm`.
"""

from __future__ import annotations

import torch

from molf_ds.optimizer import MoLFAdamW, make_segment
from molf_ds.routed_step import Segment


def turn_off_cpu_shm_comm() -> None:
    """Keep DeepSpeed's CPU shared-memory all-reduce op out of this process; gloo does the work.

    On the CPU accelerator ``deepspeed.comm.torch.TorchBackend`` builds ``deepspeed_shm_comm``
    (``build_shm_op``) unless ``deepspeed.ops.__compatible_ops__`` marks it incompatible. That op
    compiles for minutes on first use (a rank killed mid-compile leaves a build lock that stalls
    every later job), never unlinks its 69 MB-per-rank ``/dev/shm`` buffers, and spins forever
    waiting for a peer that died. ``__compatible_ops__`` is one module-level dict that DeepSpeed
    keeps after its first probe, so marking the op here holds for the process.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def static_candidates(optimizer: MoLFAdamW) -> list[list[bool]]:
    """Every trainable expert is a candidate on every rank.

    Candidates must not depend on which slices a rank holds, or ranks would disagree.
    """
    return [[numel > 0 for numel in row] for row in optimizer.plan.expert_numel]


def hp_mapping_segments(
    optimizer: MoLFAdamW, group: dict
) -> tuple[list[Segment], list[list[bool]]]:
    """ZeRO-1/2 and ``BF16_Optimizer``: one segment per model-parameter slice in this rank's flat
    fp32 partition (``group["params"] == [flat]``, gradient in ``flat.grad``)."""
    (flat,) = group["params"]
    if flat.grad is None:
        return [], static_candidates(optimizer)
    state = optimizer.advance_state(flat)
    segments = []
    for param, role in zip(optimizer.plan.params, optimizer.plan.roles, strict=True):
        mapping = getattr(param, "_hp_mapping", None)
        if mapping is None:
            continue  # no slice of this parameter lives on this rank
        address = mapping.hp_fragment_address
        piece = (address.start, address.numel)
        segments.append(make_segment(group, role, flat, flat.grad, state, piece))
    return segments, static_candidates(optimizer)


def all_reduce_sum(group: torch.distributed.ProcessGroup | None):
    """``reduce_scores`` for the routed step: a SUM all-reduce over the data-parallel group.

    With NCCL a CPU tensor (offloaded partitions) cannot be reduced in place, so it travels to
    the accelerator and back; with gloo it is reduced where it is.
    """
    from deepspeed.accelerator import get_accelerator

    def reduce(scores: torch.Tensor) -> None:
        backend = torch.distributed.get_backend(group)
        if scores.device.type == "cpu" and backend == "nccl":
            on_device = scores.to(get_accelerator().current_device_name())
            torch.distributed.all_reduce(on_device, group=group)
            scores.copy_(on_device)
        else:
            torch.distributed.all_reduce(scores, group=group)

    return reduce


class Stage3Segments:
    """ZeRO-3: one segment per model-parameter slice in this rank's fp32 sub-group partition.

    Relies on ``DeepSpeedZeroOptimizer_Stage3.grad_position[get_param_id(p)] = [sub_group,
    offset, partition_numel]`` (``set_grad_positions``) and ``p.ds_numel``: rank ``r`` holds
    elements ``[r * partition_numel, ...)`` of the flattened parameter, the last rank padded.
    ZeRO-3 calls ``step`` once per sub-group; `molf_ds.initialize` sizes ``sub_group_size`` so
    there is one, and `check_single_sub_group` refuses more, so routing sees whole modules.
    """

    def __init__(self, zero_optimizer, dp_rank: int) -> None:
        self.zero_optimizer = zero_optimizer
        self.dp_rank = dp_rank

    def __call__(self, optimizer: MoLFAdamW, group: dict) -> tuple[list[Segment], list[list[bool]]]:
        (flat,) = group["params"]
        if flat.grad is None:
            return [], static_candidates(optimizer)
        state = optimizer.advance_state(flat)
        zero = self.zero_optimizer
        segments = []
        for param, role in zip(optimizer.plan.params, optimizer.plan.roles, strict=True):
            _, offset, partition_numel = zero.grad_position[zero.get_param_id(param)]
            held = min(partition_numel, param.ds_numel - self.dp_rank * partition_numel)
            if held > 0:
                piece = (offset, held)
                segments.append(make_segment(group, role, flat, flat.grad, state, piece))
        return segments, static_candidates(optimizer)


def check_single_sub_group(zero_optimizer) -> None:
    from molf_ds.errors import MoLFConfigError

    count = len(zero_optimizer.fp32_partitioned_groups_flat)
    if count != 1:
        raise MoLFConfigError(
            f"ZeRO-3 split this rank's partition into {count} sub-groups; MoLF routes each step "
            "over whole modules with one all-reduce: raise `zero_optimization.sub_group_size` "
            "above the number of trainable parameters (or leave it unset)"
        )


def gather_persistent_parameters(zero_optimizer) -> None:
    """Make ZeRO-3's persistent parameters (the LoRA factors) whole on every rank right away.

    DeepSpeed gathers them at the end of each step (``_post_step``); until the first step they
    would be fetched on first use and released again. Gathering them once here, as
    ``_post_step`` does, keeps them resident from the first forward on.
    """
    persistent = zero_optimizer.persistent_parameters
    if persistent:
        persistent[0].all_gather(persistent)
