"""The one module that reads DeepSpeed internals (written against DeepSpeed 0.19.8). Why the
integration needs each, and what it relies on DeepSpeed to do: docs/design.md, "DeepSpeed
behaviours the integration relies on".

Everything else in molf_ds, and the test and benchmark workers, use DeepSpeed's public API
(``deepspeed.initialize``, the engine's methods, ``deepspeed.utils.safe_get_*``,
``deepspeed.zero.GatheredParameters``) plus the helpers here. What they rely on:

- ZeRO-1/2 (``DeepSpeedZeroOptimizer``) and bf16 + ZeRO-1 with fp32 gradient accumulation
  (``BF16_Optimizer``): the client optimizer's param group holds this rank's flat fp32 partition
  (``single_partition_of_fp32_groups`` / ``fp32_groups_flat_partition``), with ``.grad`` set when
  ``step`` is called; each model parameter's ``param._hp_mapping``
  (``deepspeed/utils/tensor_fragment.py`` ``tensor_fragment``: ``hp_fragment_address.start/numel``)
  is the slice of that partition it occupies on this rank, or ``None``. ``link_hp_params`` sets
  it, and ``load_checkpoint`` replaces it, so it is read at every step, never cached.
- ZeRO-3 (``DeepSpeedZeroOptimizer_Stage3``): ``fp32_partitioned_groups_flat`` (one flat fp32
  partition per sub-group), ``grad_position`` / ``get_param_id`` (see `stage3_slice`),
  ``persistent_parameters``, and each parameter's ``ds_id`` / ``ds_status`` / ``ds_numel``.
- Every ZeRO wrapper: ``.optimizer`` (the client optimizer it drives) and ``.dp_process_group``.
- Skipping a step: every optimizer wrapper's ``overflow`` flag, which ``engine.step()`` reads
  (see `deepspeed_skips_nonfinite_steps`), and ``engine.skipped_steps``.
- ``deepspeed.comm.comm.cdb``, the communication backend object (see `comm_backend`).
- The CPU accelerator's comm op: see `turn_off_cpu_shm_comm`.
- ``engine.save_checkpoint``'s order of work, for a rank whose write failed: see
  `finish_failed_save`.
- Whether one of DeepSpeed's compiled ops builds here: the accelerator's op builders
  (``create_op_builder(name).load()``), see `op_build_problem`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from molf_ds.optimizer import MoLFAdamW, flat_segments
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


# ---------------------------------------------------------------------------------------------
# The engine's optimizer wrapper


def client_optimizer(engine: Any) -> Any:
    """The optimizer DeepSpeed's wrapper (``engine.optimizer``) drives; ``engine.optimizer``
    itself when DeepSpeed did not wrap it (no ZeRO, fp32)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def data_parallel_group(engine: Any) -> torch.distributed.ProcessGroup | None:
    """The process group the ZeRO wrapper partitions over (ZeRO stage >= 1)."""
    return engine.optimizer.dp_process_group


# ---------------------------------------------------------------------------------------------
# Steps with a non-finite gradient


def deepspeed_skips_nonfinite_steps(engine: Any) -> bool:
    """Whether DeepSpeed itself skips a step whose gradients hold a NaN or inf.

    Every optimizer wrapper of DeepSpeed 0.19.8 does: ZeRO-1/2 (``stage_1_and_2.step``: a
    non-finite global grad norm, and for bf16 ``bf16.check_grad_overflow``, default on), ZeRO-3
    (``stage3.step``: the same norm check), ``BF16_Optimizer`` and ``FP16_Optimizer``. On such a
    step the wrapper sets ``overflow``, zeroes the gradients and never calls the client optimizer;
    ``engine._take_model_step`` then counts ``skipped_steps``, leaves the LR scheduler where it
    is and makes ``engine.was_step_applied()`` false. The norm is reduced over the ranks first,
    so they all skip together. fp32 without ZeRO hands the client optimizer over unwrapped: it
    has no ``overflow`` and nothing checks (call this before `skip_unwrapped_step` sets one).
    """
    return hasattr(engine.optimizer, "overflow")


def skip_unwrapped_step(engine: Any, skip: bool) -> None:
    """Without a DeepSpeed wrapper (fp32, no ZeRO): make the next ``engine.step()`` skip, or
    not, the way a wrapper's skip goes.

    The gradients go right before the client optimizer's step runs (a one-shot step pre-hook:
    the engine's gradient clipping, before it, needs them): torch's AdamW and `MoLFAdamW` leave a
    parameter without one alone (no moment update, no step count, no routing). ``overflow`` on
    the client optimizer is the flag ``engine._take_model_step`` reads: it counts the skip in
    ``skipped_steps`` and does not advance the LR scheduler. Call it before every step, since
    the flag stays as set.
    """
    optimizer = engine.optimizer
    optimizer.overflow = skip
    if not skip:
        return

    def drop_gradients(opt: Any, args: Any, kwargs: Any) -> None:
        handle.remove()
        for param in engine.module.parameters():
            param.grad = None

    handle = optimizer.register_step_pre_hook(drop_gradients)


