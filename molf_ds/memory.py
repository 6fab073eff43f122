"""The memory model: `estimate_memory` gives per-GPU and per-node memory of the model states of
FFT, LoRA, MoLF and MoLF-Efficient under DeepSpeed ZeRO 0-3, with and without CPU offload --
before renting GPUs.

    est = molf_ds.estimate_memory("qwen2.5-3b", num_gpus_per_node=8, num_nodes=2)
    print(est.row("molf", 3).gpu_bytes_per_gpu)

or from a shell, as a table: ``molf-estimate --preset qwen2.5-3b --gpus-per-node 8 --nodes 2``
(`molf_ds.train.estimate`). Presets are the published shapes of `molf_ds.presets`.

Parameters are counted from the model class itself: ``transformers.AutoModelForCausalLM`` builds
the model from its config on the meta device (shapes only: no memory, no download, about 0.1 s
for the 3B and 70B presets once transformers is imported), and its ``named_parameters()`` give
every tensor once (tied weights once), so the counts are exact for every architecture
``transformers`` knows. LoRA targets are the ``nn.Linear``
modules that `molf_ds.wrap` would replace, matched by the same function. The byte model follows
DeepSpeed's `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`
(and the allocations in ``stage_1_and_2.py`` / ``stage3.py`` they summarise), per method:

* every parameter: its weights (2 bytes bf16/fp16, 4 fp32);
* every trainable parameter also: a gradient (weight dtype), an fp32 master copy (4 bytes;
  16-bit weights, or fp32 weights under ZeRO-1/2 and under offload, where DeepSpeed clones the
  partition), and the two AdamW moments (8 bytes);
* ZeRO-1 shards master + moments over the N = nodes x GPUs-per-node data-parallel ranks, ZeRO-2
  also the gradients, ZeRO-3 also the weights (each tensor on its own, padded to N). ZeRO-3 keeps
  every tensor of at most ``stage3_param_persistence_threshold`` elements resident on every GPU
  (`molf_ds.initialize` sets it to at least the largest LoRA factor, so LoRA factors are never
  gathered);
  their gradients and optimizer states are sharded like the rest. ZeRO-3 also gathers one layer
  at a time: the largest partitioned layer's weights (and gradients) are counted once ("gather");
* optimizer offload moves master + moments and DeepSpeed's fp32 gradient partition (4 bytes) to
  CPU memory; ZeRO-2/3 then keep no gradient partition on the GPU (ZeRO-1 keeps the full 16-bit
  gradients); ZeRO-3 parameter offload also moves the weight shards of partitioned tensors.

Under PyTorch FSDP2 (``engine="fsdp2"``: ``fully_shard`` on each block of the model's
``_no_split_modules`` classes and on the root) every tensor is sharded on dim 0 in chunks of
``ceil(rows / N)`` (`fsdp2_shard_numel`), in fp32: the sharded parameters are the master (the
optimizer steps them: no copy), with fp32 gradient shards and the two moments of the trainable
ones. The gathered copies, in the compute dtype (``weight_dtype``, the ``MixedPrecisionPolicy``),
are the root's own parameters for the whole step, two blocks and one block's gradients, or every
parameter with ``reshard_after_forward=False`` (reported as stage 2; the default True as stage 3).
``CPUOffloadPolicy`` moves the shards, their gradients and the moments to CPU memory
(docs/fsdp2.md, "Memory").

Not counted: activations, communication buckets, allocator fragmentation, the transient fp32
gradient of the optimizer step, and the CPU memory needed to load a checkpoint (DeepSpeed's
estimator adds ``4 x params x GPUs per node`` and a 1.5 buffer factor for that).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from molf_ds.config import DEFAULT_EXCLUDE_MODULES, DEFAULT_TARGET_MODULES, MoLFConfig
from molf_ds.errors import MoLFError, NoMatchingModulesError, one_line
from molf_ds.model import is_target, named_decoder_blocks
from molf_ds.presets import PUBLISHED
from molf_ds.zero import DS_DEFAULT_PERSISTENCE_THRESHOLD

# the methods whose model states the estimate counts
MEMORY_METHODS: tuple[str, ...] = ("fft", "lora", "molf", "molf-efficient")
ENGINES: tuple[str, ...] = ("deepspeed", "fsdp2")
STAGES: tuple[int, ...] = (0, 1, 2, 3)
# FSDP2's two settings, named by the ZeRO stage each resembles: 3 is fully_shard's default
# reshard_after_forward=True (parameters gathered a block at a time, in forward and again in
# backward), 2 is reshard_after_forward=False (gathered parameters kept from forward to backward).
FSDP2_STAGES: tuple[int, ...] = (2, 3)
OFFLOAD_NONE, OFFLOAD_OPTIMIZER, OFFLOAD_PARAM = "none", "optimizer", "optimizer+param"
WEIGHT_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
MASTER_BYTES = 4  # fp32 master copy of a trainable parameter
MOMENT_BYTES = 8  # AdamW exp_avg + exp_avg_sq, fp32
FP32_GRAD_BYTES = 4  # DeepSpeed's fp32 gradient partition under optimizer offload
GiB = 2**30
# Building the model on the meta device takes ~7 ms a layer: 10**6 layers (a typo, a corrupted
# config.json) would run for hours. Published models have well under 200.
MAX_LAYERS = 1024


class EstimateError(MoLFError):
    """The input to `estimate_memory` cannot be estimated (bad config, preset or setting)."""


@dataclass(frozen=True)
class ParamTensor:
    """One parameter tensor of the model, named as ``model.named_parameters()`` names it."""

    name: str
    module: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        out = 1
        for dim in self.shape:
            out *= dim
        return out


@dataclass(frozen=True)
class ModelSpec:
    """A model resolved from its config: every parameter tensor and every ``nn.Linear`` layer."""

    name: str
    model_type: str
    architecture: str
    params: tuple[ParamTensor, ...]  # tied weights once, as ``named_parameters()`` lists them
    linears: tuple[tuple[str, int, int], ...]  # (module name, in_features, out_features)
    # the modules of the classes in the model's ``_no_split_modules`` (decoder layers): the
    # blocks that FSDP2 users, Trainer and accelerate call fully_shard on
    blocks: tuple[str, ...] = ()

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {p.name: p.shape for p in self.params}


@dataclass(frozen=True)
class MemoryRow:
    """Model-state memory of one method x ZeRO stage x offload setting.

    ``gpu_bytes_per_gpu`` is the sum of the four ``gpu_*`` parts; ``cpu_bytes_per_node`` is what
    the offloaded states of one node's GPUs take in its CPU memory (0 without offload).
    """

    method: str
    stage: int
    offload: str
    gpu_bytes_per_gpu: int
    cpu_bytes_per_node: int
    trainable_params: int
    total_params: int
    gpu_weight_bytes: int
    gpu_grad_bytes: int
    gpu_optimizer_bytes: int  # fp32 master + AdamW moments held on this GPU
    gpu_gather_bytes: int  # ZeRO-3: the largest partitioned layer, gathered


@dataclass(frozen=True)
class MemoryEstimate:
    """What `estimate_memory` returns: the inputs it resolved and one `MemoryRow` per setting."""

    model: str
    model_type: str
    architecture: str
    base_params: int
    weight_dtype: str
    num_gpus_per_node: int
    num_nodes: int
    lora_ranks: tuple[int, ...]
    lora_modules: int  # linear layers that get LoRA experts
    rows: tuple[MemoryRow, ...]
    engine: str = "deepspeed"  # or "fsdp2": then ``stage`` 3 / 2 is reshard_after_forward on / off

    @property
    def world_size(self) -> int:
        return self.num_gpus_per_node * self.num_nodes

    def row(self, method: str, stage: int, offload: str = OFFLOAD_NONE) -> MemoryRow:
        """The row of ``method`` at ZeRO ``stage`` with ``offload``; `KeyError` if absent."""
        for row in self.rows:
            if (row.method, row.stage, row.offload) == (method, stage, offload):
                return row
        raise KeyError(f"no row for method={method!r}, stage={stage}, offload={offload!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy (what ``molf-estimate --json`` prints)."""
        out = asdict(self)
        out["lora_ranks"] = list(self.lora_ranks)
        out["world_size"] = self.world_size
        return out


