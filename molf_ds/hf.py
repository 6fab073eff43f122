"""MoLF inside Hugging Face's `transformers.Trainer` (and its subclasses, such as TRL's
``SFTTrainer``), with or without ``--deepspeed``.

    trainer = MoLFTrainer(model=model, args=args, train_dataset=data,
                          molf_config=molf_ds.MoLFConfig(lora_ranks=(8,)),
                          molf_options=MoLFOptions(lora_lr=1e-3, top_k=1))
    trainer.train()
    trainer.save_model("out/merged")   # a plain HF model (+ out/merged/adapter for MoLF-Efficient)

For another ``Trainer`` subclass put `MoLFMixin` first: ``class MoLFSFTTrainer(MoLFMixin,
SFTTrainer)``. The mixin

- wraps the model (`molf_ds.wrap`, LoRA factors initialised from ``args.seed``);
- builds `MoLFAdamW` from `TrainingArguments` (``learning_rate``, ``weight_decay``,
  ``adam_beta1/2``, ``adam_epsilon``; the Trainer's scheduler drives it) and `MoLFOptions`;
- prepares the Trainer's DeepSpeed config for a client optimizer (`molf_ds.zero.prepare_ds_config`,
  before the Trainer fills its ``"auto"`` values) and connects the optimizer to the engine the
  Trainer creates (`molf_ds.zero.connect`) before the first step;
- logs routing (``molf/fft_share``, ``molf/win_share_<expert>``: the share of modules each
  expert won, averaged over the steps since the last log) through ``Trainer.log``, so every
  reporting callback (TensorBoard, W&B, ...) sees it;
- saves the *merged* model on ``save_model`` (also in every ``checkpoint-N``), gathered one
  module at a time under ZeRO-3, and for MoLF-Efficient the PEFT LoRA adapter in ``adapter/``;
- writes DeepSpeed checkpoints that ``ds_to_universal`` can convert (resume on another number
  of ranks), and resumes through ``resume_from_checkpoint``.

What this relies on in transformers 5.24 / accelerate 1.15 (checked by tests/test_hf.py):
``accelerator.state.deepspeed_plugin.hf_ds_config.config`` is the very dict accelerate passes to
``deepspeed.initialize`` (so it is edited in place), and the Trainer fills its ``"auto"`` values
in ``deepspeed_init`` at ``train()``; with no ``optimizer`` section the Trainer calls
``create_optimizer`` and accelerate hands that optimizer to DeepSpeed (with offload, only if
``zero_force_ds_cpu_optimizer`` is false); ``model_wrapped`` is the engine from then on;
``_save_checkpoint`` calls ``save_model(dir, _internal_call=True)`` then
``_save_optimizer_and_scheduler(dir)``, and resuming without DeepSpeed goes through
``_load_from_checkpoint``; ``TrainerCallback.on_optimizer_step`` runs after every optimizer step.

On CPU ranks call `molf_ds.init_distributed()` before creating the `TrainingArguments` (they
start the process group): it keeps DeepSpeed's CPU shared-memory op out (see
`molf_ds.ds_partitions.turn_off_cpu_shm_comm`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from molf_ds import ds_partitions, export, fsdp2
from molf_ds.config import MoLFConfig
from molf_ds.errors import MoLFConfigError, MoLFError
from molf_ds.model import molf_layers, wrap
from molf_ds.optimizer import MoLFAdamW
from molf_ds.plan import RoutingPlan
from molf_ds.zero import connect, prepare_ds_config

ADAPTER_DIR = "adapter"
# The wrapped (unmerged) model's weights in a checkpoint-N of a run without DeepSpeed, which
# `resume_from_checkpoint` loads; with DeepSpeed the engine's own checkpoint holds them.
MOLF_WEIGHTS = "molf_model.safetensors"
SCHEDULER_FILE = "scheduler.pt"  # transformers.trainer.SCHEDULER_NAME


@dataclass(frozen=True)
class MoLFOptions:
    """MoLF's optimizer options beyond `TrainingArguments` (see `MoLFAdamW`).

    ``lora_lr`` / ``lora_weight_decay`` default to the Trainer's ``learning_rate`` /
    ``weight_decay``; the Trainer's scheduler scales ``lora_lr`` with ``learning_rate``.
    """

    lora_lr: float | None = None
    lora_weight_decay: float | None = None
    top_k: int = 1
    score: str = "epd"
    fused: bool | None = None
    foreach: bool | None = None


class MoLFMixin:
    """MoLF for a `transformers.Trainer` subclass; list it first among the bases.

    Keyword arguments (the others go to the Trainer):
        molf_config: what to wrap (`MoLFConfig`; ``train_base=False`` is MoLF-Efficient).
            May be left out when the model passed in is already wrapped.
        molf_options: `MoLFOptions` (defaults: top-1, EPD score, ``lora_lr=learning_rate``).
    """

    def __init__(
        self,
        *args: Any,
        molf_config: MoLFConfig | None = None,
        molf_options: MoLFOptions | None = None,
        **kwargs: Any,
    ) -> None:
        # Before the Trainer builds accelerate's plugin (which fails on its own terms for FSDP1)
        training_args = kwargs["args"] if "args" in kwargs else (args[1:2] or [None])[0]
        _refuse_fsdp1(getattr(training_args, "fsdp_plugin_args", None))
        super().__init__(*args, **kwargs)
        self.molf_options = molf_options or MoLFOptions()
        self._molf_optimizer: MoLFAdamW | None = None
        self._molf_connected_to: Any = None
        self._routing_wins: torch.Tensor | None = None
        self._routing_steps = 0
        _wrap_once(self.model, molf_config, seed=self.args.seed)
        self.add_callback(_RoutingAccumulator(self))
        if self.is_deepspeed_enabled:
            self._prepare_deepspeed_config()

    # ---- optimizer and engine --------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> MoLFAdamW:
        """`MoLFAdamW` from the `TrainingArguments` and `MoLFOptions` (once)."""
        if self.optimizer is None:
            args, options = self.args, self.molf_options
            self._molf_optimizer = MoLFAdamW(
                self.model,
                lr=args.learning_rate,
                lora_lr=options.lora_lr,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
                weight_decay=args.weight_decay,
                lora_weight_decay=options.lora_weight_decay,
                top_k=options.top_k,
                score=options.score,
                fused=options.fused,
                foreach=options.foreach,
            )
            self._molf_connected_to = None
            self.optimizer = self._molf_optimizer
        return self.optimizer

    def training_step(self, model: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        # The engine exists only once the Trainer has prepared it (after `create_optimizer`),
        # and it may be rebuilt by a later `train()`: connect whichever engine steps next.
        if self.is_deepspeed_enabled and self._molf_connected_to is not self.model_wrapped:
            connect(self.model_wrapped, self._molf_optimizer)
            self._molf_connected_to = self.model_wrapped
        return super().training_step(model, *args, **kwargs)

    def _prepare_deepspeed_config(self) -> None:
        """Edit, in place, the config dict the Trainer and accelerate hand to
        ``deepspeed.initialize``, before the Trainer fills its ``"auto"`` values from the model:
        the ZeRO-3 persistence threshold then keeps every LoRA factor resident."""
        live = self.accelerator.state.deepspeed_plugin.hf_ds_config.config
        _prepare_in_place(live, RoutingPlan.from_model(self.model))

    def train(
        self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        """``Trainer.train``; a DeepSpeed checkpoint written by another number of ranks is
        converted to DeepSpeed's universal format first (once, by rank 0, next to it) and loaded
        as such."""
        if resume_from_checkpoint and self.is_deepspeed_enabled:
            path = resume_from_checkpoint
            if path is True:
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(self.args.output_dir)
            if path:
                self._load_universal_if_resharded(Path(path))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_universal_if_resharded(self, checkpoint: Path) -> None:
        latest = checkpoint / "latest"
        if not latest.is_file():
            return  # not a DeepSpeed checkpoint: the Trainer reports it
        tag_dir = checkpoint / latest.read_text().strip()
        saved = ds_partitions.checkpoint_world_size(tag_dir)
        if saved is None or saved == self.args.world_size:
            return
        universal = tag_dir.with_name(f"{tag_dir.name}_universal")
        if self.args.process_index == 0 and not (checkpoint / "latest_universal").is_file():
            _to_universal(tag_dir, universal)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        live = self.accelerator.state.deepspeed_plugin.hf_ds_config.config
        live.setdefault("checkpoint", {})["load_universal"] = True

    # ---- logging -----------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Adds the routing since the last log (``molf/...``) to the Trainer's logs."""
        if self._routing_steps and "loss" in logs:
            shares = (self._routing_wins / self._routing_steps).tolist()
            names = self._molf_optimizer.plan.expert_names
            logs = {**logs, "molf/fft_share": shares[0]}
            logs.update({f"molf/win_share_{n}": s for n, s in zip(names, shares, strict=True)})
            self._routing_wins, self._routing_steps = None, 0
        super().log(logs, *args, **kwargs)

    def _accumulate_routing(self) -> None:
        """Per expert, the share of modules it won in the latest step, summed on the device
        (read back only when logged)."""
        routing = self._molf_optimizer.last_routing if self._molf_optimizer else None
        if routing is None:
            return
        wins = routing.winners.float().mean(dim=0)
        self._routing_wins = wins if self._routing_wins is None else self._routing_wins + wins
        self._routing_steps += 1

    # ---- saving and resuming -------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The merged model (``from_pretrained`` without molf_ds) in ``output_dir``; for
        MoLF-Efficient also the PEFT LoRA adapter in ``output_dir/adapter``. Call it on every
        rank (it gathers ZeRO-3 partitions module by module); rank 0 writes."""
        out = Path(output_dir or self.args.output_dir)
        save_merged(self.model, out, write=self.args.should_save, tokenizer=self.processing_class)
        if _is_efficient(self.model):
            save_adapter(self.model, out / ADAPTER_DIR, write=self.args.should_save)
        # Under DeepSpeed and FSDP the Trainer's own checkpoint holds the wrapped weights.
        plain = not (self.is_deepspeed_enabled or self.is_fsdp_enabled)
        if _internal_call and plain and self.args.should_save:
            from safetensors.torch import save_file

            state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
            save_file(state, str(out / MOLF_WEIGHTS), metadata={"format": "pt"})
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        # `universal_checkpoint_info` is what DeepSpeed's ds_to_universal requires to convert
        # the checkpoint for another number of ranks.
        self.model_wrapped.save_checkpoint(
            output_dir, client_state={"universal_checkpoint_info": {}}
        )
        # As the Trainer does: a scheduler it made itself (not DeepSpeed's) is not in the
        # engine's checkpoint.
        from accelerate.utils import DeepSpeedSchedulerWrapper

        if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
            torch.save(self.lr_scheduler.state_dict(), Path(output_dir) / SCHEDULER_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        weights = Path(resume_from_checkpoint) / MOLF_WEIGHTS
        if not weights.is_file():
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        from safetensors.torch import load_file

        (model or self.model).load_state_dict(load_file(str(weights)), strict=True)


class MoLFTrainer(MoLFMixin, Trainer):
    """`transformers.Trainer` with MoLF: see `MoLFMixin` for the extra keyword arguments."""


def prepare_accelerator(accelerator: Any, optimizer: MoLFAdamW) -> None:
    """Before ``accelerator.prepare`` in your own loop: puts what DeepSpeed needs for
    ``optimizer`` into the DeepSpeed plugin's config (a no-op without DeepSpeed; under FSDP2
    ``prepare`` needs nothing from MoLF).

    Raises:
        MoLFConfigError: a DeepSpeed config MoLF cannot run (naming the key), or FSDP1.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        _refuse_fsdp1({"fsdp_version": accelerator.state.fsdp_plugin.fsdp_version})
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    _prepare_in_place(plugin.deepspeed_config, optimizer)  # what accelerate hands to DeepSpeed


