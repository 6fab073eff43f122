"""`MoLFAdamW` over PyTorch FSDP2 (``fully_shard``): the local shards of DTensor parameters as
segments, and the score all-reduce over the mesh dimensions that shard them.

    molf_ds.wrap(model, cfg)
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    optimizer = MoLFAdamW(model, lr=1e-5)      # finds the DTensors: nothing else to call

A module's score is a sum over its elements, so each rank sums the part it holds and one
all-reduce of the ``[modules x experts]`` partial sums gives every rank the exact global score:
the same one-collective design as under ZeRO, and no parameter is ever gathered. The moments are
DTensors with their parameter's placement, so ``torch.distributed.checkpoint`` reshards them
with the parameters (N ranks -> M ranks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch.distributed.tensor import DTensor, Shard

from molf_ds.errors import MoLFConfigError
from molf_ds.model import named_decoder_blocks
from molf_ds.routed_step import ReduceScores, Segment

if TYPE_CHECKING:
    from molf_ds.optimizer import MoLFAdamW


def is_sharded(params: Sequence[torch.Tensor]) -> bool:
    """Whether ``params`` are FSDP2's DTensors (all of them), or plain tensors (none).

    Raises:
        MoLFConfigError: some are DTensors and some are not: a plain parameter beside sharded
            ones would be counted once per rank in the score reduction.
    """
    sharded = [isinstance(p, DTensor) for p in params]
    if all(sharded) and sharded:
        return True
    if any(sharded):
        plain = sharded.index(False)
        raise MoLFConfigError(
            f"parameter {plain} of the model is not sharded while others are DTensors: "
            "call fully_shard on the root module too (after its blocks), before MoLFAdamW"
        )
    return False


def shard_group(params: Sequence[DTensor]) -> torch.distributed.ProcessGroup:
    """The process group over which the parameters' local shards differ.

    FSDP2 shards on one mesh dimension (``Shard(0)``); under HSDP a second dimension replicates,
    and its replicas hold identical shards that must not be counted twice. Every parameter must
    agree, so that the one reduction covers them all.
    """
    layouts = {(p.device_mesh, p.placements) for p in params}
    if len(layouts) != 1:
        raise MoLFConfigError(
            "MoLFAdamW needs every parameter on the same DeviceMesh with the same placements; "
            f"found {len(layouts)} layouts: shard every block with one mesh"
        )
    mesh, placements = layouts.pop()
    shard_dims = [dim for dim, placement in enumerate(placements) if isinstance(placement, Shard)]
    if len(shard_dims) != 1:
        raise MoLFConfigError(
            f"MoLFAdamW supports parameters sharded along one mesh dimension (FSDP2 or HSDP), "
            f"got placements {placements}"
        )
    return mesh.get_group(shard_dims[0])


def all_reduce_sum(group: torch.distributed.ProcessGroup) -> ReduceScores:
    """``reduce_scores`` for the routed step: a SUM all-reduce over ``group``.

    NCCL cannot reduce a CPU tensor (shards offloaded with ``CPUOffloadPolicy``): the scores
    then travel to the current accelerator and back.
    """

    def reduce(scores: torch.Tensor) -> None:
        if scores.device.type == "cpu" and torch.distributed.get_backend(group) == "nccl":
            on_device = scores.to(torch.accelerator.current_accelerator())
            torch.distributed.all_reduce(on_device, group=group)
            scores.copy_(on_device)
        else:
            torch.distributed.all_reduce(scores, group=group)

    return reduce


def shard_segments(optimizer: MoLFAdamW, group: dict) -> tuple[list[Segment], list[list[bool]]]:
    """The segments of each parameter's local shard; advances the parameters' step counts.

    The state is created on the DTensor (``zeros_like`` keeps the placement, which is what lets a
    checkpoint reshard it); the segments view its local tensor, so the routed step updates the
    shards in place. A rank whose shard of a small parameter is empty still marks the expert as
    a candidate, as every other rank does, and cuts no segment of it.
    """
    from molf_ds.optimizer import make_segment

    segments, candidates = [], [[False] * len(row) for row in optimizer.plan.expert_numel]
    for param, role in zip(group["params"], optimizer.plan.roles, strict=True):
        grad = param.grad
        if grad is None:
            continue
        state = optimizer.advance_state(param)
        if role.module >= 0:
            candidates[role.module][role.expert] = True
        local = param.to_local()
        if local.numel() == 0:
            continue
        segments.append(
            make_segment(
                group,
                role,
                local,
                grad.to_local().contiguous(),
                {
                    "exp_avg": state["exp_avg"].to_local(),
                    "exp_avg_sq": state["exp_avg_sq"].to_local(),
                    "step": state["step"],
                },
            )
        )
    return segments, candidates


def connect(optimizer: MoLFAdamW) -> None:
    """Point ``optimizer`` at its parameters' local shards and their shard group, if they are
    DTensors; leave a model of plain tensors alone."""
    params = optimizer.param_groups[0]["params"]
    if is_sharded(params):
        optimizer.segment_source = shard_segments
        optimizer.reduce_scores = all_reduce_sum(shard_group(params))


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or to a module inside it. Asked of the
    modules, not of the parameters: after an inference forward FSDP2 leaves the root's own
    parameters gathered, plain tensors, until the next backward."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole and detached: a DTensor all-gathered from its shards, a plain tensor as
    it is.

    For a DTensor this is a collective: every rank of its mesh must call it, for the same
    tensors in the same order, and every rank gets the whole tensor (so gather one module at a
    time, never a whole model). Shards offloaded to the CPU (``CPUOffloadPolicy``) on an
    accelerator's mesh travel to the accelerator for the gather: NCCL cannot gather CPU tensors.
    """
    if not isinstance(tensor, DTensor):
        return tensor.detach()
    if tensor.device.type != tensor.device_mesh.device_type:
        tensor = tensor.to(tensor.device_mesh.device_type)
    return tensor.detach().full_tensor()