def skipped_steps(engine: Any) -> int:
    """Steps DeepSpeed skipped so far (kept in its checkpoints, so it survives a resume)."""
    return int(engine.skipped_steps)


# ---------------------------------------------------------------------------------------------
# Where a parameter's fp32 master lives on this rank


def stage3_slice(
    zero_optimizer: Any, param: torch.nn.Parameter, dp_rank: int
) -> tuple[int, int] | None:
    """ZeRO-3: ``(offset, numel)`` of ``param``'s elements in this rank's flat fp32 sub-group
    partition, or ``None`` when this rank holds none of them.

    ``grad_position[get_param_id(p)] = [sub_group, offset, partition_numel]``
    (``set_grad_positions``): rank ``r`` holds elements ``[r * partition_numel, ...)`` of the
    flattened parameter (``ds_numel`` of them in all), the last rank's share padded.
    """
    _, offset, partition_numel = zero_optimizer.grad_position[zero_optimizer.get_param_id(param)]
    held = min(partition_numel, param.ds_numel - dp_rank * partition_numel)
    return (offset, held) if held > 0 else None


def hp_slice(param: torch.nn.Parameter) -> tuple[int, int] | None:
    """ZeRO-1/2 and ``BF16_Optimizer``: ``(start, numel)`` of ``param``'s elements in this rank's
    flat fp32 partition (``param._hp_mapping``), or ``None`` when this rank holds none."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.hp_fragment_address
    return address.start, address.numel


def local_numel(engine: Any, param: torch.nn.Parameter) -> int:
    """Elements of ``param`` whose fp32 master (and optimizer state) this rank holds: all of
    them without ZeRO, this rank's slice under ZeRO-1/2/3."""
    if engine.zero_optimization_stage() == 3:
        zero = engine.optimizer
        dp_rank = torch.distributed.get_rank(group=zero.dp_process_group)
        piece = stage3_slice(zero, param, dp_rank)
    else:
        piece = hp_slice(param)
        if piece is None and engine.zero_optimization_stage() == 0:
            return param.numel()
    return 0 if piece is None else piece[1]


def master_partitions(engine: Any) -> list[torch.Tensor]:
    """This rank's flat fp32 master partitions (one per param group or ZeRO-3 sub-group); none
    without ZeRO, where the optimizer updates the model's parameters themselves."""
    zero = engine.optimizer
    for name in (
        "fp32_partitioned_groups_flat",  # ZeRO-3
        "single_partition_of_fp32_groups",  # ZeRO-1/2
        "fp32_groups_flat_partition",  # BF16_Optimizer
    ):
        if hasattr(zero, name):
            return list(getattr(zero, name))
    return []


def finish_failed_save(engine: Any) -> None:
    """Run the collectives ``engine.save_checkpoint`` (0.19.8) still had ahead when one of its
    file writes raised on this rank, so that this rank meets the others there: the optimizer's
    ``checkpoint_event_epilogue`` (ZeRO-3: an all-gather of the persistent parameters), then the
    final barrier. Everything between its tag check and these is file writes and
    collective-free (``state_dict`` of the ZeRO-1/2 and ZeRO-3 optimizers included)."""
    if hasattr(engine.optimizer, "checkpoint_event_epilogue"):
        engine.optimizer.checkpoint_event_epilogue()
    torch.distributed.barrier()


def optimizer_state_bytes(engine: Any) -> dict[str, int]:
    """Bytes of optimizer state on this rank, by device type (``"cpu"``, ``"cuda"``...): the
    fp32 master partitions plus every tensor in the client optimizer's state but ``step``."""
    by_device: Counter[str] = Counter()
    tensors = master_partitions(engine) + [
        value
        for state in client_optimizer(engine).state.values()
        for key, value in state.items()
        if isinstance(value, torch.Tensor) and key != "step"
    ]
    for tensor in tensors:
        by_device[tensor.device.type] += tensor.numel() * tensor.element_size()
    return dict(by_device)