def connect_accelerator(accelerator: Any, optimizer: MoLFAdamW) -> None:
    """After ``accelerator.prepare``: connects ``optimizer`` to the DeepSpeed engine accelerate
    built (`molf_ds.zero.connect`; a no-op without DeepSpeed: under FSDP2 `MoLFAdamW` finds the
    DTensors ``prepare`` put in its group by itself)."""
    wrapped = getattr(accelerator, "deepspeed_engine_wrapped", None)
    if wrapped is not None:
        connect(wrapped.engine, optimizer)


class _RoutingAccumulator(TrainerCallback):
    """Feeds each optimizer step's routing to the trainer's running sums."""

    def __init__(self, trainer: MoLFMixin) -> None:
        self.trainer = trainer

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._accumulate_routing()


def save_merged(model: nn.Module, output_dir: str | Path, *, write: bool, tokenizer: Any = None):
    """``merge(model)`` saved with ``save_pretrained`` by the rank with ``write=True``, without
    changing ``model``. A collective under ZeRO-3 (every rank calls it): modules are gathered
    one at a time, so the merge never needs the whole model on one device; the writing rank
    holds the merged weights in CPU memory, as ``save_pretrained`` does."""
    state = export.merged_state_dict(model, keep=write)
    if not write:
        return
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, state_dict=state)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def save_adapter(model: nn.Module, output_dir: str | Path, *, write: bool) -> None:
    """A MoLF-Efficient model's experts as one PEFT LoRA adapter (`export.export_peft_adapter`)
    for the base it was loaded from (``model.name_or_path``). A collective under ZeRO-3 and
    FSDP2 (where rank 0 writes)."""
    lora = [p for _, layer in molf_layers(model) for p in (*layer.lora_A, *layer.lora_B)]
    base = getattr(model, "name_or_path", "") or ""
    if fsdp2.is_sharded(lora):  # every rank gathers each layer's factors in turn
        export.export_peft_adapter(model, output_dir, base)
        return
    with ds_partitions.gathered(lora):
        if write:
            export.export_peft_adapter(model, output_dir, base)