def local_state_bytes(optimizer: MoLFAdamW) -> dict[str, int]:
    """Bytes of optimizer state this rank holds, by device type (``"cpu"``, ``"cuda"``...): the
    local shards of every tensor in the state (the moments). FSDP2 keeps no master copy: the
    optimizer steps the sharded parameters themselves."""
    by_device: dict[str, int] = {}
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if isinstance(value, DTensor) else value
                kind = local.device.type
                by_device[kind] = by_device.get(kind, 0) + local.numel() * local.element_size()
    return by_device


def shard_model(
    model: torch.nn.Module,
    *,
    mesh: torch.distributed.device_mesh.DeviceMesh | None = None,
    reshard_after_forward: bool = True,
    mp_policy: torch.distributed.fsdp.MixedPrecisionPolicy | None = None,
    offload_policy: torch.distributed.fsdp.OffloadPolicy | None = None,
    ignored_params: set[torch.nn.Parameter] | None = None,
) -> torch.nn.Module:
    """``fully_shard`` each decoder block of a Hugging Face model
    (`molf_ds.model.named_decoder_blocks`), then the
    root (embeddings, final norm, head), as torchtitan and torchtune do: a block's weights are
    gathered only around its own forward and backward. Call it after `molf_ds.wrap` (or PEFT),
    and before building the optimizer. Returns ``model``, sharded in place.

    ``ignored_params`` (``fully_shard``'s own option) stay whole, plain tensors on every rank:
    FSDP2 neither shards them nor reduces their gradients (the caller does, see
    `molf_ds.train.engines.FSDP2Engine`).

    Raises:
        MoLFConfigError: the model names no block class (``_no_split_modules``): sharding only
            the root would gather the whole model for every forward.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, OffloadPolicy, fully_shard

    blocks = [block for _, block in named_decoder_blocks(model)]
    if not blocks:
        raise MoLFConfigError(
            f"{type(model).__name__} names no decoder block class (`_no_split_modules`): "
            "call fully_shard on its blocks yourself, then on the root"
        )
    options = {
        "mesh": mesh,
        "reshard_after_forward": reshard_after_forward,
        "mp_policy": mp_policy or MixedPrecisionPolicy(),
        "offload_policy": offload_policy or OffloadPolicy(),
        "ignored_params": ignored_params,
    }
    for block in blocks:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return model