@contextmanager
def gathered(params: Iterable[torch.nn.Parameter]) -> Iterator[None]:
    """Within the block, every ZeRO-3 parameter of ``params`` is whole on every rank
    (``deepspeed.zero.GatheredParameters``, read-only: changes are not written back).

    A collective under ZeRO-3: every rank must enter with the same parameters. Parameters that
    ZeRO-3 does not manage pass through untouched (then nothing is communicated)."""
    partitioned = [p for p in params if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def checkpoint_world_size(tag_dir: str | Path) -> int | None:
    """How many data-parallel ranks wrote the ZeRO checkpoint in ``tag_dir``: one
    ``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` per rank (DeepSpeed 0.19.8's names);
    ``None`` without ZeRO partitions (stage 0), which load on any number of ranks."""
    files = list(Path(tag_dir).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt"))
    return len(files) or None


def zero3_residency(param: torch.nn.Parameter) -> str | None:
    """Where a ZeRO-3 parameter's data is on this rank: ``"whole"`` (gathered and available),
    ``"released"`` (only this rank's partition kept), ``"partial"`` (in flight); ``None`` for a
    parameter ZeRO-3 does not manage."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if not hasattr(param, "ds_id"):
        return None
    if param.ds_status == ZeroParamStatus.AVAILABLE and param.numel() == param.ds_numel:
        return "whole"
    if param.ds_status == ZeroParamStatus.NOT_AVAILABLE:
        return "released"
    return "partial"


# ---------------------------------------------------------------------------------------------
# The routed step's segments and reduction (set up by `molf_ds.zero.connect`)


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
    pieces = []
    for param, role in zip(optimizer.plan.params, optimizer.plan.roles, strict=True):
        piece = hp_slice(param)
        if piece is not None:  # else no slice of this parameter lives on this rank
            pieces.append((role, *piece))
    return flat_segments(group, flat, state, pieces), static_candidates(optimizer)


class Stage3Segments:
    """ZeRO-3: one segment per model-parameter slice (`stage3_slice`) in this rank's fp32
    sub-group partition.

    ZeRO-3 calls ``step`` once per sub-group; `molf_ds.initialize` sizes ``sub_group_size`` so
    there is one, and `stage3_segments` refuses more, so routing sees whole modules.
    """

    def __init__(self, zero_optimizer: Any, dp_rank: int) -> None:
        self.zero_optimizer = zero_optimizer
        self.dp_rank = dp_rank

    def __call__(self, optimizer: MoLFAdamW, group: dict) -> tuple[list[Segment], list[list[bool]]]:
        (flat,) = group["params"]
        if flat.grad is None:
            return [], static_candidates(optimizer)
        state = optimizer.advance_state(flat)
        pieces = []
        for param, role in zip(optimizer.plan.params, optimizer.plan.roles, strict=True):
            piece = stage3_slice(self.zero_optimizer, param, self.dp_rank)
            if piece is not None:
                pieces.append((role, *piece))
        return flat_segments(group, flat, state, pieces), static_candidates(optimizer)


def stage3_segments(engine: Any) -> Stage3Segments:
    """The ZeRO-3 segment source of ``engine``, after checking that this rank's partition is one
    sub-group and making the persistent parameters (the LoRA factors) whole on every rank.

    Raises:
        MoLFConfigError: ZeRO-3 split the partition into more than one sub-group.
    """
    from molf_ds.errors import MoLFConfigError

    zero = engine.optimizer
    count = len(zero.fp32_partitioned_groups_flat)
    if count != 1:
        raise MoLFConfigError(
            f"ZeRO-3 split this rank's partition into {count} sub-groups; MoLF routes each step "
            "over whole modules with one all-reduce: raise `zero_optimization.sub_group_size` "
            "above the number of trainable parameters (or leave it unset)"
        )
    # DeepSpeed gathers persistent parameters at the end of each step (``_post_step``); until the
    # first step they would be fetched on first use and released again. Gathering them once
    # here, as ``_post_step`` does, keeps them resident from the first forward on.
    persistent = zero.persistent_parameters
    if persistent:
        persistent[0].all_gather(persistent)
    return Stage3Segments(zero, torch.distributed.get_rank(group=zero.dp_process_group))


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


# ---------------------------------------------------------------------------------------------
# DeepSpeed's communication backend


def comm_backend() -> Any:
    """DeepSpeed's communication backend object (``deepspeed.comm.comm.cdb``; ``None`` before
    ``deepspeed.init_distributed``), whose collectives may bypass torch.distributed (e.g. its
    shared-memory all-reduce on CPU). `molf_ds.testing.CollectiveCounter` watches it."""
    from deepspeed.comm import comm as ds_comm

    return ds_comm.cdb


# ---------------------------------------------------------------------------------------------
# DeepSpeed's compiled ops
# ---------------------------------------------------------------------------------------------


def op_build_problem(builder_name: str) -> str | None:
    """None when DeepSpeed's op ``builder_name`` (e.g. ``"FusedAdamBuilder"``) loads --
    prebuilt, or compiled now, as DeepSpeed would a moment later anyway -- else the first line
    of why not (no such op for this accelerator, no CUDA compiler, ...)."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder(builder_name)
    if builder is None:
        return f"no {builder_name} for this accelerator"
    try:
        builder.load(verbose=False)
    except Exception as err:  # noqa: BLE001 - any failure to build means: not available
        return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return None
