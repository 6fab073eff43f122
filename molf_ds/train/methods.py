"""What differs between molf-train's modes, in one table: `METHODS` maps each ``mode`` to a
`Method` (how its model is built, its optimizer and DeepSpeed engine, its torch optimizer for
FSDP2, a hook after each micro-step's backward, whether it routes, and its exports); the recipe
never reads ``mode``.
Also `baseline_optimizer_section`, the DeepSpeed ``optimizer`` section of the baselines.

DeepSpeed, PEFT and transformers are imported inside the functions that use them: molf-train's
``--help`` and option errors answer before they load, and `console.quiet_dependencies` sets its
log levels and warning filters before DeepSpeed's import logs its accelerator.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

import molf_ds
from molf_ds import ds_partitions, export
from molf_ds.config import DEFAULT_TARGET_MODULES
from molf_ds.errors import MoLFError
from molf_ds.export import check_finite
from molf_ds.plan import weight_decay_groups
from molf_ds.train.config import TrainConfig
from molf_ds.train.distributed import is_main_rank
from molf_ds.train.models import JOB_PRESETS
from molf_ds.train.schedule import config_lr_factor, scheduler


@dataclass(frozen=True)
class Method:
    """Everything that differs between the modes (`METHODS`); the recipe never reads ``mode``."""

    # (config, freshly loaded model) -> the model to train: wrapped, adapted or as loaded;
    # built again on a fresh model for the export.
    build_model: Callable[[TrainConfig, Any], Any]
    # (config, model, DeepSpeed config, ZeRO stage) -> (engine, optimizer)
    build_engine: Callable[[TrainConfig, Any, dict, int], tuple[Any, Any]]
    # (config, model sharded by fully_shard) -> the torch optimizer engine=fsdp2 steps
    build_optimizer: Callable[[TrainConfig, Any], Any]
    # (config, tokenizer, fresh base model, load_trained, output_dir) -> outputs; load_trained()
    # builds this mode's model on the base and loads the final weights into it.
    export: Callable[[TrainConfig, Any, Any, Callable[[], Any], Path], dict]
    # (model, engine, step) after each micro-step's backward, before engine.step()
    after_backward: Callable[[Any, Any, int], None] = lambda model, engine, step: None
    # after_backward reads every trainable parameter's whole, averaged gradient (AdaLoRA's rank
    # allocation): under engine=fsdp2 they stay whole on every rank, not sharded
    whole_gradients: bool = False
    # MoLF routing: routing.jsonl and the FFT share in the metrics
    routed: bool = False
    # full models the export writes (the merged model; MoLF-Efficient adds the base): disk space
    export_copies: int = 1


def _as_loaded(cfg: TrainConfig, model):
    """FFT trains the model as loaded."""
    return model


def _molf_model(cfg: TrainConfig, model, *, train_base: bool):
    """MoLF (``train_base``: the base is the FFT expert) or MoLF-Efficient (base frozen)."""
    _check_ranks(cfg.lora_ranks, model)
    config = molf_ds.MoLFConfig(
        lora_ranks=cfg.lora_ranks,
        lora_alpha=cfg.lora_alpha,
        use_rslora=cfg.use_rslora,
        train_base=train_base,
    )
    return molf_ds.wrap(model, config)


def _check_ranks(ranks: tuple[int, ...], model) -> None:
    """A LoRA rank above every dimension of every linear layer gives factors larger than the
    layers they adapt (and, for an absurd rank, an allocation that fails or swaps the host):
    refused before any factor is allocated."""
    largest = max(
        (max(m.in_features, m.out_features) for m in model.modules() if type(m) is nn.Linear),
        default=0,
    )
    if max(ranks) > largest:
        raise MoLFError(
            f"`lora_ranks` {max(ranks)} is larger than every linear layer of the model (largest "
            f"dimension {largest}); use a rank of at most {largest}"
        )


def _lora_model(cfg: TrainConfig, model):
    from peft import LoraConfig, get_peft_model  # deferred: see the module docstring

    _check_ranks(cfg.lora_ranks[:1], model)
    peft_config = LoraConfig(
        r=cfg.lora_ranks[0],
        lora_alpha=cfg.lora_alpha,
        use_rslora=cfg.use_rslora,
        target_modules=list(DEFAULT_TARGET_MODULES),
    )
    return get_peft_model(model, peft_config)


def _adalora_model(cfg: TrainConfig, model):
    from peft import AdaLoraConfig, get_peft_model  # deferred: see the module docstring

    _check_ranks(cfg.lora_ranks[:1], model)
    peft_config = AdaLoraConfig(
        init_r=cfg.lora_ranks[0],
        target_r=max(1, cfg.lora_ranks[0] // 2),
        lora_alpha=cfg.lora_alpha,
        target_modules=list(DEFAULT_TARGET_MODULES),
        total_step=cfg.max_steps,
        tinit=min(cfg.warmup_steps, cfg.max_steps // 4),
        tfinal=cfg.max_steps // 4,
    )
    return get_peft_model(model, peft_config)


def _molf_optimizer(cfg: TrainConfig, model) -> molf_ds.MoLFAdamW:
    """`MoLFAdamW` (LoRA lr and weight decay of their own; routing); over FSDP2's DTensors it
    steps the local shards itself."""
    return molf_ds.MoLFAdamW(
        model,
        lr=cfg.lr,
        lora_lr=cfg.lora_lr,
        weight_decay=cfg.weight_decay,
        lora_weight_decay=cfg.lora_weight_decay,
        top_k=cfg.top_k,
        score=cfg.score,
    )


def _molf_engine(cfg: TrainConfig, model, ds_config: dict, zero_stage: int):
    """`MoLFAdamW` under `molf_ds.initialize`."""
    optimizer = _molf_optimizer(cfg, model)
    engine, _, _, _ = molf_ds.initialize(
        model=model,
        optimizer=optimizer,
        config=ds_config,
        lr_scheduler=scheduler(config_lr_factor(cfg)),
    )
    return engine, optimizer


def _adamw_engine(
    cfg: TrainConfig, model, ds_config: dict, zero_stage: int, *, lr: float, weight_decay: float
):
    """DeepSpeed's own Adam over the trainable parameters, from an ``optimizer`` section: what a
    DeepSpeed user's baseline runs (`baseline_optimizer_section`), so a MoLF-vs-baseline figure
    compares against it. Weight decay goes to matrices only, as in MoLFAdamW (and Transformers'
    Trainer). The schedule is the same client `LambdaLR` as MoLF's, over DeepSpeed's
    optimizer."""
    import deepspeed  # deferred: see the module docstring

    trainable = [p for p in model.parameters() if p.requires_grad]
    section = baseline_optimizer_section(ds_config, lr=lr, weight_decay=weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=weight_decay_groups(trainable, weight_decay),
        config={**ds_config, "optimizer": section},
        lr_scheduler=scheduler(config_lr_factor(cfg)),
    )
    return engine, ds_partitions.client_optimizer(engine)


def baseline_optimizer_section(ds_config: dict, *, lr: float, weight_decay: float) -> dict:
    """The ``optimizer`` section of the baselines (fft, lora, adalora): ``AdamW`` with torch's
    defaults for betas and eps, for which DeepSpeed 0.19.8 builds ``FusedAdam`` on GPUs and
    ``DeepSpeedCPUAdam`` under ``offload_optimizer``.

    Two exceptions, each a plain torch ``AdamW`` through DeepSpeed's ``torch_adam`` switch:
    on CPU ranks without offload (DeepSpeed's choice there is its ``FusedAdam`` C++ op for the
    CPU, which compiles for minutes the first time and only ever serves tests), and where
    DeepSpeed's op does not build (no CUDA compiler, say), with a warning that says so (on
    GPUs that AdamW is torch's fused one).
    """
    from deepspeed.accelerator import get_accelerator  # deferred: see the module docstring

    params = {"lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay}
    offload = (ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}).get(
        "device", "none"
    ) not in ("none", None)
    on_cpu = get_accelerator().device_name() == "cpu"
    if on_cpu and not offload:
        return {"type": "AdamW", "params": {**params, "torch_adam": True}}
    problem = ds_partitions.op_build_problem("CPUAdamBuilder" if offload else "FusedAdamBuilder")
    if problem is None:
        return {"type": "AdamW", "params": params}
    if is_main_rank():
        print(
            f"molf-train: warning: DeepSpeed's {'CPU Adam' if offload else 'FusedAdam'} op does "
            f"not build here ({problem}); the baseline runs torch's AdamW instead",
            file=sys.stderr,
            flush=True,
        )
    fused = {} if offload or on_cpu else {"fused": True}
    return {"type": "AdamW", "params": {**params, "torch_adam": True, **fused}}


def _adamw_optimizer(cfg: TrainConfig, model, *, lr: float, weight_decay: float):
    """torch's AdamW over the trainable parameters (engine=fsdp2: their shards), with the
    betas, eps and matrix-only weight decay of `baseline_optimizer_section`."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        weight_decay_groups(trainable, weight_decay), lr=lr, betas=(0.9, 0.999), eps=1e-8
    )


