"""The engines molf-train trains on, in one table: `ENGINES` maps ``engine=`` to an
`EngineKind` — its settings (DeepSpeed config, bf16, the summary's label), how the engine is
built, who skips a step with a non-finite gradient, and how rank 0 reads the trained weights
back from the final checkpoint for the exports. The recipe reads ``engine`` only to pick a row.

- ``deepspeed``: DeepSpeed's own engine (`molf_ds.initialize`, or ``deepspeed.initialize`` for
  the baselines), as built by the mode's ``Method.build_engine``.
- ``fsdp2``: `FSDP2Engine`, the few methods of DeepSpeed's engine the recipe calls, over a
  model sharded by `molf_ds.fsdp2.shard_model` (``fully_shard`` per decoder block, then the
  root) and the mode's torch optimizer (``Method.build_optimizer``: `MoLFAdamW`, or torch's
  AdamW for the baselines). Its checkpoints are ``torch.distributed.checkpoint`` (DCP)
  directories, written into the job's atomic ``stepN.partial`` → ``stepN`` scheme (`storage`).

DeepSpeed is imported inside the functions that use it (see `molf_ds.train.methods`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from molf_ds.errors import EveryRankError, MoLFError
from molf_ds.train import console
from molf_ds.train.config import TrainConfig
from molf_ds.train.distributed import cuda, is_main_rank, local_device
from molf_ds.train.methods import Method
from molf_ds.train.schedule import config_lr_factor, scheduler
from molf_ds.zero import ds_config_path, fill_auto

# Beside the DCP files of an FSDP2 checkpoint (rank 0 writes it): the job's client state, the
# LR schedule and the engine's step counters, as JSON.
ENGINE_STATE = "engine_state.json"


@dataclass(frozen=True)
class Settings:
    """What an engine derives from the config and the launch, before the model is built."""

    ds_config: dict  # the filled DeepSpeed config; {} for fsdp2
    bf16: bool  # `bf16`, or when null: whether the ranks are GPUs (or the DeepSpeed config's)
    zero_stage: int  # DeepSpeed's ZeRO stage; 0 for fsdp2 (it builds no zero.Init)
    label: str  # the summary's name of what sharded the run: "ZeRO-2", "FSDP2"


@dataclass(frozen=True)
class EngineKind:
    """Everything that differs between the engines (`ENGINES`)."""

    # (config, global batch's accumulation steps, world size) -> Settings
    settings: Callable[[TrainConfig, int, int], Settings]
    # (config, method, model, settings, accumulation steps) -> (engine, optimizer)
    build: Callable[[TrainConfig, Method, Any, Settings, int], tuple[Any, Any]]
    # (engine) -> a function that makes the next optimizer step skip (True) or not, for an
    # engine that does not skip non-finite steps itself (the recipe then checks the gradients
    # and agrees across ranks); None where the engine skips them itself
    step_skipper: Callable[[Any], Callable[[bool], None] | None]
    # (config, engine, settings, tag directory) -> fp32 CPU state of the trained model: rank 0
    # alone, after the final checkpoint is published
    trained_state: Callable[[TrainConfig, Any, Settings, Path], dict[str, torch.Tensor]]


# ---- DeepSpeed ------------------------------------------------------------------------------
def _deepspeed_settings(cfg: TrainConfig, accumulation: int, world_size: int) -> Settings:
    ds_path = ds_config_path(cfg.ds_config)
    bf16 = _deepspeed_bf16(cfg, ds_path)
    ds_config = fill_auto(
        ds_path,
        micro_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=accumulation,
        world_size=world_size,
        gradient_clipping=cfg.gradient_clipping,
        bf16=bf16,
    )
    if "optimizer" in ds_config:
        raise MoLFError(
            f"`ds_config` {cfg.ds_config!r} has an `optimizer` section, but molf-train builds "
            "the optimizer from its options (lr, weight_decay, ...): remove the section"
        )
    ds_config["steps_per_print"] = 10**9
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    return Settings(ds_config, bf16, stage, f"ZeRO-{stage}")


def _deepspeed_bf16(cfg: TrainConfig, ds_path: Path) -> bool:
    """``bf16``; when null, the DeepSpeed config's own ``bf16.enabled`` where it sets one, else
    whether the ranks are GPUs."""
    if cfg.bf16 is not None:
        return cfg.bf16
    try:
        fixed = json.loads(ds_path.read_text()).get("bf16", {}).get("enabled", "auto")
    except (OSError, ValueError, AttributeError):  # fill_auto reports a broken file
        fixed = "auto"
    return cuda() if fixed == "auto" else bool(fixed)


def _deepspeed_build(cfg, method: Method, model, settings: Settings, accumulation: int):
    return method.build_engine(cfg, model, settings.ds_config, settings.zero_stage)


def _deepspeed_skipper(engine) -> Callable[[bool], None] | None:
    from molf_ds import ds_partitions

    if ds_partitions.deepspeed_skips_nonfinite_steps(engine):
        return None  # ZeRO and the bf16 wrappers skip on the reduced grad norm
    return lambda skip: ds_partitions.skip_unwrapped_step(engine, skip)


def _deepspeed_trained_state(cfg, engine, settings: Settings, tag_dir: Path) -> dict:
    """Without ZeRO rank 0 holds every weight; else DeepSpeed's zero_to_fp32 reads them from the
    final checkpoint."""
    if settings.zero_stage == 0:
        return {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    # deferred: DeepSpeed loads after console.quiet_dependencies (in setup)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with console.chatter_hidden(cfg.log_level):  # its prints and bar, step by step
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)


# ---- FSDP2 ----------------------------------------------------------------------------------
def _fsdp2_settings(cfg: TrainConfig, accumulation: int, world_size: int) -> Settings:
    bf16 = cuda() if cfg.bf16 is None else cfg.bf16
    return Settings({}, bf16, 0, "FSDP2")


def _fsdp2_build(cfg, method: Method, model, settings: Settings, accumulation: int):
    """Shard ``model`` over every rank (a 1-D mesh), then the mode's optimizer over the shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy

    from molf_ds.fsdp2 import shard_model

    device = torch.device(local_device() if cuda() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL's collectives (and peers.gather_peers) use it
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # bf16: bf16 weights for the forward and backward, fp32 shards (the master), fp32
    # gradient reduction — what DeepSpeed's bf16 does
    mp_policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if settings.bf16
        else MixedPrecisionPolicy()
    )
    # pinned host memory needs an accelerator
    offload = CPUOffloadPolicy(pin_memory=cuda()) if cfg.fsdp_offload else OffloadPolicy()
    whole = _whole_trainable(method, model, device)
    shard_model(
        model,
        mesh=mesh,
        reshard_after_forward=cfg.fsdp_reshard_after_forward is not False,
        mp_policy=mp_policy,
        offload_policy=offload,
        ignored_params=set(whole) or None,
    )
    optimizer = method.build_optimizer(cfg, model)
    engine = FSDP2Engine(
        model,
        optimizer,
        scheduler(config_lr_factor(cfg))(optimizer),
        gradient_accumulation_steps=accumulation,
        gradient_clipping=cfg.gradient_clipping,
        device=device,
        replicated=whole,
    )
    return engine, optimizer


