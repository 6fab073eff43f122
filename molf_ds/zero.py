"""`initialize`: `deepspeed.initialize` for a `MoLFAdamW`; the routed step over ZeRO partitions.

    engine, optimizer, loader, scheduler = molf_ds.initialize(
        model=model, optimizer=MoLFAdamW(model, lr=1e-5), config="ds_configs/zero2.json")

Under ZeRO-1/2/3 DeepSpeed hands the client optimizer flat fp32 partitions instead of the model's
parameters; `molf_ds.ds_partitions` turns those into segments, and one all-reduce of the
``[modules x experts]`` score sums per step makes every rank pick the winners a single process
would pick. LoRA factors stay resident on every rank (ZeRO-3: by parameter persistence).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from molf_ds.errors import MoLFConfigError
from molf_ds.optimizer import MoLFAdamW
from molf_ds.plan import RoutingPlan
from molf_ds.runtime import is_main_rank

logger = logging.getLogger(__name__)

# DeepSpeed 0.19's default `stage3_param_persistence_threshold` (DeepSpeedZeroConfig).
DS_DEFAULT_PERSISTENCE_THRESHOLD = 100_000


def init_distributed(collective_timeout_s: float | None = None, **kwargs: Any) -> None:
    """`deepspeed.init_distributed` (same keyword arguments); on DeepSpeed's CPU accelerator it
    uses gloo and leaves out DeepSpeed's shared-memory all-reduce op (see
    `molf_ds.ds_partitions.turn_off_cpu_shm_comm` for why). Does nothing when already initialized.

    Args:
        collective_timeout_s: how long any collective may wait for a peer before it raises on
            every backend (DeepSpeed's ``timeout``); None keeps DeepSpeed's default (10 min, or
            ``DEEPSPEED_TIMEOUT`` minutes).

    Sets ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` unless already set (before the process group
    exists, the only moment NCCL reads it): NCCL's watchdog then aborts the communicators and
    ends the process when a collective fails or times out, instead of leaving the other ranks
    waiting on a dead peer. gloo ignores it (its collectives raise after the timeout anyway).
    """
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    from molf_ds import ds_partitions

    if dist.is_initialized():
        return
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if collective_timeout_s is not None:
        kwargs["timeout"] = timedelta(seconds=collective_timeout_s)
    if get_accelerator().device_name() == "cpu":
        ds_partitions.turn_off_cpu_shm_comm()
        kwargs.setdefault("dist_backend", "gloo")
    deepspeed.init_distributed(**kwargs)
    if collective_timeout_s is not None:
        _time_out_later_groups(kwargs["timeout"])


def _time_out_later_groups(timeout: timedelta) -> None:
    """Give every process group created from now on ``timeout``, as the default group has.

    DeepSpeed 0.19.8 builds its data-parallel group (the one ZeRO's reductions and MoLF's score
    all-reduce run on) with ``new_group(ranks)`` and no timeout, and torch 2.13 then takes its
    own default (30 min for gloo, 10 min for NCCL), not the default group's: measured, a STOPped
    peer left the other rank waiting past a 20 s ``timeout``. torch reads these two module
    defaults at each ``new_group`` call, so setting them reaches every later group.
    """
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def initialize(
    model: torch.nn.Module | None = None,
    optimizer: MoLFAdamW | None = None,
    config: dict | str | Path | None = None,
    **kwargs: Any,
) -> tuple[Any, Any, Any, Any]:
    """`deepspeed.initialize` for a `MoLFAdamW`: same arguments, same return value
    ``(engine, optimizer, dataloader, lr_scheduler)``.

    Fills what DeepSpeed needs for a client optimizer (every changed value is logged once on
    rank 0), refuses settings MoLF cannot honour before anything starts, and connects the
    optimizer to the engine's partitions.

    Raises:
        MoLFConfigError: a missing `MoLFAdamW`, or a config MoLF cannot run (naming the key).
    """
    import deepspeed

    if not isinstance(optimizer, MoLFAdamW):
        raise MoLFConfigError(
            "molf_ds.initialize needs `optimizer=MoLFAdamW(model, ...)`, "
            f"got {type(optimizer).__name__}"
        )
    if config is None:
        config = kwargs.pop("config_params", None)
    if config is None:
        raise MoLFConfigError("molf_ds.initialize needs `config` (a dict or a JSON file path)")
    ds_config, changes = prepare_ds_config(config, optimizer)
    init_distributed()
    engine, ds_optimizer, loader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, **kwargs
    )
    if changes and is_main_rank():
        logger.warning("molf_ds.initialize set in the DeepSpeed config: %s", ", ".join(changes))
    connect(engine, optimizer)
    return engine, ds_optimizer, loader, scheduler


def connect(engine: Any, optimizer: MoLFAdamW) -> None:
    """Point ``optimizer`` at the engine's partitions and its data-parallel group.

    Segments are read from DeepSpeed's mappings at every step, so nothing here goes stale when
    ``engine.load_checkpoint`` rebuilds them.

    Raises:
        MoLFConfigError: DeepSpeed put a wrapper around MoLFAdamW that molf_ds cannot run.
    """
    from molf_ds import ds_partitions

    stage = engine.zero_optimization_stage()  # 1 also for bf16 + ZeRO-1's BF16_Optimizer
    if stage == 0 and engine.optimizer is optimizer:
        # No ZeRO: every rank holds every parameter and the averaged gradient, so every rank
        # computes identical scores without a reduction.
        optimizer.segment_source, optimizer.reduce_scores = None, None
        return
    if stage == 0 or ds_partitions.client_optimizer(engine) is not optimizer:
        raise MoLFConfigError(
            f"DeepSpeed wrapped MoLFAdamW in {type(engine.optimizer).__name__}, which molf_ds "
            "cannot run (fp16 or bf16 without ZeRO?): use fp32 without ZeRO, or ZeRO stage >= 1"
        )
    if stage == 3:
        optimizer.segment_source = ds_partitions.stage3_segments(engine)
    else:  # ZeRO-1/2, BF16_Optimizer
        optimizer.segment_source = ds_partitions.HpMappingSegments()
    optimizer.reduce_scores = ds_partitions.all_reduce_sum(
        ds_partitions.data_parallel_group(engine)
    )
    # Under optimizer offload only what the step changed is copied back into the model's
    # parameters; where the internals are not the ones checked, DeepSpeed's full copy runs.
    copy_back = ds_partitions.install_copy_back(engine, optimizer)
    quiet = ("no optimizer offload", f"{ds_partitions.COPY_BACK_ENV}=full")
    if copy_back.mode == "full" and copy_back.reason not in quiet and is_main_rank():
        logger.warning(
            "molf_ds: DeepSpeed copies each whole updated partition back (%s)", copy_back.reason
        )


def prepare_ds_config(
    config: dict | str | Path, optimizer: MoLFAdamW | RoutingPlan, *, allow_auto: bool = False
) -> tuple[dict, list[str]]:
    """A copy of ``config`` with what DeepSpeed needs to run `MoLFAdamW` as a client optimizer.

    ``optimizer`` may also be the model's `RoutingPlan` (``RoutingPlan.from_model(model)``),
    for a config prepared before the optimizer exists (`molf_ds.hf` does, before the Trainer
    fills its ``"auto"`` values). ``allow_auto`` leaves other ``"auto"`` values for whoever
    fills them later (the Trainer, accelerate) instead of refusing them.

    Returns:
        ``(config, changes)``: the filled config and one line per value that was changed.

    Raises:
        MoLFConfigError: for settings MoLF cannot honour (naming the DeepSpeed key).
    """
    plan = optimizer.plan if isinstance(optimizer, MoLFAdamW) else optimizer
    ds_config = _load(config)
    changes: list[str] = []

    def set_default(section: dict, key: str, value: Any, where: str) -> None:
        if key not in section:
            section[key] = value
            changes.append(f"{where}{key}={json.dumps(value)}")

    if "optimizer" in ds_config:
        raise MoLFConfigError(
            "the DeepSpeed config has an `optimizer` section, but MoLF brings its own optimizer: "
            "remove `optimizer` from the config"
        )
    zero = ds_config.setdefault("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise MoLFConfigError(f"`zero_optimization.stage` must be 0, 1, 2 or 3, got {stage}")
    if ds_config.get("zero_allow_untested_optimizer") is False:
        raise MoLFConfigError(
            "`zero_allow_untested_optimizer` is false, but MoLFAdamW is a client optimizer: "
            "remove the key or set it to true"
        )
    set_default(ds_config, "zero_allow_untested_optimizer", True, "")

    if zero.get("round_robin_gradients"):
        # DeepSpeed 0.19's round-robin layout leaves each parameter's slice mapping
        # (`ds_partitions.hp_slice`) pointing at the wrong part of the flat partition.
        raise MoLFConfigError(
            "`zero_optimization.round_robin_gradients` is not supported by MoLF: remove it"
        )
    offload = zero.get("offload_optimizer") or {}
    if offload.get("device", "none") not in ("none", None):
        if float(offload.get("ratio", 1.0)) < 1.0:
            raise MoLFConfigError(
                "`zero_optimization.offload_optimizer.ratio` < 1 (partial offload) needs "
                "DeepSpeed's own CPU Adam; use ratio 1.0 with MoLF"
            )
        if ds_config.get("zero_force_ds_cpu_optimizer") is True:
            raise MoLFConfigError(
                "`zero_force_ds_cpu_optimizer` is true, which replaces client optimizers by "
                "DeepSpeed's CPU Adam: set it to false for MoLF"
            )
        set_default(ds_config, "zero_force_ds_cpu_optimizer", False, "")

    if stage == 3:
        # LoRA factors must never be partitioned, so that they are not gathered and released
        # around every forward: persist every parameter up to the largest LoRA factor.
        largest_lora = plan.largest_lora_numel
        # One sub-group per rank, so that each step routes whole modules with one all-reduce.
        sub_group = zero.get("sub_group_size")
        if sub_group is None or sub_group == "auto":
            zero.pop("sub_group_size", None)
            total = plan.total_numel
            set_default(zero, "sub_group_size", max(int(1e9), total), "zero_optimization.")
        threshold = zero.get("stage3_param_persistence_threshold")
        if threshold is None or threshold == "auto":
            zero.pop("stage3_param_persistence_threshold", None)
            # Never below DeepSpeed's own default: lowering it would partition (and gather
            # every forward) small parameters DeepSpeed keeps whole for plain AdamW.
            persist = max(DS_DEFAULT_PERSISTENCE_THRESHOLD, largest_lora)
            set_default(zero, "stage3_param_persistence_threshold", persist, "zero_optimization.")
        elif int(threshold) < largest_lora:
            logger.warning(
                "zero_optimization.stage3_param_persistence_threshold=%s is below the largest "
                "LoRA factor (%d elements): LoRA factors will be gathered around every forward",
                threshold,
                largest_lora,
            )
    remaining = [] if allow_auto else _remaining_auto(ds_config)
    if remaining:
        raise MoLFConfigError(
            f'DeepSpeed config still has "auto" values ({", ".join(remaining)}): fill them with '
            "molf_ds.zero.fill_auto (molf-train does) or set numbers"
        )
    return ds_config, changes


SHIPPED_CONFIGS = Path(__file__).with_name("ds_configs")
"""The DeepSpeed configs that ship with the package, one per ZeRO stage and offload variant
(``ds_configs/`` in a checkout links here)."""


def ds_config_path(config: str | Path) -> Path:
    """``config`` when it is a file, else the shipped config of that name (``"zero2"`` or
    ``"zero2.json"``); a `MoLFConfigError` listing the shipped names otherwise.

    Works the same from a checkout and from an installed package, e.g. for ``transformers``'
    ``--deepspeed $(python -c 'import molf_ds.zero as z; print(z.ds_config_path("zero3"))')``.
    """
    path = Path(config)
    if path.is_file():
        return path
    shipped = SHIPPED_CONFIGS / f"{str(config).removesuffix('.json')}.json"
    if shipped.is_file() and path.name == str(config):  # a bare name, not a missing path
        return shipped
    names = ", ".join(sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.json")))
    raise MoLFConfigError(
        f"DeepSpeed config {str(config)!r} not found: give a path or one of {names}"
    )


def fill_auto(
    config: dict | str | Path,
    *,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    world_size: int,
    gradient_clipping: float,
    bf16: bool,
) -> dict:
    """A copy of a DeepSpeed config (a dict, a JSON file, or a shipped name such as ``"zero2"``)
    with its ``"auto"`` fields set from the job's settings.

    A field that is *not* ``"auto"`` must agree with the job: a mismatch is a `MoLFConfigError`
    naming both values, rather than a DeepSpeed assertion later.
    """
    ds_config = _load(config)
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "gradient_clipping": gradient_clipping,
    }
    for key, value in wanted.items():
        current = ds_config.get(key, "auto")
        if current == "auto":
            ds_config[key] = value
        elif current != value:
            raise MoLFConfigError(
                f"DeepSpeed config has `{key}`={current!r} but the job's settings give {value!r}: "
                f'set it to "auto" or make them agree'
            )
    section = ds_config.setdefault("bf16", {})
    if section.get("enabled", "auto") == "auto":
        section["enabled"] = bf16
    elif bool(section["enabled"]) != bf16:
        raise MoLFConfigError(
            f"DeepSpeed config has `bf16.enabled`={section['enabled']!r} but the job asks for "
            f'bf16={bf16}: set it to "auto" or make them agree'
        )
    return ds_config


def _remaining_auto(node: Any, path: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _remaining_auto(v, f"{path}{key}.")]
    return [path.rstrip(".")] if node == "auto" else []


def _load(config: dict | str | Path) -> dict:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = ds_config_path(config)
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MoLFConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    if not isinstance(loaded, dict):
        raise MoLFConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return loaded
