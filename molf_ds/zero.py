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
from pathlib import Path
from typing import Any

import torch

from molf_ds.errors import MoLFConfigError
from molf_ds.optimizer import MoLFAdamW

logger = logging.getLogger(__name__)


def prepare_ds_config(config: dict | str | Path, optimizer: MoLFAdamW) -> tuple[dict, list[str]]:
    """A copy of ``config`` with what DeepSpeed needs to run `MoLFAdamW` as a client optimizer.

    Returns:
        ``(config, changes)``: the filled config and one line per value that was changed.

    Raises:
        MoLFConfigError: for settings MoLF cannot honour (naming the DeepSpeed key).
    """
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
        largest_lora = max(
            (
                p.numel()
                for p, role in zip(optimizer.plan.params, optimizer.plan.roles, strict=True)
                if role.is_lora
            ),
            default=0,
        )
        threshold = zero.get("stage3_param_persistence_threshold")
        if threshold is None or threshold == "auto":
            zero.pop("stage3_param_persistence_threshold", None)
            set_default(
                zero, "stage3_param_persistence_threshold", largest_lora, "zero_optimization."
            )
        elif int(threshold) < largest_lora:
            logger.warning(
                "zero_optimization.stage3_param_persistence_threshold=%s is below the largest "
                "LoRA factor (%d elements): LoRA factors will be gathered around every forward",
                threshold,
                largest_lora,
            )
    return ds_config, changes


def _load(config: dict | str | Path) -> dict:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.is_file():
        raise MoLFConfigError(f"DeepSpeed config file not found: {path}")
    try:
        loaded = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MoLFConfigError(f"DeepSpeed config {path} is not valid JSON: {err}") from None
    if not isinstance(loaded, dict):
        raise MoLFConfigError(f"DeepSpeed config {path} must hold a JSON object")
    return loaded


def _is_rank_zero() -> bool:
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