def _whole_trainable(method: Method, model, device: torch.device) -> list[torch.nn.Parameter]:
    """The trainable parameters a mode needs whole on every rank (`Method.whole_gradients`:
    AdaLoRA's adapters, a few MB), moved to the ranks' device, which FSDP2 does only for the
    parameters it shards; none for the other modes."""
    if not method.whole_gradients:
        return []
    whole = [p for p in model.parameters() if p.requires_grad]
    for param in whole:
        param.data = param.data.to(device)
    return whole


def _fsdp2_skipper(engine: FSDP2Engine) -> Callable[[bool], None]:
    return engine.skip_next_step


def _fsdp2_trained_state(cfg, engine, settings: Settings, tag_dir: Path) -> dict:
    """The model's weights from the final DCP checkpoint, read by rank 0 alone (no collective:
    the other ranks wait in the end-of-run group), as DeepSpeed's zero_to_fp32 reads its shards:
    every tensor whole on the CPU, in the dtype it was saved (the fp32 shards)."""
    import torch.distributed.checkpoint as dcp

    prefix = "model."
    metadata = dcp.FileSystemReader(str(tag_dir)).read_metadata().state_dict_metadata
    state = {
        key[len(prefix) :]: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith(prefix) and hasattr(meta, "size")
    }
    loaded = {"model": state}
    with warnings.catch_warnings():  # says that it loads in one process, as asked (no_dist)
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(loaded, checkpoint_id=str(tag_dir), no_dist=True)
    return {k: v.float() for k, v in loaded["model"].items()}


