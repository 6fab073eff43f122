"""molf-train: fine-tune a causal LM by FFT, LoRA, AdaLoRA, MoLF or MoLF-Efficient on DeepSpeed.

Copy-paste launches (each starts the same job; add ``--config run.yaml`` and ``key=value``s):

    molf-train max_steps=20                                     # one process
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module molf_ds.train   # 2 CPU ranks
    deepspeed --num_gpus 8 --module molf_ds.train ds_config=zero3 mode=molf model=Qwen/Qwen2.5-3B
    torchrun --nproc_per_node 2 -m molf_ds.train                # torchrun
    mpirun -n 2 python -m molf_ds.train                         # MPI (ranks from mpi4py)
    sbatch slurm/train.sbatch                                   # Slurm

``molf-train --help`` lists every option with its default. Outputs in ``output_dir``:
metrics.jsonl, tensorboard/, routing.jsonl (MoLF modes), figures (molf-plot), checkpoints/,
merged/ (a plain Hugging Face model), adapter/ (PEFT LoRA, MoLF-Efficient), eval.json.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

from molf_ds.errors import MoLFError
from molf_ds.runtime import shutdown
from molf_ds.train.config import TrainConfig, parse_args

TINY_PRESETS = {
    "tiny-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "tiny-gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 16}),
}
TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
# Exit status of a run stopped by SIGUSR1/SIGTERM after checkpointing: EX_TEMPFAIL ("try again"),
# which slurm/train.sbatch turns into `scontrol requeue`; `resume=auto` then continues.
PREEMPTED_EXIT = 75


class Recipe:
    """One training run: ``setup`` → ``train`` → ``finish``; ``cleanup`` always runs."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.rank = int(os.environ.get("RANK", "0"))
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.start_step = 0
        self.preempted = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- set-up: everything is checked before anything is written -------------------------
    def setup(self) -> None:
        cfg = self.config
        self._check_output_dir()
        self._setup_distributed()
        self._resolve_batch()
        self.tokenizer, self.model = self._setup_model()
        self.train_examples, self.eval_records = self._setup_data()
        self.engine, self.optimizer = self._setup_engine()
        self.ckpt_dir = self.output_dir / "checkpoints"
        if cfg.resume != "no":
            self._resume()
        if self.is_main:  # every check passed: only now is anything written
            if cfg.overwrite and self.output_dir.is_dir():
                _clear_run_dir(self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.output_dir / "run_config.json", cfg.to_dict())
        _barrier()
        self._setup_telemetry()

    def _check_output_dir(self) -> None:
        cfg = self.config
        if self.output_dir.is_file():
            raise MoLFError(f"`output_dir` {self.output_dir} is a file: give a directory")
        occupied = self.output_dir.is_dir() and any(self.output_dir.iterdir())
        if occupied and not cfg.overwrite and cfg.resume == "no":
            raise MoLFError(
                f"`output_dir` {self.output_dir} is not empty: set resume=auto to continue "
                "that run, overwrite=true to replace it, or choose another output_dir"
            )

    def _setup_distributed(self) -> None:
        _ensure_launch_env()
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        from molf_ds.zero import init_distributed

        init_distributed()

    def _setup_model(self):

        cfg = self.config
        tokenizer, model = load_model(cfg.model, seed=cfg.seed)
        if cfg.mode in ("molf", "molf-efficient"):
            import molf_ds

            molf_ds.wrap(model, self._molf_config())
        elif cfg.mode in ("lora", "adalora"):
            model = _peft_model(model, cfg)
        return tokenizer, model

    def _molf_config(self):
        import molf_ds

        cfg = self.config
        return molf_ds.MoLFConfig(
            lora_ranks=tuple(cfg.lora_ranks),
            lora_alpha=cfg.lora_alpha,
            use_rslora=cfg.use_rslora,
            train_base=cfg.mode == "molf",
        )

    def _resolve_batch(self) -> None:
        """``batch_size`` (global) fixes the accumulation steps: it must divide evenly."""
        cfg = self.config
        per_step = cfg.micro_batch_size * self.world_size
        if cfg.batch_size:
            if cfg.batch_size % per_step:
                raise MoLFError(
                    f"`batch_size`={cfg.batch_size} is not divisible by micro_batch_size x ranks "
                    f"= {cfg.micro_batch_size} x {self.world_size}: change one of them"
                )
            self.config = cfg.model_copy(
                update={"gradient_accumulation_steps": cfg.batch_size // per_step}
            )

    def _setup_data(self):
        from molf_ds.train import data

        cfg = self.config
        train_records, eval_records = data.load_records(
            None if cfg.data == "sql" else cfg.data,
            prompt_field=cfg.prompt_field,
            completion_field=cfg.completion_field,
            eval_fraction=cfg.eval_fraction,
            seed=cfg.seed,
        )
        examples = data.tokenize(train_records, self.tokenizer, cfg.max_length)
        global_batch = cfg.micro_batch_size * self.world_size
        if len(examples) < global_batch:
            raise MoLFError(
                f"{len(examples)} training examples cannot fill one global batch of "
                f"{global_batch} (micro_batch_size={cfg.micro_batch_size} x {self.world_size} "
                "ranks): lower micro_batch_size or add data"
            )
        return examples, eval_records

    def _setup_engine(self):
        import deepspeed
        import torch

        import molf_ds
        from molf_ds.zero import fill_auto

        cfg = self.config
        ds_path = Path(cfg.ds_config)
        if not ds_path.exists():
            ds_path = CONFIG_DIR / f"{cfg.ds_config.removesuffix('.json')}.json"
        if not ds_path.exists():
            names = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
            raise MoLFError(
                f"`ds_config` {cfg.ds_config!r} not found: give a path or one of {names}"
            )
        ds_config = fill_auto(
            ds_path,
            micro_batch_size=cfg.micro_batch_size,
            gradient_accumulation_steps=cfg.gradient_accumulation_steps,
            world_size=self.world_size,
            gradient_clipping=cfg.gradient_clipping,
            bf16=cfg.bf16,
        )
        ds_config["steps_per_print"] = 10**9
        stage = self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        if cfg.mode == "adalora" and stage != 0:
            raise MoLFError(
                f"mode=adalora reads every parameter's full gradient, which ZeRO-{stage} "
                "partitions away: use ds_config=zero0"
            )
        schedule = _lr_lambda(cfg)

        def scheduler(optimizer):
            return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if cfg.mode in ("molf", "molf-efficient"):
            optimizer = molf_ds.MoLFAdamW(
                self.model,
                lr=cfg.lr,
                lora_lr=cfg.lora_lr,
                weight_decay=cfg.weight_decay,
                lora_weight_decay=cfg.lora_weight_decay,
                top_k=cfg.top_k,
                score=cfg.score,
            )
            engine, _, _, _ = molf_ds.initialize(
                model=self.model, optimizer=optimizer, config=ds_config, lr_scheduler=scheduler
            )
            return engine, optimizer
        lr = cfg.lora_lr if cfg.mode != "fft" and cfg.lora_lr is not None else cfg.lr
        optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=cfg.weight_decay)
        ds_config["zero_allow_untested_optimizer"] = True
        if (ds_config.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device"):
            ds_config["zero_force_ds_cpu_optimizer"] = False
        engine, _, _, _ = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=ds_config, lr_scheduler=scheduler
        )
        return engine, optimizer

    def _resume(self) -> None:
        cfg = self.config
        path = self.ckpt_dir if cfg.resume == "auto" else Path(cfg.resume)
        if not (path / "latest").exists():
            if cfg.resume == "auto":
                return  # nothing to resume: start from step 0
            raise MoLFError(f"`resume` {path} holds no DeepSpeed checkpoint ('latest' missing)")
        _, client_state = self.engine.load_checkpoint(str(path))
        self.start_step = int(client_state["step"])
        if self.is_main:
            print(f"molf-train: resumed from {path} at step {self.start_step}", flush=True)

    def _setup_telemetry(self) -> None:
        from molf_ds.train.telemetry import MetricsWriter, RoutingLog

        self.metrics = MetricsWriter(self.output_dir, enabled=self.is_main)
        self.routing_log = None
        if self.is_main and self.config.mode in ("molf", "molf-efficient"):
            plan = self.optimizer.plan
            self.routing_log = RoutingLog(
                self.output_dir / "routing.jsonl", plan.module_names, plan.expert_names
            )

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> None:
        cfg = self.config
        progress = _progress(cfg.max_steps, self.start_step, self.is_main)
        stream = self._micro_batches(self.start_step * cfg.gradient_accumulation_steps)
        self.engine.train()
        self.signals = _PreemptionSignals()
        try:
            self._loop(stream, progress, self.signals)
        finally:
            if not self.preempted:  # else kept until cleanup: a second signal must not cut
                self.signals.restore()  # the checkpoint finish() writes short
        progress.close()

    def _loop(self, stream, progress, signals) -> None:
        import torch

        cfg = self.config
        tokens_done, started, losses, waited = 0, time.perf_counter(), [], 0.0
        self.final_step = self.start_step
        for step in range(self.start_step, cfg.max_steps):
            for _ in range(cfg.gradient_accumulation_steps):
                fetch = time.perf_counter()
                batch = {k: v.to(self.engine.device) for k, v in next(stream).items()}
                waited += time.perf_counter() - fetch
                loss = self.engine(**batch).loss
                self.engine.backward(loss)
                if cfg.mode == "adalora" and self.engine.is_gradient_accumulation_boundary():
                    # AdaLoRA re-allocates ranks from the full, averaged gradients: they exist
                    # between backward and step without ZeRO (checked in _setup_engine).
                    self.model.base_model.update_and_allocate(step)
                self.engine.step()
                losses.append(loss.detach().float())
                tokens_done += int(batch["attention_mask"].sum()) * self.world_size
            if self.routing_log is not None:
                self.routing_log.append(step + 1, self.optimizer.last_routing)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps:
                mean_loss = _mean_over_ranks(torch.stack(losses).mean())
                losses.clear()
                elapsed = time.perf_counter() - started
                record = {
                    "loss": mean_loss,
                    "lr": self.engine.get_lr()[0],
                    "tokens_per_s": tokens_done / max(elapsed, 1e-9),
                    # share of wall time spent waiting for batches: the data pipeline's cost
                    "data_wait_share": waited / max(elapsed, 1e-9),
                }
                if cfg.mode in ("molf", "molf-efficient"):
                    record["fft_share"] = self.optimizer.last_routing.fft_share()
                self.metrics.log(step + 1, record)
                progress.update_postfix(record)
            progress.advance()
            self.final_step = step + 1
            if step + 1 < cfg.max_steps and self._agree(signals.received):
                self.preempted = True  # finish() checkpoints here, resume=auto continues
                break
            if cfg.stop_after and step + 1 == cfg.stop_after and step + 1 < cfg.max_steps:
                break  # as if preempted: finish() checkpoints here, resume=auto continues
            if cfg.save_every and (step + 1) % cfg.save_every == 0 and step + 1 < cfg.max_steps:
                self.save_checkpoint(step + 1)

    def _agree(self, flag: bool) -> bool:
        """True on every rank if any rank got a stop signal: the signal reaches ranks at
        different moments, but all must checkpoint the same step and leave together."""
        import torch
        import torch.distributed as dist

        value = torch.tensor([int(flag)], dtype=torch.int32, device=self.engine.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def _micro_batches(self, start: int):
        """This rank's micro-batches from micro-step ``start`` on, epoch after epoch; batch ``k``
        depends only on ``(seed, k)``, so a resumed run sees the data a straight run would."""
        from molf_ds.train import data

        cfg = self.config
        shape = {"micro_batch_size": cfg.micro_batch_size, "world_size": self.world_size}
        per_epoch = data.num_batches(self.train_examples, **shape)
        k = start
        while True:
            epoch, index = divmod(k, per_epoch)
            yield from data.batches(
                self.train_examples,
                **shape,
                pad_id=self.tokenizer.pad_token_id,
                rank=self.rank,
                seed=cfg.seed,
                epoch=epoch,
                start_step=index,
            )
            k = (epoch + 1) * per_epoch

    def save_checkpoint(self, step: int) -> None:
        self.engine.save_checkpoint(
            str(self.ckpt_dir),
            tag=f"step{step}",
            client_state={
                "universal_checkpoint_info": {},
                "step": step,
                "config": self.config.to_dict(),
            },
        )

    # ---- the end: checkpoint, exports, evaluation --------------------------------------------
    def finish(self) -> None:
        import torch.distributed as dist

        self.save_checkpoint(self.final_step)
        dist.barrier()
        self.outputs = {"checkpoint": str(self.ckpt_dir / f"step{self.final_step}")}
        if self.preempted:
            if self.is_main:
                print(
                    f"molf-train: preempted: checkpoint saved at step {self.final_step}; "
                    "continue with resume=auto",
                    flush=True,
                )
            return
        if self.final_step < self.config.max_steps:  # stopped early: no exports yet
            if self.is_main:
                print(f"molf-train: stopped at step {self.final_step}; continue with resume=auto")
            return
        if self.is_main:
            self.outputs.update(self._export())
            self.outputs.update(self._evaluate())
            self.outputs["metrics"] = str(self.output_dir / "metrics.jsonl")
            if self.routing_log is not None:
                self.outputs["routing_log"] = str(self.output_dir / "routing.jsonl")
            self.outputs.update(self._plot())
            _write_json(self.output_dir / "outputs.json", self.outputs)
            for key, value in self.outputs.items():
                print(f"molf-train: {key}: {value}", flush=True)
        dist.barrier()

    def _export(self) -> dict:
        """Rebuild the trained model on the CPU from the final checkpoint (DeepSpeed's
        zero_to_fp32 for ZeRO-1/2/3; without ZeRO, rank 0's weights) and write the exports."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        from molf_ds import export
        from molf_ds.model import wrap

        cfg = self.config
        if self.zero_stage == 0:  # no partitions: rank 0 holds every weight
            state = {
                k: v.detach().float().cpu() for k, v in self.engine.module.state_dict().items()
            }
        else:
            state = get_fp32_state_dict_from_zero_checkpoint(
                str(self.ckpt_dir), tag=f"step{self.final_step}"
            )
        tokenizer, model = load_model(cfg.model, seed=cfg.seed)
        outputs = {}
        if cfg.mode == "molf-efficient":
            base_dir = self.output_dir / "base"
            model.save_pretrained(base_dir)  # what the adapter applies to
            tokenizer.save_pretrained(base_dir)
        if cfg.mode in ("molf", "molf-efficient"):
            wrap(model, self._molf_config())
        elif cfg.mode in ("lora", "adalora"):
            model = _peft_model(model, cfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any(not _is_frozen(model, name) for name in missing):
            raise MoLFError(f"final checkpoint does not match the model: {missing or unexpected}")
        merged_dir = self.output_dir / "merged"
        if cfg.mode in ("lora", "adalora"):
            model.merge_and_unload().save_pretrained(merged_dir)
            tokenizer.save_pretrained(merged_dir)
        elif cfg.mode == "fft":
            model.save_pretrained(merged_dir)
            tokenizer.save_pretrained(merged_dir)
        else:
            export.export_merged(model, merged_dir, tokenizer=tokenizer)
        outputs["merged_model"] = str(merged_dir)
        if cfg.mode == "molf-efficient":
            base = cfg.model if cfg.model not in TINY_PRESETS else str(base_dir.resolve())
            adapter = export.export_peft_adapter(model, self.output_dir / "adapter", base)
            outputs["peft_adapter"] = str(adapter)
        return outputs

    def _evaluate(self) -> dict:
        from molf_ds.train.evaluate import evaluate_merged

        result = evaluate_merged(
            self.output_dir / "merged",
            self.eval_records[: self.config.eval_examples],
            exact_match=self.config.data == "sql",
        )
        _write_json(self.output_dir / "eval.json", result)
        return {
            "eval": str(self.output_dir / "eval.json"),
            **{f"eval_{k}": v for k, v in result.items()},
        }

    def _plot(self) -> dict:
        from molf_ds.train import plot

        figures = plot.plot_run(self.output_dir, self.output_dir / "figures")
        return {"figures": str(self.output_dir / "figures")} if figures else {}

    def cleanup(self) -> None:
        signals = getattr(self, "signals", None)
        if signals is not None:
            signals.restore()
        metrics = getattr(self, "metrics", None)
        if metrics is not None:
            metrics.close()
        routing_log = getattr(self, "routing_log", None)
        if routing_log is not None:
            routing_log.close()


def load_model(name: str, seed: int = 0):
    """``(tokenizer, model)`` from a tiny preset (built from a config, no download; initialised
    from ``seed``) or from a local path / hub id with ``from_pretrained``."""
    import torch
    import transformers

    if name in TINY_PRESETS:
        torch.manual_seed(seed)
        from molf_ds.train.tokenizer import byte_tokenizer

        tokenizer = byte_tokenizer()
        config_cls, model_cls, extra = TINY_PRESETS[name]
        vocab = 64 * math.ceil(len(tokenizer) / 64)
        config = getattr(transformers, config_cls)(vocab_size=vocab, **TINY_SHAPE, **extra)
        config.pad_token_id = tokenizer.pad_token_id
        return tokenizer, getattr(transformers, model_cls)(config)
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not Path(name).expanduser().is_dir():
        raise MoLFError(
            f"`model` path {name} does not exist: give a local model directory, a hub id, "
            f"or one of {', '.join(TINY_PRESETS)}"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        model = transformers.AutoModelForCausalLM.from_pretrained(name)
    except OSError as err:
        raise MoLFError(f"cannot load `model` {name!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


def _peft_model(model, cfg: TrainConfig):
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from molf_ds.config import DEFAULT_TARGET_MODULES

    targets = list(DEFAULT_TARGET_MODULES)
    if cfg.mode == "lora":
        peft_config = LoraConfig(
            r=cfg.lora_ranks[0],
            lora_alpha=cfg.lora_alpha,
            use_rslora=cfg.use_rslora,
            target_modules=targets,
        )
    else:
        peft_config = AdaLoraConfig(
            init_r=cfg.lora_ranks[0],
            target_r=max(1, cfg.lora_ranks[0] // 2),
            lora_alpha=cfg.lora_alpha,
            target_modules=targets,
            total_step=cfg.max_steps,
            tinit=min(cfg.warmup_steps, cfg.max_steps // 4),
            tfinal=cfg.max_steps // 4,
        )
    return get_peft_model(model, peft_config)


def _is_frozen(model, name: str) -> bool:
    param = dict(model.named_parameters()).get(name)
    return param is None or not param.requires_grad


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _lr_lambda(cfg: TrainConfig):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - progress)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return factor


def _mean_over_ranks(value) -> float:
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


class _progress:
    """A tqdm bar on rank 0; nothing elsewhere."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="molf-train", dynamic_ncols=True)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def update_postfix(self, record: dict) -> None:
        if self.bar is not None:
            shown = {
                "loss": f"{record['loss']:.3f}",
                "lr": f"{record['lr']:.2e}",
                "tok/s": f"{record['tokens_per_s']:.0f}",
            }
            if "fft_share" in record:
                shown["fft"] = f"{record['fft_share']:.2f}"
            self.bar.set_postfix(shown)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _PreemptionSignals:
    """SIGUSR1 (Slurm's ``--signal`` warning before the time limit) and SIGTERM (``scancel``,
    ``scontrol requeue``, preemption) only set a flag during the loop; the loop checkpoints at the
    next step boundary. Repeats change nothing; a run that hangs is still ended by the SIGKILL
    Slurm sends ``KillWait`` seconds after SIGTERM."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        self.received = True

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"


def _ensure_launch_env() -> None:
    """Rank variables for every launcher: deepspeed/torchrun set them; under mpirun they come
    from mpi4py (DeepSpeed's own MPI discovery would take the master address from
    ``hostname -I``); a plain process is rank 0 of 1."""
    if not _cuda():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        os.environ.setdefault("LOCAL_RANK", "0")
        return
    if any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMI_RANK")):
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        master = comm.bcast(_hostname_address() if comm.rank == 0 else None, root=0)
        port = comm.bcast(_free_port() if comm.rank == 0 else None, root=0)
        local = comm.Split_type(MPI.COMM_TYPE_SHARED).rank
        os.environ.update(
            RANK=str(comm.rank),
            WORLD_SIZE=str(comm.size),
            LOCAL_RANK=str(local),
            MASTER_ADDR=os.environ.get("MASTER_ADDR", master),
            MASTER_PORT=os.environ.get("MASTER_PORT", str(port)),
        )
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _hostname_address() -> str:
    import socket

    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _write_json(path: Path, value) -> None:
    import json

    path.write_text(json.dumps(value, indent=2) + "\n")


def _clear_run_dir(path: Path) -> None:
    import shutil

    for child in path.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    recipe = Recipe(config)
    code = 0
    try:
        recipe.setup()
        recipe.train()
        recipe.finish()
        if recipe.preempted:
            code = PREEMPTED_EXIT
    except MoLFError as err:
        print(f"molf-train: error: {err}", file=sys.stderr)
        code = 1
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        recipe.cleanup()
        shutdown(code)


if __name__ == "__main__":
    main()