def optimizer_state_bytes_per_rank(
    trainable_numel: int, world_size: int = 1, master_weights: bool = True
) -> int:
    """Bytes of optimizer state one rank holds under ZeRO-1/2 (or without ZeRO at world 1):
    the two fp32 AdamW moments (8 bytes) and, with ``master_weights``, the fp32 master copy
    (4 bytes) of its ``ceil(trainable_numel / world_size)`` elements.

    DeepSpeed pads the flat partition to an alignment of a few elements per rank, so measured
    figures can exceed this by ``world_size x`` a few elements' worth.
    """
    if trainable_numel < 0 or world_size < 1:
        raise EstimateError(
            f"need trainable_numel >= 0 and world_size >= 1, got {trainable_numel}, {world_size}"
        )
    per_element = MOMENT_BYTES + (MASTER_BYTES if master_weights else 0)
    return per_element * _ceil_div(trainable_numel, world_size)


def fsdp2_shard_numel(shape: Sequence[int], world_size: int) -> int:
    """Elements of the largest shard (rank 0's) of a tensor of ``shape`` that ``fully_shard``
    splits over ``world_size`` ranks: dim 0 in chunks of ``ceil(rows / world_size)``
    (``Shard(0)``, cut as ``torch.chunk`` cuts), the last ranks' chunks smaller or empty. It is
    also what FSDP2 allocates on every rank for a parameter's padded shard."""
    if world_size < 1:
        raise EstimateError(f"need world_size >= 1, got {world_size}")
    if not shape:
        return 1
    rest = 1
    for dim in shape[1:]:
        rest *= dim
    return _ceil_div(shape[0], world_size) * rest