def _lora_rates(cfg: TrainConfig) -> dict[str, float]:
    """LoRA's own rate and decay where given (``lora_lr``, ``lora_weight_decay``), as MoLF's
    LoRA experts take them."""
    lr = cfg.lr if cfg.lora_lr is None else cfg.lora_lr
    decay = cfg.weight_decay if cfg.lora_weight_decay is None else cfg.lora_weight_decay
    return {"lr": lr, "weight_decay": decay}


def _fft_engine(cfg: TrainConfig, model, ds_config: dict, zero_stage: int):
    return _adamw_engine(
        cfg, model, ds_config, zero_stage, lr=cfg.lr, weight_decay=cfg.weight_decay
    )


def _fft_optimizer(cfg: TrainConfig, model):
    return _adamw_optimizer(cfg, model, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _lora_engine(cfg: TrainConfig, model, ds_config: dict, zero_stage: int):
    return _adamw_engine(cfg, model, ds_config, zero_stage, **_lora_rates(cfg))


def _lora_optimizer(cfg: TrainConfig, model):
    return _adamw_optimizer(cfg, model, **_lora_rates(cfg))


def _adalora_engine(cfg: TrainConfig, model, ds_config: dict, zero_stage: int):
    if zero_stage != 0:
        raise MoLFError(
            f"mode=adalora reads every parameter's full gradient, which ZeRO-{zero_stage} "
            "partitions away: use ds_config=zero0, or engine=fsdp2"
        )
    return _lora_engine(cfg, model, ds_config, zero_stage)


def _adalora_reallocate(model, engine, step: int) -> None:
    """AdaLoRA re-allocates ranks from the full, averaged gradients: they exist between backward
    and step without ZeRO (checked in `_adalora_engine`), and under engine=fsdp2, which keeps
    the adapters whole (`Method.whole_gradients`)."""
    if engine.is_gradient_accumulation_boundary():
        model.base_model.update_and_allocate(step)


def _export_hf(cfg: TrainConfig, tokenizer, base, load_trained, out: Path) -> dict:
    """FFT: the trained model is a plain Hugging Face model."""
    return {"merged_model": save_pretrained(load_trained(), tokenizer, out / "merged")}


def _export_peft_merged(cfg: TrainConfig, tokenizer, base, load_trained, out: Path) -> dict:
    """LoRA, AdaLoRA: PEFT merges the adapter into the base."""
    merged = load_trained().merge_and_unload()
    return {"merged_model": save_pretrained(merged, tokenizer, out / "merged")}


def _export_molf_merged(cfg: TrainConfig, tokenizer, base, load_trained, out: Path) -> dict:
    """MoLF: every expert folded into the base weights."""
    merged = export.export_merged(load_trained(), out / "merged", tokenizer=tokenizer)
    return {"merged_model": str(merged)}


def _export_molf_adapter(cfg: TrainConfig, tokenizer, base, load_trained, out: Path) -> dict:
    """MoLF-Efficient: the merged model, and one PEFT LoRA adapter for the (frozen) base."""
    base_dir = Path(save_pretrained(base, tokenizer, out / "base"))  # before it is wrapped
    model = load_trained()
    merged = export.export_merged(model, out / "merged", tokenizer=tokenizer)
    base_name = cfg.model if cfg.model not in JOB_PRESETS else str(base_dir.resolve())
    adapter = export.export_peft_adapter(model, out / "adapter", base_name)
    return {"merged_model": str(merged), "peft_adapter": str(adapter)}


METHODS: dict[str, Method] = {
    "fft": Method(
        build_model=_as_loaded,
        build_engine=_fft_engine,
        build_optimizer=_fft_optimizer,
        export=_export_hf,
    ),
    "lora": Method(
        build_model=_lora_model,
        build_engine=_lora_engine,
        build_optimizer=_lora_optimizer,
        export=_export_peft_merged,
    ),
    "adalora": Method(
        build_model=_adalora_model,
        build_engine=_adalora_engine,
        build_optimizer=_lora_optimizer,
        export=_export_peft_merged,
        after_backward=_adalora_reallocate,
        whole_gradients=True,
    ),
    "molf": Method(
        build_model=partial(_molf_model, train_base=True),
        build_engine=_molf_engine,
        build_optimizer=_molf_optimizer,
        export=_export_molf_merged,
        routed=True,
    ),
    "molf-efficient": Method(
        build_model=partial(_molf_model, train_base=False),
        build_engine=_molf_engine,
        build_optimizer=_molf_optimizer,
        export=_export_molf_adapter,
        routed=True,
        export_copies=2,
    ),
}


def save_pretrained(model: Any, tokenizer: Any, path: Path) -> str:
    """Write ``model`` and ``tokenizer`` as a Hugging Face model directory; a model with a
    non-finite weight is refused (a diverged run exports nothing)."""
    check_finite(model.state_dict(), "model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)