def _to_universal(tag_dir: Path, universal: Path) -> None:
    """DeepSpeed's ``ds_to_universal`` converter, in a process of its own (it forks workers)."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(tag_dir), "--output_folder", str(universal)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise MoLFError(f"converting {tag_dir} for another number of ranks failed: {last}")


def _prepare_in_place(live: dict, optimizer: MoLFAdamW | RoutingPlan) -> None:
    """`prepare_ds_config` applied to ``live`` itself: the Trainer and accelerate keep
    references to that very dict. ``"auto"`` values they fill later are left to them."""
    prepared, _changes = prepare_ds_config(live, optimizer, allow_auto=True)
    live.clear()
    live.update(prepared)


def _refuse_fsdp1(fsdp_plugin_args: dict | None) -> None:
    """MoLF runs on FSDP2's DTensors, one per parameter; FSDP1 flattens a block's parameters
    into one FlatParameter whose shards cut across modules and experts."""
    if fsdp_plugin_args and fsdp_plugin_args.get("fsdp_version", 1) != 2:
        raise MoLFConfigError(
            "MoLF runs under FSDP2 only: set fsdp_config={'fsdp_version': 2} (accelerate: "
            "fsdp_version: 2), not FSDP1"
        )


def _wrap_once(model: nn.Module, config: MoLFConfig | None, *, seed: int) -> None:
    """Wraps ``model`` unless it is wrapped already; LoRA factors are drawn from ``seed`` alone
    (the Trainer's own random stream is left as it was)."""
    if any(True for _ in molf_layers(model)):
        return
    if getattr(model, "peft_config", None):
        raise MoLFConfigError(
            "the model is a PEFT model; MoLF brings its own LoRA experts: pass the base model "
            "and no peft_config"
        )
    if config is None:
        raise MoLFConfigError("MoLF needs `molf_config=molf_ds.MoLFConfig(lora_ranks=...)`")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrap(model, config)


def _is_efficient(model: nn.Module) -> bool:
    """MoLF-Efficient: the base layers are frozen, so only LoRA experts were trained."""
    layers = [layer for _, layer in molf_layers(model)]
    return not any(p.requires_grad for layer in layers for p in layer.base.parameters())