class FSDP2Engine:
    """What the recipe calls on DeepSpeed's engine, for a model sharded by ``fully_shard``:
    forward, ``backward`` (the loss divided by the accumulation steps, as DeepSpeed does),
    ``step`` (every micro-step; at the accumulation boundary: clip the global gradient norm,
    step the optimizer and the LR schedule, clear the gradients), ``was_step_applied``,
    ``get_lr``, ``device``, ``module``, ``train`` and ``save_checkpoint`` / ``load_checkpoint``
    (DCP: ``get_state_dict`` / ``set_state_dict`` of the model and the optimizer, so a
    checkpoint saved on N ranks loads on M).

    FSDP2 reduce-scatters the gradients at every micro-step's backward (they accumulate
    sharded: no unsharded gradient is kept between micro-steps). The ``replicated`` parameters
    (whole on every rank, ignored by FSDP2) accumulate their local gradients, averaged over the
    ranks by one all-reduce in the backward of the accumulation boundary, before anything
    reads them (AdaLoRA's allocation, the clipping, the step). Nothing checks the gradients
    here: the recipe decides a skip across ranks (`skip_next_step`), as it does for DeepSpeed
    without ZeRO.
    """

    def __init__(
        self,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler,
        *,
        gradient_accumulation_steps: int,
        gradient_clipping: float,
        device: torch.device,
        replicated: list[torch.nn.Parameter] = (),
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.device = device
        self.gradient_accumulation_steps = gradient_accumulation_steps
        self.gradient_clipping = gradient_clipping
        self.micro_steps = 0
        self.global_steps = 0
        self.skipped_steps = 0  # read as DeepSpeed's engine.skipped_steps is
        self._skip_next = False
        self._applied = True
        self._trainable = [p for p in module.parameters() if p.requires_grad]
        self._replicated = list(replicated)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> FSDP2Engine:
        self.module.train(mode)
        return self

    def backward(self, loss: torch.Tensor) -> None:
        if self.gradient_accumulation_steps > 1:
            loss = loss / self.gradient_accumulation_steps
        loss.backward()
        if self._replicated and self.is_gradient_accumulation_boundary():
            average_gradients(self._replicated)

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def skip_next_step(self, skip: bool) -> None:
        """Make the coming optimizer step a skip (True): gradients dropped, no weight, moment,
        step count, routing or schedule change; counted in ``skipped_steps``."""
        self._skip_next = skip

    def step(self) -> None:
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        if self._skip_next:
            self.skipped_steps += 1
            self._applied = False
        else:
            if self.gradient_clipping > 0:  # DTensor gradients: the norm is the global one
                torch.nn.utils.clip_grad_norm_(self._trainable, self.gradient_clipping)
            self.optimizer.step()
            self.lr_scheduler.step()
            self._applied = True
        self._skip_next = False
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def was_step_applied(self) -> bool:
        return self._applied

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def save_checkpoint(
        self, save_dir: str, tag: str, client_state: dict, save_latest: bool = False
    ) -> None:
        """Collective: ``save_dir/tag`` as a DCP checkpoint of the model and the optimizer, and
        rank 0's `ENGINE_STATE`. A write that fails raises on the rank that met it (DCP's own
        failure, on every rank, as the first rank's OSError where there is one); the ranks
        that wrote meet a failing one in the closing barrier, which
        `molf_ds.ds_partitions.finish_failed_save` runs for it."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import get_state_dict

        path = Path(save_dir) / tag
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        try:
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(path))
        except CheckpointException as err:
            raise _first_os_error(err) or err from None
        if is_main_rank():
            extra = {
                "client_state": client_state,
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "micro_steps": self.micro_steps,
                "global_steps": self.global_steps,
                "skipped_steps": self.skipped_steps,
            }
            (path / ENGINE_STATE).write_text(json.dumps(extra))
        dist.barrier()
        if save_latest and is_main_rank():
            (Path(save_dir) / "latest").write_text(tag)

    def load_checkpoint(self, load_dir: str, tag: str | None = None) -> tuple[str, dict]:
        """Collective: load ``load_dir/tag`` (None: the tag ``latest`` names), on any number
        of ranks; returns ``(path, client_state)`` as DeepSpeed's does."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        if tag is None:
            tag = (Path(load_dir) / "latest").read_text().strip()
        path = Path(load_dir) / tag
        if not (path / ENGINE_STATE).is_file():  # (a DeepSpeed checkpoint, say): the same
            raise EveryRankError(  # files on every rank, so one line, said once
                f"`resume` {path} is no engine=fsdp2 checkpoint ({ENGINE_STATE} missing)"
            )
        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            self.module,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )
        extra = json.loads((path / ENGINE_STATE).read_text())
        self.lr_scheduler.load_state_dict(extra["lr_scheduler"])
        self.micro_steps = extra["micro_steps"]
        self.global_steps = extra["global_steps"]
        self.skipped_steps = extra["skipped_steps"]
        return str(path), extra["client_state"]


@torch.no_grad()
def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over all ranks, as DDP (and DeepSpeed without ZeRO)
    does: one all-reduce of them flattened together."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or dist.get_world_size() == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(part.view_as(grad))


def checkpoint_engine(tag_dir: Path) -> str:
    """The engine that wrote the checkpoint ``tag_dir``: ``fsdp2`` where its `ENGINE_STATE` is,
    else ``deepspeed``."""
    return "fsdp2" if (tag_dir / ENGINE_STATE).is_file() else "deepspeed"


def _first_os_error(err: Exception) -> OSError | None:
    """The first rank's OSError inside DCP's `CheckpointException` (a full disk's ENOSPC), so
    that `molf_ds.train.storage.write_problem` words it as it words DeepSpeed's."""
    for failure in getattr(err, "failures", {}).values():
        cause = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(cause, OSError):
            return cause
    return None


ENGINES: dict[str, EngineKind] = {
    "deepspeed": EngineKind(
        settings=_deepspeed_settings,
        build=_deepspeed_build,
        step_skipper=_deepspeed_skipper,
        trained_state=_deepspeed_trained_state,
    ),
    "fsdp2": EngineKind(
        settings=_fsdp2_settings,
        build=_fsdp2_build,
        step_skipper=_fsdp2_skipper,
        trained_state=_fsdp2_trained_state,
    ),
}
