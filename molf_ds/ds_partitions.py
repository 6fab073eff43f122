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
- The offloaded step (`install_copy_back`: the selective copy-back, the clip factor applied in
  pass 1, ZeRO-3's persistent parameters kept gathered; checked against
  ``deepspeed.__version__ == "0.19.8"`` and the sha256 of each relied-on method's source,
  `RELIED_ON_SOURCES`, else DeepSpeed's own step runs):
  ZeRO-1/2: ``cpu_offload``, ``single_partition_of_fp32_groups``,
  ``param_buffer_of_bit16_for_cpu_offload_groups``, ``parallel_partitioned_bit16_groups``,
  ``_hp_optimizer_states_linked``, ``zenflow``, ``torch_autocast_gradscaler``, and ``step`` and
  ``unscale_and_clip_grads`` (wrapped on the instance); ZeRO-3: ``offload_optimizer``,
  ``fp16_partitioned_groups_flat``, ``fp32_partitioned_groups_flat``, ``swap_optimizer``,
  ``zero_hpz_partition_size``, ``parameter_offload.zero_quantized_weights``, each persistent
  parameter's ``ds_status`` / ``ds_tensor`` / ``ds_process_group`` / ``ds_persist``,
  ``_unflatten_partitioned_parameters``, and ``step``, ``_partition_all_parameters``,
  ``unscale_and_clip_grads``, ``_reassign_or_swap_out_partitioned_parameters`` and
  ``_post_step`` (replaced on the instance); see `model_partitions` too.
"""

from __future__ import annotations

import hashlib
import os
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from molf_ds import cpu_kernel
from molf_ds.optimizer import MoLFAdamW, flat_segments
from molf_ds.plan import ParamRole
from molf_ds.routed_step import UNROUTED, Segment


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


Piece = tuple[ParamRole, int, int]
"""``(role, start, numel)``: one model parameter's slice of a flat partition."""


class FlatSegmentSource:
    """A segment source over this rank's flat fp32 partition (``group["params"] == [flat]``,
    gradient in ``flat.grad``): one segment per model-parameter slice (`pieces`).

    It keeps the last step's ``(flat, pieces)`` in `last_pieces`, for the selective copy-back
    (`CopyBack`), which must know where each segment lies in the partition.
    """

    def __init__(self) -> None:
        self.last_pieces: tuple[torch.Tensor, list[Piece]] | None = None
        self._views: dict = {}  # the partition's and moments' splits (`flat_segments`)

    def pieces(self, optimizer: MoLFAdamW) -> list[Piece]:
        raise NotImplementedError

    def __call__(self, optimizer: MoLFAdamW, group: dict) -> tuple[list[Segment], list[list[bool]]]:
        (flat,) = group["params"]
        self.last_pieces = None
        if flat.grad is None:
            return [], static_candidates(optimizer)
        state = optimizer.advance_state(flat)
        pieces = self.pieces(optimizer)
        self.last_pieces = (flat, pieces)
        segments = flat_segments(group, flat, state, pieces, self._views)
        return segments, static_candidates(optimizer)


class HpMappingSegments(FlatSegmentSource):
    """ZeRO-1/2 and ``BF16_Optimizer``: each parameter's slice is ``param._hp_mapping``
    (`hp_slice`), read at every step (``load_checkpoint`` replaces it)."""

    def pieces(self, optimizer: MoLFAdamW) -> list[Piece]:
        pieces = []
        for param, role in zip(optimizer.plan.params, optimizer.plan.roles, strict=True):
            piece = hp_slice(param)
            if piece is not None:  # else no slice of this parameter lives on this rank
                pieces.append((role, *piece))
        return pieces


class Stage3Segments(FlatSegmentSource):
    """ZeRO-3: each parameter's slice of this rank's fp32 sub-group partition (`stage3_slice`).

    ZeRO-3 calls ``step`` once per sub-group; `molf_ds.initialize` sizes ``sub_group_size`` so
    there is one, and `stage3_segments` refuses more, so routing sees whole modules.
    """

    def __init__(self, zero_optimizer: Any, dp_rank: int) -> None:
        super().__init__()
        self.zero_optimizer = zero_optimizer
        self.dp_rank = dp_rank

    def pieces(self, optimizer: MoLFAdamW) -> list[Piece]:
        pieces = []
        for param, role in zip(optimizer.plan.params, optimizer.plan.roles, strict=True):
            piece = stage3_slice(self.zero_optimizer, param, self.dp_rank)
            if piece is not None:
                pieces.append((role, *piece))
        return pieces


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
    the accelerator and back; with gloo it is reduced where it is. Over one rank the sum is the
    table itself, so no collective runs (with NCCL and offload it would cost two copies between
    host and device every step).
    """
    from deepspeed.accelerator import get_accelerator

    if torch.distributed.get_world_size(group) == 1:
        return lambda scores: None

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
# Copying the step's result back into the model's parameters (optimizer offload)

COPY_BACK_VERSION = "0.19.8"
"""The DeepSpeed version the selective copy-back is written against; any other runs DeepSpeed's
full copy."""

COPY_BACK_ENV = "MOLF_DS_COPY_BACK"
"""``MOLF_DS_COPY_BACK=full`` keeps DeepSpeed's own offloaded step: its full copy-back, its clip
pass and, under ZeRO-3, its release and re-gather of persistent parameters (the default is
``selective``)."""

# sha256 of ``inspect.getsource`` of each DeepSpeed 0.19.8 method whose order of work the
# selective copy-back relies on (see `CopyBack`). A DeepSpeed whose methods differ (another
# version, a patched install) gets the full copy: the reasoning below holds for this code only.
RELIED_ON_SOURCES = {
    "engine.DeepSpeedEngine._take_model_step": (
        "c4c6e01aa1fc4e7d83fd1076b4105ff104161d5c7d359bcfa2d1ecebdc34b1b8"
    ),
    "zero.stage_1_and_2.DeepSpeedZeroOptimizer.step": (
        "9520884fd916d178728985781674b3c26241dde23e71043dc0beabe507b63b5c"
    ),
    "zero.stage_1_and_2.DeepSpeedZeroOptimizer._optimizer_step": (
        "d7e21affbbf9b696584576042b21bc6147bc15e7ff0baa35b78140da4a484347"
    ),
    "zero.stage_1_and_2.DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state": (
        "45e666d78112a891391f2a78c1f61f845b846d481cbe10deab6e8a644c625294"
    ),
    "zero.stage_1_and_2.DeepSpeedZeroOptimizer.unscale_and_clip_grads": (
        "6bf2ce6f97eafcc24c08a0355e7c180992c8e86da5b7f02026eef6fbd68efa74"
    ),
    "zero.stage3.DeepSpeedZeroOptimizer_Stage3.unscale_and_clip_grads": (
        "3f0d9e8e7861fd44a42cf138d81596b7c36b6170b056302e8776f1cad562ea78"
    ),
    "zero.stage3.DeepSpeedZeroOptimizer_Stage3.step": (
        "c751b3209f83d3b97f416a7bbdd9ca7e0eeafcb3a6072b5abd88440a683fdec9"
    ),
    "zero.stage3.DeepSpeedZeroOptimizer_Stage3._optimizer_step": (
        "35f8511bba5ff760b250d0b0a7d062d28dda6adb699913a298de4b44dba17951"
    ),
    "zero.stage3.DeepSpeedZeroOptimizer_Stage3._reassign_or_swap_out_partitioned_parameters": (
        "af7b449bee8786ec0b8b4c1e27c22bdca2b79186b3888a8c7a9df6bb9c2e8f35"
    ),
    "zero.stage3.DeepSpeedZeroOptimizer_Stage3._unflatten_partitioned_parameters": (
        "00cc8a3f65af736fd5e513e270951e6913b4146b4bbdf3fa0b74610eeb349ee1"
    ),
    "zero.stage3.DeepSpeedZeroOptimizer_Stage3._partition_all_parameters": (
        "5612df89a66654a664f9345ac37e1c286fefbbfec37d20d78f753c260d1b74f9"
    ),
    "zero.stage3.DeepSpeedZeroOptimizer_Stage3._post_step": (
        "d993f8fa66f0663373bb25f9448061d7c2c92e6244ea9b228e011af0ad6842f3"
    ),
    "zero.parameter_offload.DeepSpeedZeRoOffload.partition_all_parameters": (
        "d916ff2d400331eaf62aefca0493cdf46eb8906927f6a3a7aa643c0970f13648"
    ),
    "zero.partitioned_param_coordinator.PartitionedParameterCoordinator.release_and_reset_all": (
        "dba16cef435ceb5eea454df44d3b42f3f12971a2df715c80261853cda35679ce"
    ),
    "zero.partition_parameters.Init._all_gather": (
        "24e484914416ddf78633955c6363dc59974c300adef590ec7019a17cb6f1fb6a"
    ),
}


@dataclass
class CopyBack:
    """How the model's parameters receive the step's result under optimizer offload.

    ``mode`` is ``"selective"`` (only what the routed step changed is copied: the winners'
    segments, the unrouted parameters) or ``"full"`` (DeepSpeed copies the whole partition, as
    it does for any optimizer; ``reason`` says why). ``partition_bytes`` is what the full copy
    writes into the model's parameters each step (this rank's partition in the model's dtype);
    ``last_bytes`` what the last step wrote (``partition_bytes`` under the full copy), and,
    for the selective copy, ``total_bytes`` and ``steps`` the sums since `install_copy_back`.
    Under ZeRO-3, ``regathered_bytes`` is what the last step wrote into the gathered persistent
    parameters it changed (the others keep their values; DeepSpeed's full path re-gathers all).
    """

    mode: str
    reason: str
    partition_bytes: int
    last_bytes: int = 0
    total_bytes: int = 0
    steps: int = 0
    regathered_bytes: int = 0
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def count(self, written: int) -> None:
        self.last_bytes = written
        self.total_bytes += written
        self.steps += 1

    def uninstall(self) -> None:
        """Put DeepSpeed's methods and the optimizer's hooks back as they were."""
        while self._undo:
            self._undo.pop()()


_COPY_BACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> CopyBack


def copy_back_of(optimizer: MoLFAdamW) -> CopyBack | None:
    """The `CopyBack` `molf_ds.zero.connect` installed for ``optimizer`` (None before, or
    without ZeRO)."""
    return _COPY_BACKS.get(optimizer)


def moved(role: ParamRole, winners: Sequence[Sequence[bool]]) -> bool:
    """Whether a routed step changed the parameter (or piece) of ``role``: an unrouted one, or
    a winning expert's (a losing expert's weights are left as they were)."""
    return role.module == UNROUTED or bool(winners[role.module][role.expert])


def changed_spans(
    pieces: Sequence[Piece], winners: Sequence[Sequence[bool]]
) -> list[tuple[int, int]]:
    """``(start, numel)`` runs of a flat partition that a routed step changed: the slices of
    the winners and of unrouted parameters (losers keep their weights). Adjacent changed slices
    merge into one run, across gaps (padding, which no step changes), so a module's LoRA
    factors and the norms beside them are one copy."""
    runs: list[tuple[int, int]] = []
    start = end = -1
    for role, begin, numel in sorted(pieces, key=lambda piece: piece[1]):
        if moved(role, winners):
            if start < 0:
                start = begin
            end = begin + numel
        elif start >= 0:
            runs.append((start, end - start))
            start = -1
    if start >= 0:
        runs.append((start, end - start))
    return runs


def install_copy_back(engine: Any, optimizer: MoLFAdamW) -> CopyBack:
    """Under optimizer offload, make ``engine``'s step do only what the routed step needs: copy
    back into the model's parameters only what it changed, apply DeepSpeed's clip factor in
    pass 1 instead of DeepSpeed's pass over the gradients, and (ZeRO-3) keep the persistent
    parameters gathered, refreshing only those that changed (`_Stage1And2Step`,
    `_Stage3Step`). Anywhere else, or when DeepSpeed is not the code this was checked against,
    leave DeepSpeed's own step (`CopyBack.reason` says why).

    Called by `molf_ds.zero.connect` after the segment source is set; a previous installation
    for ``optimizer`` is undone first (an engine rebuilt by a later ``Trainer.train()``).
    """
    previous = _COPY_BACKS.pop(optimizer, None)
    if previous is not None:
        previous.uninstall()
    zero = engine.optimizer
    stage = engine.zero_optimization_stage()
    problem = _copy_back_problem(engine, optimizer, stage)
    if stage == 3:
        lp = zero.fp16_partitioned_groups_flat[0]  # None: swapped to NVMe
        partition_bytes = 0 if lp is None else lp.numel() * lp.element_size()
    elif stage in (1, 2) and hasattr(zero, "parallel_partitioned_bit16_groups"):
        target = zero.parallel_partitioned_bit16_groups[0][_dp_rank(zero)]
        partition_bytes = target.numel() * target.element_size()
    else:
        partition_bytes = 0
    copy_back = CopyBack("full" if problem else "selective", problem or "", partition_bytes)
    if problem:  # DeepSpeed copies the whole partition every step
        copy_back.last_bytes = partition_bytes
    if not problem:
        step = _Stage3Step if stage == 3 else _Stage1And2Step
        step(copy_back, zero, optimizer).install()
    _COPY_BACKS[optimizer] = copy_back
    return copy_back


def _dp_rank(zero: Any) -> int:
    return torch.distributed.get_rank(group=zero.dp_process_group)


def _copy_back_problem(engine: Any, optimizer: MoLFAdamW, stage: int) -> str | None:
    """Why the selective copy-back cannot run on ``engine`` (None: it can). The start-up check:
    the version, the wrapper's class and settings, and the source of every method it relies on."""
    import deepspeed

    if os.environ.get(COPY_BACK_ENV, "selective") == "full":
        return f"{COPY_BACK_ENV}=full"
    if stage not in (1, 2, 3):
        return "no ZeRO partitions"
    zero = engine.optimizer
    if not getattr(zero, "offload_optimizer" if stage == 3 else "cpu_offload", False):
        return "no optimizer offload"
    if deepspeed.__version__ != COPY_BACK_VERSION:
        return f"DeepSpeed {deepspeed.__version__}, not {COPY_BACK_VERSION}"
    expected = "DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer"
    if type(zero).__name__ != expected or client_optimizer(engine) is not optimizer:
        return f"{type(zero).__name__} driving {type(client_optimizer(engine)).__name__}"
    changed = [name for name, digest in _relied_on(stage).items() if _source_digest(name) != digest]
    if changed:
        return f"DeepSpeed's {', '.join(changed)} differ from {COPY_BACK_VERSION}'s"
    if getattr(zero, "zenflow", False) or getattr(zero, "torch_autocast_gradscaler", None):
        return "ZenFlow or torch autocast"
    if stage == 3:
        if zero.fp16_partitioned_groups_flat[0] is None:
            return "parameters swapped to NVMe"
        if getattr(zero, "swap_optimizer", False):
            return "optimizer state swapped to NVMe"
        return _persistent_problem(zero)
    if len(zero.single_partition_of_fp32_groups) != 1:
        return "more than one parameter group"
    flat = zero.single_partition_of_fp32_groups[0]
    buffer = zero.param_buffer_of_bit16_for_cpu_offload_groups[0]
    target = zero.parallel_partitioned_bit16_groups[0][_dp_rank(zero)]
    if not flat.numel() == buffer.numel() == target.numel():
        return "the partition, its staging buffer and the model's partition differ in size"
    return None


def _persistent_problem(zero: Any) -> str | None:
    """Why ZeRO-3's persistent parameters cannot be refreshed by `_regather` (None: they can):
    it gathers plain partitions over the data-parallel group, not ZeRO++'s secondary or
    quantized ones."""
    offload = zero.parameter_offload
    if getattr(zero, "zero_hpz_partition_size", 1) > 1:
        return "ZeRO++ hierarchical partitions"
    if getattr(offload, "zero_quantized_weights", False):
        return "ZeRO++ quantized weights"
    if any(hasattr(p.ds_tensor, "ds_quant_scale") for p in zero.persistent_parameters):
        return "ZeRO++ quantized partitions"
    if len({id(p.ds_process_group) for p in zero.persistent_parameters}) > 1:
        return "persistent parameters partitioned over more than one process group"
    return None


def _relied_on(stage: int) -> dict[str, str]:
    prefixes = ("engine.", "zero.stage_1_and_2.")
    if stage == 3:
        prefixes = ("engine.", "zero.stage3.", "zero.param", "zero.partition")
    return {name: digest for name, digest in RELIED_ON_SOURCES.items() if name.startswith(prefixes)}


def _source_digest(name: str) -> str:
    """sha256 of the source of ``deepspeed.runtime.<name>`` (``module.Class.method``),
    under its decorators (DeepSpeed's ``instrument_w_nvtx`` keeps the function in its closure,
    without ``__wrapped__``)."""
    import importlib
    import inspect

    module, cls, method = name.rsplit(".", 2)
    try:
        owner = getattr(importlib.import_module(f"deepspeed.runtime.{module}"), cls)
        found = getattr(owner, method)
        while True:
            inner = [
                cell.cell_contents
                for cell in found.__closure__ or ()
                if inspect.isfunction(cell.cell_contents) and cell.cell_contents.__name__ == method
            ]
            if not inner:
                break
            found = inner[0]
        source = inspect.getsource(found)
    except (ImportError, AttributeError, OSError, TypeError, ValueError):
        return "unreadable"
    return hashlib.sha256(source.encode()).hexdigest()


def model_partitions(engine: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``(model partition, fp32 master partition)`` pairs under ZeRO-1/2/3: the
    slice of the model's own parameter storage (what the forward pass reads, in the model's
    dtype) that each step's result is copied into, and the master it is copied from. ZeRO-3's
    partitions swapped to NVMe are ``None``."""
    zero = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        return list(
            zip(zero.fp16_partitioned_groups_flat, zero.fp32_partitioned_groups_flat, strict=True)
        )
    rank = _dp_rank(zero)
    return [
        (partitions[rank], flat)
        for partitions, flat in zip(
            zero.parallel_partitioned_bit16_groups,
            zero.single_partition_of_fp32_groups,
            strict=True,
        )
    ]


def model_partition_matches_master(engine: Any) -> bool:
    """Whether this rank's partition of the model's parameters holds exactly its fp32 master
    partition in the model's dtype: what DeepSpeed's full copy-back leaves after a step (the
    tests check the selective copy-back against it after every step)."""
    return all(
        lp is not None and torch.equal(lp.detach().cpu(), hp.detach().to(lp.dtype).cpu())
        for lp, hp in model_partitions(engine)
    )


class _OffloadedStep:
    """What the offloaded step of both ZeRO layouts shares. The methods named in ``REPLACED``
    (and ``step``) are replaced on DeepSpeed's wrapper by this object's methods of the same
    names (`install`); they act only inside the wrapper's ``step``, which this ``step`` arms:
    checkpoint loads and saves call DeepSpeed's own. DeepSpeed's clip factor is handed to the
    routed step (`fold_clip_factor`), and `after_client_step` runs as the client step's
    post-hook."""

    REPLACED: tuple[str, ...] = ()

    def __init__(self, copy_back: CopyBack, zero: Any, optimizer: MoLFAdamW) -> None:
        self.copy_back, self.zero, self.optimizer = copy_back, zero, optimizer
        self.deepspeed = {name: getattr(zero, name) for name in ("step", *self.REPLACED)}
        self.in_step = False
        self.dp_rank = _dp_rank(zero)
        self.folded: dict[int, float] = {}  # per group: the factor the last step applied

    def install(self) -> None:
        for name in self.deepspeed:
            setattr(self.zero, name, getattr(self, name))
        handle = self.optimizer.register_step_post_hook(self.after_client_step)
        self.copy_back._undo.append(handle.remove)
        self.copy_back._undo += [
            lambda name=name: self.zero.__dict__.pop(name, None) for name in self.deepspeed
        ]

    def step(self, *args: Any, **kwargs: Any) -> Any:
        self.in_step = True
        self.before_step()
        try:
            return self.deepspeed["step"](*args, **kwargs)
        finally:
            self.in_step = False
            self.optimizer.grad_factor = 1.0
            self.after_step()

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_client_step(self, client: Any, args: Any, kwargs: Any) -> None:
        self.optimizer.grad_factor = 1.0

    def fold_clip_factor(
        self,
        group: int,
        grad: torch.Tensor,
        stale: Sequence[tuple[int, int] | None],
        deepspeed_pass: Callable[[], None],
        unscale_probe: Callable[[torch.Tensor], None],
    ) -> None:
        """Hand DeepSpeed's factor for ``group`` (gradient buffer ``grad``) to the routed step
        (`_unscale_factor`), or, when some parameter got no gradient this step (``stale``: its
        slices of ``grad``, `_stale`), put those slots back as DeepSpeed keeps them
        (`_rescale`) and let DeepSpeed's own pass run."""
        if stale:
            _rescale(grad, stale, self.folded.pop(group, None))
            deepspeed_pass()
            return
        self.folded[group] = self.optimizer.grad_factor = _unscale_factor(unscale_probe, grad)


class _Stage1And2Step(_OffloadedStep):
    """ZeRO-1/2 with ``cpu_offload``. DeepSpeed 0.19.8's ``DeepSpeedZeroOptimizer.step`` runs,
    for each param group ``i``, ``unscale_and_clip_grads`` on its gradient partition, the client
    step (``_optimizer_step(i)``), then reads ``fp32 = single_partition_of_fp32_groups[i]``,
    ``buffer = param_buffer_of_bit16_for_cpu_offload_groups[i]`` and ``bit16_partitions =
    parallel_partitioned_bit16_groups[i]`` and copies ``buffer.data.copy_(fp32.data)``, then
    ``bit16_partitions[rank].data.copy_(buffer.data, non_blocking=True)`` (the host-to-device
    copy into the model's weights); the all-gather that follows reads only
    ``parallel_partitioned_bit16_groups``.

    After the client step (its step post-hook) the changed slices are copied the same way, slice
    by slice, and the first two list entries are pointed at the model's partition itself: both of
    DeepSpeed's copies then copy a tensor onto itself, which torch's ``copy_`` returns from
    without touching memory (the same storage, offset, shape, strides and dtype; DeepSpeed's
    ZeRO-3 relies on the same when its fp16 and fp32 partitions are one tensor). The entries are
    put back as soon as ``zero.step`` returns (or raises). Not on the first step, where
    ``_lazy_init_hp_params_optimizer_state`` reads the fp32 entry after the client step.
    """

    REPLACED = ("unscale_and_clip_grads",)

    def __init__(self, copy_back: CopyBack, zero: Any, optimizer: MoLFAdamW) -> None:
        super().__init__(copy_back, zero, optimizer)
        self.own = [
            (zero.get_param_id(p), p)
            for group in zero.params_in_partition
            for p in group
            if p.requires_grad
        ]
        self.saved: list[tuple[torch.Tensor, torch.Tensor]] = []

    def after_step(self) -> None:
        if self.saved:
            flat, buffer = self.saved.pop()
            self.zero.single_partition_of_fp32_groups[0] = flat
            self.zero.param_buffer_of_bit16_for_cpu_offload_groups[0] = buffer

    def unscale_and_clip_grads(self, grad_groups_flat: list, total_norm: Any) -> None:
        deepspeed = self.deepspeed["unscale_and_clip_grads"]
        if not self.in_step:
            deepspeed(grad_groups_flat, total_norm)
            return
        self.fold_clip_factor(
            0,
            grad_groups_flat[0],
            [hp_slice(p) for p in _stale(self.zero, self.own)],
            lambda: deepspeed(grad_groups_flat, total_norm),
            lambda probe: deepspeed([probe], total_norm),
        )

    def after_client_step(self, client: Any, args: Any, kwargs: Any) -> None:
        super().after_client_step(client, args, kwargs)
        if self.in_step:
            self.copy_back.count(self._copy_changed())

    def _copy_changed(self) -> int:
        """The selective copy (see the class docstring); returns the bytes written."""
        zero, optimizer = self.zero, self.optimizer
        last = getattr(optimizer.segment_source, "last_pieces", None)
        flat = zero.single_partition_of_fp32_groups[0]
        record = optimizer.last_routing
        if last is None or last[0] is not flat or record is None:
            return self.copy_back.partition_bytes  # DeepSpeed's full copy runs
        if not zero._hp_optimizer_states_linked:  # the first step: see the docstring
            return self.copy_back.partition_bytes
        buffer = zero.param_buffer_of_bit16_for_cpu_offload_groups[0]
        target = zero.parallel_partitioned_bit16_groups[0][self.dp_rank]
        written = _copy_spans(changed_spans(last[1], record.winners.tolist()), flat, buffer, target)
        self.saved.append((flat, buffer))
        zero.single_partition_of_fp32_groups[0] = target
        zero.param_buffer_of_bit16_for_cpu_offload_groups[0] = target
        return written


def _stale(zero: Any, own: Sequence[tuple[int, torch.nn.Parameter]]) -> list[torch.nn.Parameter]:
    """The parameters with elements in this rank's partition (``own``: DeepSpeed's parameter id
    and the parameter) that got no gradient since the last step: DeepSpeed records each one's
    norm in ``norm_for_param_grads`` as its gradient lands, and empties it after the step."""
    return [p for i, p in own if i not in zero.norm_for_param_grads]


@torch.no_grad()
def _rescale(
    grad: torch.Tensor, slices: Sequence[tuple[int, int] | None], factor: float | None
) -> None:
    """Put DeepSpeed's values back in the ``slices`` of the offloaded gradient buffer ``grad``
    that a skipped parameter left from the last step. Under offload DeepSpeed keeps such a
    slot as it was and multiplies it by each step's factor in place, so it holds the last
    gradient times the factors since; when the last step's factor (``factor``) was applied in
    pass 1 instead, the slot still holds the gradient without it, and is multiplied here."""
    if factor is None:
        return
    for piece in slices:
        if piece is not None:
            start, numel = piece
            grad[start : start + numel].mul_(factor)


def _unscale_factor(unscale: Callable[[torch.Tensor], None], grad: torch.Tensor) -> float:
    """The factor DeepSpeed's ``unscale_and_clip_grads`` would multiply the gradients by (loss
    scale and clipping), read by letting ``unscale`` multiply a one-element float32 probe of
    ones instead: ``1 * f`` is ``f`` as a float32, the value torch multiplies each gradient by
    (float32 masters; a bf16 gradient's product is taken in float32 too). The routed step then
    applies it as it reads the gradients (`MoLFAdamW.grad_factor`), which saves DeepSpeed's
    separate pass over all of them (8 bytes per parameter)."""
    probe = torch.ones(1, dtype=torch.float32, device=grad.device)
    unscale(probe)
    return probe.item()


@torch.no_grad()
def _copy_spans(
    spans: Sequence[tuple[int, int]],
    flat: torch.Tensor,
    buffer: torch.Tensor | None,
    target: torch.Tensor,
) -> int:
    """Copy ``flat``'s ``spans`` into ``target`` (the model's partition), as DeepSpeed copies
    the whole partition: through ``buffer`` (pinned host memory in ``target``'s dtype) when
    ``target`` is on an accelerator, so that the host-to-device copy is asynchronous; directly
    when it is in host memory (float32 both: all spans in one call of the CPU kernel). Returns
    the bytes written into ``target``."""
    staged = buffer is not None and target.device.type != "cpu"
    if not staged and cpu_kernel.can_copy_spans(target, flat) and cpu_kernel.available():
        cpu_kernel.copy_spans(target, flat, spans)
    else:
        for start, numel in spans:
            piece = slice(start, start + numel)
            if staged:
                buffer[piece].copy_(flat[piece])
                target[piece].copy_(buffer[piece], non_blocking=True)
            else:
                target[piece].copy_(flat[piece])
    return sum(numel for _, numel in spans) * target.element_size()


class _Stage3Step(_OffloadedStep):
    """ZeRO-3 with ``offload_optimizer`` (and ``offload_param``). DeepSpeed 0.19.8's
    ``DeepSpeedZeroOptimizer_Stage3.step`` runs ``_partition_all_parameters`` (every parameter
    released to its partition, the persistent ones included: ``partition_all_parameters`` and the
    coordinator's ``release_and_reset_all`` release each AVAILABLE one and check that none is
    left), then per sub-group ``unscale_and_clip_grads``, the client step (``_optimizer_step``)
    and ``_reassign_or_swap_out_partitioned_parameters(i)``: the whole
    ``fp16_partitioned_groups_flat[i].data.copy_(fp32_partitioned_groups_flat[i].data)``, then
    ``_unflatten_partitioned_parameters(i)`` (each partitioned parameter's data pointed back at
    its view of that buffer); then ``_post_step``, whose ``all_gather`` of the persistent
    parameters gathers those that are NOT_AVAILABLE (``Init._all_gather`` skips the others), one
    collective per parameter. Replaced, inside ``step``:

    - the release keeps the persistent parameters (the LoRA factors, biases and norms) gathered:
      it hides them from DeepSpeed's release by their status, and puts it back;
    - ``unscale_and_clip_grads`` hands its factor to the routed step (`fold_clip_factor`);
    - the copy-back copies only the changed slices (noted by the client step's post-hook, used
      once) and then unflattens the same way; without a note (a step that did not route) it
      calls DeepSpeed's own;
    - before ``_post_step``, the persistent parameters the step changed (`moved`; every one
      after a client step without a routing record) are refreshed from their new partitions
      with one all-gather (`_regather`), the values DeepSpeed's gather writes; those that lost
      keep their values, which their partitions still hold. The ranks agree on which are kept:
      a parameter becomes gathered only by an all-gather every rank takes part in.
    """

    REPLACED = (
        "_partition_all_parameters",
        "unscale_and_clip_grads",
        "_reassign_or_swap_out_partitioned_parameters",
        "_post_step",
    )

    def __init__(self, copy_back: CopyBack, zero: Any, optimizer: MoLFAdamW) -> None:
        super().__init__(copy_back, zero, optimizer)
        self.persistent = list(zero.persistent_parameters)
        self.persistent_ids = {id(p) for p in self.persistent}
        plan = optimizer.plan
        self.routed_persistent = [
            (p, role)
            for p, role in zip(plan.params, plan.roles, strict=True)
            if id(p) in self.persistent_ids
        ]
        self.id_of = {p: zero.get_param_id(p) for group in zero.fp16_groups for p in group}
        self.own = [
            (i, p) for p, i in self.id_of.items() if stage3_slice(zero, p, self.dp_rank) is not None
        ]
        self.pending: list[tuple[torch.Tensor, list[tuple[int, int]]]] = []
        self.kept: list[torch.nn.Parameter] = []  # persistent, left gathered through the step
        self.changed: set[int] = set()  # ids of the persistent parameters the step changed

    def before_step(self) -> None:
        self.kept.clear()
        self.changed.clear()
        self.pending.clear()
        self.copy_back.regathered_bytes = 0

    def _partition_all_parameters(self) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        if not self.in_step:
            self.deepspeed["_partition_all_parameters"]()
            return
        self.kept[:] = [p for p in self.persistent if p.ds_status == ZeroParamStatus.AVAILABLE]
        for p in self.kept:
            p.ds_status = ZeroParamStatus.NOT_AVAILABLE  # DeepSpeed's release skips it
        try:
            self.deepspeed["_partition_all_parameters"]()
        finally:
            for p in self.kept:
                p.ds_status = ZeroParamStatus.AVAILABLE

    def unscale_and_clip_grads(self, sub_group_id: int, total_norm: Any) -> None:
        deepspeed = self.deepspeed["unscale_and_clip_grads"]
        if not self.in_step:
            deepspeed(sub_group_id, total_norm)
            return
        flats = self.zero.fp32_partitioned_groups_flat
        flat = flats[sub_group_id]

        def unscale_probe(probe: torch.Tensor) -> None:
            flats[sub_group_id] = SimpleNamespace(grad=probe)  # what DeepSpeed multiplies
            try:
                deepspeed(sub_group_id, total_norm)
            finally:
                flats[sub_group_id] = flat

        stale = [
            stage3_slice(self.zero, p, self.dp_rank)
            for p in _stale(self.zero, self.own)
            if self.zero.grad_position[self.id_of[p]][0] == sub_group_id
        ]
        self.fold_clip_factor(
            sub_group_id,
            flat.grad,
            stale,
            lambda: deepspeed(sub_group_id, total_norm),
            unscale_probe,
        )

    def after_client_step(self, client: Any, args: Any, kwargs: Any) -> None:
        super().after_client_step(client, args, kwargs)
        self.pending.clear()
        last = getattr(self.optimizer.segment_source, "last_pieces", None)
        record = self.optimizer.last_routing
        if last is None or record is None:
            self.changed.update(self.persistent_ids)
            return
        winners = record.winners.tolist()
        self.pending.append((last[0], changed_spans(last[1], winners)))
        self.changed.update(id(p) for p, role in self.routed_persistent if moved(role, winners))

    def _reassign_or_swap_out_partitioned_parameters(self, sub_group_id: int) -> None:
        note = self.pending.pop() if self.pending else None
        hp = self.zero.fp32_partitioned_groups_flat[sub_group_id]
        lp = self.zero.fp16_partitioned_groups_flat[sub_group_id]
        if note is None or note[0] is not hp or lp is None:
            if lp is not None:
                self.copy_back.count(lp.numel() * lp.element_size())
            self.deepspeed["_reassign_or_swap_out_partitioned_parameters"](sub_group_id)
            return
        self.copy_back.count(_copy_spans(note[1], hp, None, lp))
        self.zero._unflatten_partitioned_parameters(sub_group_id)

    def _post_step(self, timer_names: Any) -> None:
        if self.in_step:
            refreshed = [p for p in self.kept if id(p) in self.changed]
            self.copy_back.regathered_bytes = _regather(refreshed)
        self.deepspeed["_post_step"](timer_names)


@torch.no_grad()
def _regather(params: Sequence[torch.nn.Parameter]) -> int:
    """Write into each gathered ZeRO-3 parameter of ``params`` its partitions as they are now
    (``ds_tensor`` on every rank of their ``ds_process_group``, the group DeepSpeed gathers
    them over, one for all: see `_persistent_problem`): one all-gather of all of them, where
    DeepSpeed releases and gathers each (the same values: the ranks' partitions in rank order,
    without the padding). On one rank a parameter whose data is its partition's storage is
    left alone. Returns the bytes copied into the parameters (over several ranks: gathered)."""
    if not params:
        return 0
    group = params[0].ds_process_group
    world = torch.distributed.get_world_size(group=group)
    device = params[0].device
    if world == 1:  # the partition is the whole parameter
        params = [p for p in params if p.data.data_ptr() != p.ds_tensor.data_ptr()]
        for p in params:
            p.data.view(-1).copy_(p.ds_tensor.view(-1)[: p.ds_numel])
        return sum(p.ds_numel * p.element_size() for p in params)
    local = torch.cat([p.ds_tensor.view(-1) for p in params]).to(device)
    gathered = torch.empty(world * local.numel(), dtype=local.dtype, device=device)
    torch.distributed.all_gather_into_tensor(gathered, local, group=group)
    by_rank = gathered.view(world, -1)
    offset = 0
    for p in params:
        size = p.ds_tensor.numel()
        columns = by_rank[:, offset : offset + size]  # rank r's partition of p in row r
        if world * size == p.ds_numel:
            p.data.view(world, size).copy_(columns)
        else:  # the last partition is padded
            p.data.view(-1).copy_(columns.reshape(-1)[: p.ds_numel])
        offset += size
    return gathered.numel() * gathered.element_size()


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