def estimate_memory(
    config: Any,
    *,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    lora_ranks: Sequence[int] | int = (64,),
    target_modules: Sequence[str] | str = DEFAULT_TARGET_MODULES,
    exclude_modules: Sequence[str] | str = DEFAULT_EXCLUDE_MODULES,
    weight_dtype: str = "bf16",
    methods: Sequence[str] = MEMORY_METHODS,
    stages: Sequence[int] | None = None,
    persistence_threshold: int | None = None,
    engine: str = "deepspeed",
) -> MemoryEstimate:
    """Estimate the model-state memory of training ``config`` with each method and ZeRO setting.

    Args:
        config: a preset name (`molf_ds.presets.PUBLISHED`), a path to a ``config.json`` (or
            a folder holding one), a ``transformers.PretrainedConfig``, or a dict of its fields.
        num_gpus_per_node, num_nodes: the data-parallel world is their product.
        lora_ranks: LoRA expert ranks; ``lora`` uses the first, the MoLF methods all of them.
        target_modules, exclude_modules: which linear layers get LoRA experts (PEFT's rules,
            as `MoLFConfig`).
        weight_dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"`` model weights.
        methods: any of ``fft`` (AdamW on all parameters), ``lora`` (base frozen, LoRA of the
            first rank), ``molf`` (all parameters plus LoRA experts trainable), ``molf-efficient``
            (base frozen, LoRA experts of every rank trainable).
        stages: ZeRO stages to report (0-3; default all). Under ``engine="fsdp2"``: 3 for
            ``reshard_after_forward=True`` (the default), 2 for ``False`` (default both).
        persistence_threshold: ZeRO-3 ``stage3_param_persistence_threshold``; ``None`` takes
            what `molf_ds.initialize` sets for the MoLF methods (the largest LoRA factor, at
            least DeepSpeed's default 100000) and DeepSpeed's default for ``fft`` and ``lora``.
            DeepSpeed only.
        engine: ``"deepspeed"`` (ZeRO) or ``"fsdp2"`` (``fully_shard`` on each block and the
            root; fp32 sharded parameters as the master, ``weight_dtype`` the compute dtype of
            the gathered parameters, i.e. ``MixedPrecisionPolicy.param_dtype``; offload is
            ``CPUOffloadPolicy``). docs/fsdp2.md, "Memory", says what each part counts.

    Returns:
        A `MemoryEstimate`, rows ordered by method, stage, offload.

    Raises:
        EstimateError: an unknown preset, a missing or unreadable config, an unsupported
            architecture, or an invalid setting (the message says which).
        MoLFConfigError: invalid ``lora_ranks`` / ``target_modules`` / ``exclude_modules``.
        NoMatchingModulesError: a LoRA method is asked for but no linear layer is targeted.
    """
    spec = model_spec(config)
    for key, value in (("num_gpus_per_node", num_gpus_per_node), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EstimateError(f"`{key}` must be a positive integer, got {value!r}")
    if weight_dtype not in WEIGHT_BYTES:
        raise EstimateError(
            f"`weight_dtype` must be one of {', '.join(WEIGHT_BYTES)}, got {weight_dtype!r}"
        )
    methods = tuple(methods)
    unknown = [m for m in methods if m not in MEMORY_METHODS]
    if unknown or not methods:
        raise EstimateError(f"`methods` must be among {', '.join(MEMORY_METHODS)}, got {methods!r}")
    if engine not in ENGINES:
        raise EstimateError(f"`engine` must be one of {', '.join(ENGINES)}, got {engine!r}")
    allowed = FSDP2_STAGES if engine == "fsdp2" else STAGES
    stages = allowed if stages is None else tuple(stages)
    if not stages or any(isinstance(s, bool) or s not in allowed for s in stages):
        if engine == "fsdp2":
            raise EstimateError(
                f"under fsdp2, `stages` must be among 2 (reshard_after_forward=False) and 3 "
                f"(True), got {stages!r}"
            )
        raise EstimateError(f"`stages` must be among 0, 1, 2, 3, got {stages!r}")
    if persistence_threshold is not None and (
        isinstance(persistence_threshold, bool)
        or not isinstance(persistence_threshold, int)
        or persistence_threshold < 0
    ):
        raise EstimateError(
            f"`persistence_threshold` must be a non-negative integer or None, "
            f"got {persistence_threshold!r}"
        )
    molf_config = MoLFConfig(
        lora_ranks=lora_ranks, target_modules=target_modules, exclude_modules=exclude_modules
    )
    targets = [(n, i, o) for n, i, o in spec.linears if is_target(n, molf_config)]
    if not targets and any(m != "fft" for m in methods):
        raise NoMatchingModulesError(
            f"no linear layer of {spec.name} matches `target_modules`="
            f"{molf_config.target_modules!r} (excluding {molf_config.exclude_modules!r})"
        )

    world = num_gpus_per_node * num_nodes
    rows = []
    for method in methods:
        tensors = _method_tensors(spec, targets, molf_config.lora_ranks, method)
        if persistence_threshold is not None:
            threshold = persistence_threshold
        elif method.startswith("molf"):  # as molf_ds.zero.prepare_ds_config sets it
            largest_lora = max(t.numel for t in tensors if t.lora)
            threshold = max(DS_DEFAULT_PERSISTENCE_THRESHOLD, largest_lora)
        else:
            threshold = DS_DEFAULT_PERSISTENCE_THRESHOLD
        for stage in stages:
            if engine == "fsdp2":
                for offload in (OFFLOAD_NONE, OFFLOAD_PARAM):
                    rows.append(
                        _fsdp2_row(
                            method=method,
                            stage=stage,
                            offload=offload,
                            tensors=tensors,
                            weight_bytes=WEIGHT_BYTES[weight_dtype],
                            world=world,
                            gpus_per_node=num_gpus_per_node,
                            blocks=spec.blocks,
                        )
                    )
                continue
            for offload in _offloads(stage):
                rows.append(
                    _row(
                        method=method,
                        stage=stage,
                        offload=offload,
                        tensors=tensors,
                        weight_bytes=WEIGHT_BYTES[weight_dtype],
                        world=world,
                        gpus_per_node=num_gpus_per_node,
                        threshold=threshold,
                    )
                )
    return MemoryEstimate(
        model=spec.name,
        model_type=spec.model_type,
        architecture=spec.architecture,
        base_params=spec.num_params,
        weight_dtype=weight_dtype,
        num_gpus_per_node=num_gpus_per_node,
        num_nodes=num_nodes,
        lora_ranks=molf_config.lora_ranks,
        lora_modules=len(targets),
        rows=tuple(rows),
        engine=engine,
    )


@dataclass(frozen=True)
class TrainedTensor:
    """A tensor of a method's model: a base parameter or a LoRA factor, trainable or frozen."""

    param: ParamTensor
    trainable: bool
    lora: bool = False

    @property
    def numel(self) -> int:
        return self.param.numel


def _method_tensors(
    spec: ModelSpec,
    targets: list[tuple[str, int, int]],
    ranks: tuple[int, ...],
    method: str,
) -> list[TrainedTensor]:
    """Every tensor ``method``'s model holds: the base (trained by fft and molf) and a LoRA
    pair per target and rank (one rank for lora, none for fft). Each LoRA factor is a module of
    its own, as ZeRO-3 gathers it."""
    train_base = method in ("fft", "molf")
    tensors = [TrainedTensor(p, trainable=train_base) for p in spec.params]
    lora_ranks = {"fft": (), "lora": ranks[:1]}.get(method, ranks)
    for name, in_features, out_features in targets:
        for i, rank in enumerate(lora_ranks):
            for factor, shape in (
                ("lora_A", (rank, in_features)),
                ("lora_B", (out_features, rank)),
            ):
                module = f"{name}.{factor}.{i}"
                param = ParamTensor(f"{module}.weight", module, shape)
                tensors.append(TrainedTensor(param, trainable=True, lora=True))
    return tensors


def _offloads(stage: int) -> tuple[str, ...]:
    if stage == 0:
        return (OFFLOAD_NONE,)
    if stage in (1, 2):
        return (OFFLOAD_NONE, OFFLOAD_OPTIMIZER)
    return (OFFLOAD_NONE, OFFLOAD_OPTIMIZER, OFFLOAD_PARAM)


def _row(
    *,
    method: str,
    stage: int,
    offload: str,
    tensors: list[TrainedTensor],
    weight_bytes: int,
    world: int,
    gpus_per_node: int,
    threshold: int,
) -> MemoryRow:
    """The row of ``method`` at ZeRO ``stage`` with ``offload`` on ``world`` ranks
    (``gpus_per_node`` to a node); ZeRO-3 keeps tensors of at most ``threshold`` elements
    resident."""
    total = sum(t.numel for t in tensors)
    trainable = sum(t.numel for t in tensors if t.trainable)
    # DeepSpeed clones the fp32 partition even from fp32 weights under ZeRO-1/2 and offload;
    # ZeRO-3 on the GPU and plain (ZeRO-0) fp32 training step the weights themselves.
    master = MASTER_BYTES if weight_bytes < 4 or stage in (1, 2) or offload != OFFLOAD_NONE else 0
    optim = master + MOMENT_BYTES
    offloaded = offload != OFFLOAD_NONE
    weights = grads = gpu_optim = gather = cpu_per_rank = 0
    if stage < 3:
        shard = trainable if stage == 0 else _ceil_div(trainable, world)
        weights = total * weight_bytes
        if stage < 2:
            grads = trainable * weight_bytes  # full 16-bit gradients (ZeRO-1 also with offload)
        elif not offloaded:
            grads = shard * weight_bytes
        if offloaded:
            cpu_per_rank = shard * (MASTER_BYTES + MOMENT_BYTES + FP32_GRAD_BYTES)
        else:
            gpu_optim = shard * optim
    else:
        # ZeRO-3 partitions every tensor on its own; small ones stay resident (persistent).
        resident = sum(t.numel for t in tensors if t.numel <= threshold)
        weight_shard = sum(_ceil_div(t.numel, world) for t in tensors if t.numel > threshold)
        trainable_shard = sum(_ceil_div(t.numel, world) for t in tensors if t.trainable)
        weights = resident * weight_bytes
        if offload == OFFLOAD_PARAM:
            cpu_per_rank += weight_shard * weight_bytes
        else:
            weights += weight_shard * weight_bytes
        if offloaded:
            cpu_per_rank += trainable_shard * (MASTER_BYTES + MOMENT_BYTES + FP32_GRAD_BYTES)
        else:
            grads = trainable_shard * weight_bytes
            gpu_optim = trainable_shard * optim
        # per module: (weights, gradients) of its partitioned tensors, gathered together
        partitioned = [t for t in tensors if t.numel > threshold]
        gathered = _numels_by(partitioned, lambda module: module)
        gather = max(((n + g) * weight_bytes for n, g in gathered.values()), default=0)
    return MemoryRow(
        method=method,
        stage=stage,
        offload=offload,
        gpu_bytes_per_gpu=weights + grads + gpu_optim + gather,
        cpu_bytes_per_node=cpu_per_rank * gpus_per_node,
        trainable_params=trainable,
        total_params=total,
        gpu_weight_bytes=weights,
        gpu_grad_bytes=grads,
        gpu_optimizer_bytes=gpu_optim,
        gpu_gather_bytes=gather,
    )


def _fsdp2_row(
    *,
    method: str,
    stage: int,
    offload: str,
    tensors: list[TrainedTensor],
    weight_bytes: int,
    world: int,
    gpus_per_node: int,
    blocks: tuple[str, ...],
) -> MemoryRow:
    """The row of ``method`` under FSDP2 on ``world`` ranks: ``fully_shard`` on each block and
    the root (``stage`` 3: ``reshard_after_forward=True``, 2: ``False``), ``offload`` none or
    ``CPUOffloadPolicy`` (parameters, gradients and moments all on the CPU).

    Sharded, per rank (`fsdp2_shard_numel`): every parameter in fp32, which the optimizer steps
    itself (the master: no copy); the fp32 gradients and the two moments of the trainable ones.
    Gathered, in the compute dtype (``weight_bytes``): the root module's own parameters for the
    whole step (FSDP2 never reshards the root after forward), two blocks (the one computing and
    the one prefetched), and one block's gradients before their reduce-scatter; with
    ``reshard_after_forward=False`` every parameter stays gathered from forward to backward.
    """
    total = sum(t.numel for t in tensors)
    trainable = sum(t.numel for t in tensors if t.trainable)
    weight_shard = sum(fsdp2_shard_numel(t.param.shape, world) for t in tensors)
    trainable_shard = sum(fsdp2_shard_numel(t.param.shape, world) for t in tensors if t.trainable)
    # block (or "" for the root) -> [numel, trainable numel]
    units = _numels_by(tensors, lambda module: _block_of(module, blocks))
    root_numel = units.get("", [0, 0])[0]
    block_numels = sorted((n for unit, (n, _) in units.items() if unit), reverse=True)
    if stage == 3:
        gathered = root_numel + sum(block_numels[:2])
    else:
        gathered = total
    gathered += max((g for _, g in units.values()), default=0)
    gather = gathered * weight_bytes
    weights = weight_shard * MASTER_BYTES
    grads = trainable_shard * FP32_GRAD_BYTES
    optim = trainable_shard * MOMENT_BYTES
    cpu_per_rank = 0
    if offload != OFFLOAD_NONE:
        cpu_per_rank, weights, grads, optim = weights + grads + optim, 0, 0, 0
    return MemoryRow(
        method=method,
        stage=stage,
        offload=offload,
        gpu_bytes_per_gpu=weights + grads + optim + gather,
        cpu_bytes_per_node=cpu_per_rank * gpus_per_node,
        trainable_params=trainable,
        total_params=total,
        gpu_weight_bytes=weights,
        gpu_grad_bytes=grads,
        gpu_optimizer_bytes=optim,
        gpu_gather_bytes=gather,
    )


def _numels_by(tensors: list[TrainedTensor], key: Callable[[str], str]) -> dict[str, list[int]]:
    """``[numel, trainable numel]`` of ``tensors`` summed per ``key(module name)``: what is
    gathered together (a ZeRO-3 module, an FSDP2 block)."""
    sums: dict[str, list[int]] = {}
    for t in tensors:
        entry = sums.setdefault(key(t.param.module), [0, 0])
        entry[0] += t.numel
        entry[1] += t.numel if t.trainable else 0
    return sums


def _block_of(module: str, blocks: tuple[str, ...]) -> str:
    """The block ``module`` lies in (``""``: none, the root's own)."""
    for block in blocks:
        if module == block or module.startswith(block + "."):
            return block
    return ""


def model_spec(config: Any) -> ModelSpec:
    """Resolve ``config`` (preset name, ``config.json`` path, ``PretrainedConfig`` or dict) into
    a `ModelSpec`: ``transformers.AutoModelForCausalLM`` builds the model on the meta device, and
    its parameters and ``nn.Linear`` modules are read off it."""
    # deferred, as in _config_from_fields: `import molf_ds` does not load transformers (~1 s)
    from transformers import AutoModelForCausalLM

    name, hf_config = _load_config(config)
    _check_layers(name, hf_config)

    try:
        with torch.device("meta"):  # shapes only: no storage, no initialisation cost
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception as err:  # a config transformers accepts but cannot build a model from
        if isinstance(err, ValueError) and "Unrecognized configuration class" in str(err):
            raise EstimateError(
                f"{name}: unsupported model_type {hf_config.model_type!r}: transformers has no "
                "causal language model for it"
            ) from None
        raise EstimateError(
            f"{name}: transformers cannot build the model: {one_line(err)}"
        ) from err
    # named_parameters() lists a tied tensor once, under its first name (the embedding).
    params = tuple(
        ParamTensor(param_name, param_name.rpartition(".")[0], tuple(param.shape))
        for param_name, param in model.named_parameters()
    )
    # What `molf_ds.wrap` replaces: modules whose type is exactly nn.Linear (a tied lm_head is
    # one, although its weight is listed under the embedding).
    linears = tuple(
        (module_name, module.in_features, module.out_features)
        for module_name, module in model.named_modules()
        if type(module) is nn.Linear
    )
    blocks = tuple(module_name for module_name, _ in named_decoder_blocks(model))
    return ModelSpec(
        name=name,
        model_type=hf_config.model_type,
        architecture=type(model).__name__,
        params=params,
        linears=linears,
        blocks=blocks,
    )


def _check_layers(name: str, hf_config: Any) -> None:
    """Refuse a layer count beyond `MAX_LAYERS` before the (linear-time) build."""
    text_config = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else None
    for candidate in (hf_config, text_config):
        layers = getattr(candidate, "num_hidden_layers", None)
        if isinstance(layers, int) and layers > MAX_LAYERS:
            raise EstimateError(
                f"{name}: num_hidden_layers={layers} is more than {MAX_LAYERS}; check the config"
            )


def count_parameters(config: Any) -> int:
    """Parameters of the model ``config`` describes (tied weights counted once), as
    ``sum(p.numel() for p in model.parameters())`` counts them."""
    return model_spec(config).num_params


def _load_config(config: Any) -> tuple[str, Any]:
    """``(display name, transformers.PretrainedConfig)`` of a preset, path, config or mapping."""
    if isinstance(config, str) and config in PUBLISHED:
        return config, _config_from_fields(config, PUBLISHED[config].config_fields())
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise EstimateError(
                f"{str(config)!r} is neither a preset ({', '.join(PUBLISHED)}) nor a config file "
                "(no such file)"
            )
        try:
            fields = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as err:  # unreadable, not UTF-8, not JSON
            # (json raises RecursionError for deeply nested arrays, ValueError for the rest)
            raise EstimateError(f"cannot read config {path}: {err}") from None
        if not isinstance(fields, dict):
            raise EstimateError(f"config {path} must hold a JSON object")
        return str(path), _config_from_fields(str(path), fields)
    if isinstance(config, Mapping):
        name = str(config.get("_name_or_path") or config.get("model_type"))
        return name, _config_from_fields(name, dict(config))
    if callable(getattr(config, "to_dict", None)) and hasattr(config, "model_type"):
        return str(getattr(config, "name_or_path", "") or config.model_type), config
    raise EstimateError(
        "`config` must be a preset name, a config.json path, a transformers.PretrainedConfig "
        f"or a dict, got {type(config).__name__}"
    )


def _config_from_fields(name: str, fields: dict[str, Any]) -> Any:
    """The ``PretrainedConfig`` of ``fields`` (a ``config.json``'s content): fields it leaves
    out take the config class's defaults, as ``from_pretrained`` would give them."""
    from transformers import CONFIG_MAPPING  # deferred: `import molf_ds` does not load it

    model_type = fields.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        hint = " (custom code is not run)" if "auto_map" in fields else ""
        raise EstimateError(f"{name}: model_type {model_type!r} is unknown to transformers{hint}")
    try:
        return CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception as err:  # transformers validates fields and their combinations
        raise EstimateError(f"{name}: invalid config: {one_line(err)}") from None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)
