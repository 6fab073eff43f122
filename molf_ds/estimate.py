"""`estimate_memory`: per-GPU and per-node memory of the model states of FFT, LoRA, MoLF and
MoLF-Efficient under DeepSpeed ZeRO 0-3, with and without CPU offload -- before renting GPUs.

    est = molf_ds.estimate_memory("qwen2.5-3b", num_gpus_per_node=8, num_nodes=2)
    print(est.format_table())

or from a shell: ``molf-estimate --preset qwen2.5-3b --gpus-per-node 8 --nodes 2``.

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

Not counted: activations, communication buckets, allocator fragmentation, the transient fp32
gradient of the optimizer step, and the CPU memory needed to load a checkpoint (DeepSpeed's
estimator adds ``4 x params x GPUs per node`` and a 1.5 buffer factor for that).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from molf_ds.config import DEFAULT_EXCLUDE_MODULES, DEFAULT_TARGET_MODULES, MoLFConfig
from molf_ds.errors import MoLFError, NoMatchingModulesError, OneLineArgumentParser
from molf_ds.zero import DS_DEFAULT_PERSISTENCE_THRESHOLD

METHODS: tuple[str, ...] = ("fft", "lora", "molf", "molf-efficient")
STAGES: tuple[int, ...] = (0, 1, 2, 3)
OFFLOAD_NONE, OFFLOAD_OPTIMIZER, OFFLOAD_PARAM = "none", "optimizer", "optimizer+param"
WEIGHT_BYTES: dict[str, int] = {"bf16": 2, "fp16": 2, "fp32": 4}
MASTER_BYTES = 4  # fp32 master copy of a trainable parameter
MOMENT_BYTES = 8  # AdamW exp_avg + exp_avg_sq, fp32
FP32_GRAD_BYTES = 4  # DeepSpeed's fp32 gradient partition under optimizer offload
GiB = 2**30
# Building the model on the meta device takes ~7 ms a layer: 10**6 layers (a typo, a corrupted
# config.json) would run for hours. Published models have well under 200.
MAX_LAYERS = 1024

# Literal configs (subsets of the published config.json files): no downloads.
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "qwen2.5-3b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    "llama-70b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    },
}


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

    def format_table(self) -> str:
        """A readable table: GiB per GPU (with its parts) and GiB per node of CPU memory."""
        nodes = f"{self.num_nodes} node{'s' if self.num_nodes > 1 else ''}"
        gpus = f"{self.num_gpus_per_node} GPU{'s' if self.num_gpus_per_node > 1 else ''}"
        lines = [
            f"Model states of {self.model} ({self.architecture}): "
            f"{_count(self.base_params)} params ({self.base_params:,}), {self.weight_dtype} "
            "weights, AdamW",
            f"Setup: {nodes} x {gpus} per node = {self.world_size} data-parallel ranks; "
            f"LoRA ranks {list(self.lora_ranks)} on {self.lora_modules} linear layers",
            "",
        ]
        header = (
            "method",
            "ZeRO",
            "offload",
            "trainable",
            "GPU/GPU",
            "weights",
            "grads",
            "optim",
            "gather",
            "CPU/node",
        )
        body = [
            (
                r.method,
                str(r.stage),
                r.offload,
                f"{_count(r.trainable_params)} ({100 * r.trainable_params / r.total_params:.3g}%)",
                _gib(r.gpu_bytes_per_gpu),
                _gib(r.gpu_weight_bytes),
                _gib(r.gpu_grad_bytes),
                _gib(r.gpu_optimizer_bytes),
                _gib(r.gpu_gather_bytes),
                _gib(r.cpu_bytes_per_node),
            )
            for r in self.rows
        ]
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def fmt(cells: Sequence[str]) -> str:
            left = [cell.ljust(w) for cell, w in zip(cells[:4], widths[:4], strict=True)]
            right = [cell.rjust(w) for cell, w in zip(cells[4:], widths[4:], strict=True)]
            return "  ".join(left + right).rstrip()

        lines.append(fmt(header))
        lines.append(fmt(["-" * w for w in widths]))
        previous = None
        for row, cells in zip(self.rows, body, strict=True):
            if previous is not None and row.method != previous:
                lines.append("")
            previous = row.method
            lines.append(fmt(cells))
        lines += [
            "",
            "GiB. GPU/GPU = weights + grads + optim (fp32 master + AdamW moments) + gather",
            "(ZeRO-3: the largest partitioned layer, gathered); CPU/node = offloaded states of",
            "one node's GPUs. Activations, buffers and fragmentation come on top.",
        ]
        return "\n".join(lines)


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


def estimate_memory(
    config: Any,
    *,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    lora_ranks: Sequence[int] | int = (64,),
    target_modules: Sequence[str] | str = DEFAULT_TARGET_MODULES,
    exclude_modules: Sequence[str] | str = DEFAULT_EXCLUDE_MODULES,
    weight_dtype: str = "bf16",
    methods: Sequence[str] = METHODS,
    stages: Sequence[int] = STAGES,
    persistence_threshold: int | None = None,
) -> MemoryEstimate:
    """Estimate the model-state memory of training ``config`` with each method and ZeRO setting.

    Args:
        config: a preset name (see `PRESETS`), a path to a ``config.json`` (or a folder holding
            one), a ``transformers.PretrainedConfig``, or a dict of its fields.
        num_gpus_per_node, num_nodes: the data-parallel world is their product.
        lora_ranks: LoRA expert ranks; ``lora`` uses the first, the MoLF methods all of them.
        target_modules, exclude_modules: which linear layers get LoRA experts (PEFT's rules,
            as `MoLFConfig`).
        weight_dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"`` model weights.
        methods: any of ``fft`` (AdamW on all parameters), ``lora`` (base frozen, LoRA of the
            first rank), ``molf`` (all parameters plus LoRA experts trainable), ``molf-efficient``
            (base frozen, LoRA experts of every rank trainable).
        stages: ZeRO stages to report (0-3).
        persistence_threshold: ZeRO-3 ``stage3_param_persistence_threshold``; ``None`` takes
            what `molf_ds.initialize` sets for the MoLF methods (the largest LoRA factor, at
            least DeepSpeed's default 100000) and DeepSpeed's default for ``fft`` and ``lora``.

    Returns:
        A `MemoryEstimate`, rows ordered by method, stage, offload.

    Raises:
        EstimateError: an unknown preset, a missing or unreadable config, an unsupported
            architecture, or an invalid setting (the message says which).
        MoLFConfigError: invalid ``lora_ranks`` / ``target_modules`` / ``exclude_modules``.
        NoMatchingModulesError: a LoRA method is asked for but no linear layer is targeted.
    """
    from molf_ds.model import is_target

    spec = model_spec(config)
    for key, value in (("num_gpus_per_node", num_gpus_per_node), ("num_nodes", num_nodes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise EstimateError(f"`{key}` must be a positive integer, got {value!r}")
    if weight_dtype not in WEIGHT_BYTES:
        raise EstimateError(
            f"`weight_dtype` must be one of {', '.join(WEIGHT_BYTES)}, got {weight_dtype!r}"
        )
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise EstimateError(f"`methods` must be among {', '.join(METHODS)}, got {methods!r}")
    stages = tuple(stages)
    if not stages or any(isinstance(s, bool) or s not in STAGES for s in stages):
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
            largest_lora = max(n for n, _, _, is_lora in tensors if is_lora)
            threshold = max(DS_DEFAULT_PERSISTENCE_THRESHOLD, largest_lora)
        else:
            threshold = DS_DEFAULT_PERSISTENCE_THRESHOLD
        for stage in stages:
            for offload in _offloads(stage):
                rows.append(
                    _row(
                        method,
                        stage,
                        offload,
                        tensors,
                        WEIGHT_BYTES[weight_dtype],
                        world,
                        num_gpus_per_node,
                        threshold,
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
    )


# (numel, trainable, module, is_lora) of every tensor the method's model holds.
_Tensor = tuple[int, bool, str, bool]


def _method_tensors(
    spec: ModelSpec,
    targets: list[tuple[str, int, int]],
    ranks: tuple[int, ...],
    method: str,
) -> list[_Tensor]:
    train_base = method in ("fft", "molf")
    tensors: list[_Tensor] = [(p.numel, train_base, p.module, False) for p in spec.params]
    lora_ranks = {"fft": (), "lora": ranks[:1]}.get(method, ranks)
    for name, in_features, out_features in targets:
        for i, rank in enumerate(lora_ranks):
            tensors.append((rank * in_features, True, f"{name}.lora_A.{i}", True))
            tensors.append((out_features * rank, True, f"{name}.lora_B.{i}", True))
    return tensors


def _offloads(stage: int) -> tuple[str, ...]:
    if stage == 0:
        return (OFFLOAD_NONE,)
    if stage in (1, 2):
        return (OFFLOAD_NONE, OFFLOAD_OPTIMIZER)
    return (OFFLOAD_NONE, OFFLOAD_OPTIMIZER, OFFLOAD_PARAM)


def _row(
    method: str,
    stage: int,
    offload: str,
    tensors: list[_Tensor],
    weight_bytes: int,
    world: int,
    gpus_per_node: int,
    threshold: int,
) -> MemoryRow:
    total = sum(n for n, *_ in tensors)
    trainable = sum(n for n, t, *_ in tensors if t)
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
        resident = sum(n for n, *_ in tensors if n <= threshold)
        weight_shard = sum(_ceil_div(n, world) for n, *_ in tensors if n > threshold)
        trainable_shard = sum(_ceil_div(n, world) for n, t, *_ in tensors if t)
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
        gathered: dict[str, list[int]] = {}
        for n, t, module, _ in tensors:
            if n > threshold:
                entry = gathered.setdefault(module, [0, 0])
                entry[0] += n
                entry[1] += n if t else 0
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


def model_spec(config: Any) -> ModelSpec:
    """Resolve ``config`` (preset name, ``config.json`` path, ``PretrainedConfig`` or dict) into
    a `ModelSpec`: ``transformers.AutoModelForCausalLM`` builds the model on the meta device, and
    its parameters and ``nn.Linear`` modules are read off it."""
    import torch
    from torch import nn

    name, hf_config = _load_config(config)
    _check_layers(name, hf_config)
    from transformers import AutoModelForCausalLM

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
            f"{name}: transformers cannot build the model: {_one_line(err)}"
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
    return ModelSpec(
        name=name,
        model_type=hf_config.model_type,
        architecture=type(model).__name__,
        params=params,
        linears=linears,
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
    if isinstance(config, str) and config in PRESETS:
        return config, _config_from_fields(config, dict(PRESETS[config]))
    if isinstance(config, (str, Path)):
        path = Path(config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise EstimateError(
                f"{str(config)!r} is neither a preset ({', '.join(PRESETS)}) nor a config file "
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
    from transformers import CONFIG_MAPPING

    model_type = fields.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        hint = " (custom code is not run)" if "auto_map" in fields else ""
        raise EstimateError(f"{name}: model_type {model_type!r} is unknown to transformers{hint}")
    try:
        return CONFIG_MAPPING[model_type].from_dict(fields)
    except Exception as err:  # transformers validates fields and their combinations
        raise EstimateError(f"{name}: invalid config: {_one_line(err)}") from None


def _one_line(err: object, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GiB:.2f}"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


# --------------------------------------------------------------------------------------------
# CLI


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="molf-estimate",
        description="Estimate per-GPU and per-node memory of model states (weights, gradients, "
        "fp32 master, AdamW moments) for FFT, LoRA, MoLF and MoLF-Efficient under DeepSpeed "
        "ZeRO 0-3, with and without CPU offload. Activations are not included.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a built-in model config (default: none; give --preset or --config)",
    )
    source.add_argument(
        "--config",
        metavar="PATH",
        help="a Hugging Face config.json, or a folder holding one (default: none)",
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=1, metavar="N", help="GPUs per node (default: 1)"
    )
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default: 1)")
    parser.add_argument(
        "--lora-ranks",
        type=int,
        nargs="+",
        default=[64],
        metavar="R",
        help="LoRA expert ranks; lora uses the first, the MoLF methods all (default: 64)",
    )
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument(
        "--target-modules",
        nargs="+",
        default=list(DEFAULT_TARGET_MODULES),
        metavar="NAME",
        help=f"linear layers that get LoRA experts (default: {' '.join(DEFAULT_TARGET_MODULES)})",
    )
    targets.add_argument(
        "--target-regex",
        metavar="REGEX",
        help="instead of --target-modules: a regex full-matched on dotted names (default: none)",
    )
    parser.add_argument(
        "--exclude-modules",
        nargs="*",
        default=list(DEFAULT_EXCLUDE_MODULES),
        metavar="NAME",
        help=f"linear layers never targeted (default: {' '.join(DEFAULT_EXCLUDE_MODULES)})",
    )
    parser.add_argument(
        "--weight-dtype",
        choices=list(WEIGHT_BYTES),
        default="bf16",
        help="dtype of the model weights and gradients (default: bf16)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods to report, among {', '.join(METHODS)} (default: all)",
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        type=int,
        choices=list(STAGES),
        default=list(STAGES),
        metavar="STAGE",
        help="ZeRO stages to report (default: 0 1 2 3)",
    )
    parser.add_argument(
        "--persistence-threshold",
        type=int,
        default=None,
        metavar="NUMEL",
        help="ZeRO-3 stage3_param_persistence_threshold (default: as molf_ds.initialize sets "
        "it for the MoLF methods, max(100000, largest LoRA factor); DeepSpeed's 100000 for fft "
        "and lora)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the estimate as JSON instead of a table (default: off)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``molf-estimate``: print the estimate table (or ``--json``); 0 on success."""
    args = _build_parser().parse_args(argv)
    try:
        estimate = estimate_memory(
            args.preset or args.config,
            num_gpus_per_node=args.gpus_per_node,
            num_nodes=args.nodes,
            lora_ranks=tuple(args.lora_ranks),
            target_modules=args.target_regex or tuple(args.target_modules),
            exclude_modules=tuple(args.exclude_modules),
            weight_dtype=args.weight_dtype,
            methods=tuple(dict.fromkeys(args.methods)),
            stages=tuple(sorted(set(args.stages))),
            persistence_threshold=args.persistence_threshold,
        )
    except (MoLFError, OSError) as err:
        # one line whatever the message quotes (a path holding a newline, a C++ stack)
        print(f"molf-estimate: error: {_one_line(err, 500)}", file=sys.stderr)
        return 1
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else estimate.format_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
