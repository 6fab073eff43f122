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

Reading order: `Recipe` (set-up → loop → finish, the same for every mode), `main`, then the one
table `METHODS` of what differs by mode (model, optimizer and engine, a per-micro-step hook,
routing logs, exports) with the functions it names, then helpers.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from molf_ds import ds_partitions
from molf_ds.errors import EveryRankError, MoLFError
from molf_ds.estimate import PRESETS as ESTIMATE_PRESETS
from molf_ds.plan import weight_decay_groups
from molf_ds.runtime import shutdown
from molf_ds.train import console, peers, storage
from molf_ds.train.config import TrainConfig, parse_args

TINY_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
# Real models' shapes with random weights (for throughput and memory checks without a download).
_QWEN_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "tie_word_embeddings",
)
# Models built from a config (no download; random weights drawn from `seed`; the byte-level
# tokenizer): name -> (transformers config class, its fields). small-qwen2, the main job's, is
# twice as wide and half as deep as tiny-qwen2 (0.4M parameters against 0.2M): on the SQL task it
# gets further per second of a 2-core machine (README, Quick start).
PRESETS = {
    "small-qwen2": (
        "Qwen2Config",
        {**TINY_SHAPE, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2},
    ),
    "tiny-qwen2": ("Qwen2Config", TINY_SHAPE),
    "tiny-llama": ("LlamaConfig", TINY_SHAPE),
    "tiny-gemma3": ("Gemma3TextConfig", {**TINY_SHAPE, "head_dim": 16}),
    **{
        f"random-{shape}": ("Qwen2Config", {k: ESTIMATE_PRESETS[shape][k] for k in _QWEN_FIELDS})
        for shape in ("qwen2.5-0.5b", "qwen2.5-3b")
    },
}
# Exit status of a run stopped by SIGUSR1/SIGTERM after checkpointing: EX_TEMPFAIL ("try again"),
# which slurm/train.sbatch turns into `scontrol requeue`; `resume=auto` then continues.
PREEMPTED_EXIT = 75


@dataclass(frozen=True)
class Derived:
    """What the job derives from the config and its launch. The validated config is never
    changed: a global ``batch_size`` fixes the accumulation steps here, not in the config."""

    rank: int
    world_size: int
    gradient_accumulation_steps: int
    zero_stage: int  # from the DeepSpeed config
    bf16: bool  # `bf16`, or when null: whether the ranks are GPUs

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class Method:
    """Everything that differs between the modes (`METHODS`); the recipe never reads ``mode``."""

    # (config, freshly loaded model) -> the model to train: wrapped, adapted or as loaded;
    # built again on a fresh model for the export.
    build_model: Callable[[TrainConfig, Any], Any]
    # (config, model, DeepSpeed config, ZeRO stage) -> (engine, optimizer)
    build_engine: Callable[[TrainConfig, Any, dict, int], tuple[Any, Any]]
    # (config, tokenizer, fresh base model, load_trained, output_dir) -> outputs; load_trained()
    # builds this mode's model on the base and loads the final weights into it.
    export: Callable[[TrainConfig, Any, Any, Callable[[], Any], Path], dict]
    # (model, engine, step) after each micro-step's backward, before engine.step()
    after_backward: Callable[[Any, Any, int], None] = lambda model, engine, step: None
    # MoLF routing: routing.jsonl and the FFT share in the metrics
    routed: bool = False
    # full models the export writes (the merged model; MoLF-Efficient adds the base): disk space
    export_copies: int = 1


class Recipe:
    """One training run: ``setup`` → ``train`` → ``finish``; ``cleanup`` always runs.

    Every attribute is born in ``__init__``; ``setup`` (and ``train``) assign what the
    ``_setup_*`` helpers return.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.started = time.perf_counter()  # the summary's total time
        self.method = METHODS[config.mode]
        self.output_dir = Path(config.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        # assigned by setup()
        self.derived: Derived | None = None
        self.peer_processes: tuple[peers.Peer, ...] = ()  # every rank's host and PID
        self.tokenizer = None
        self.model = None
        self.train_examples: list | None = None
        self.eval_records: list | None = None  # in the task's schema (prompt/completion: plain)
        self.eval_task = None  # the task scoring eval_records; None: plain prompt/completion data
        self.engine = None
        self.optimizer = None
        self.start_step = 0
        # bytes of one checkpoint and of the exports (estimated before anything is written)
        self.checkpoint_bytes = 0
        self.exports_bytes = 0
        self.metrics = None
        self.routing_log = None
        # True where DeepSpeed does not skip non-finite steps itself (fp32 without ZeRO)
        self.checks_gradients = False
        # assigned by train()
        self.signals: _PreemptionSignals | None = None
        self.final_step = 0
        self.preempted = False
        self.train_s = 0.0  # wall time of the loop
        self.tokens_per_s: float | None = None  # over the loop, all ranks

    # ---- set-up: everything is checked before anything is written -------------------------
    def setup(self) -> None:
        cfg = self.config
        self._check_output_dir()
        console.quiet_dependencies(cfg.log_level)  # (imports DeepSpeed: after the cheap check)
        rank, world_size = self._setup_distributed()
        storage.agree(storage.writable_problem(self.output_dir))
        self.derived, ds_config = self._setup_derived(rank, world_size)
        self.tokenizer, self.model = self._setup_model(ds_config)
        self.checkpoint_bytes, self.exports_bytes = self._check_space(self.model)
        self.train_examples, self.eval_records, self.eval_task = self._setup_data(self.tokenizer)
        self.engine, self.optimizer = self.method.build_engine(
            cfg, self.model, ds_config, self.derived.zero_stage
        )
        self.checks_gradients = not ds_partitions.deepspeed_skips_nonfinite_steps(self.engine)
        # after the engine: it sets this rank's device, which NCCL's object all-gather uses
        self.peer_processes = peers.gather_peers()
        self.start_step = self._resume()
        if self.derived.is_main:  # every check passed: only now is anything written
            if cfg.overwrite and self.output_dir.is_dir():
                _clear_run_dir(self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.output_dir / "run_config.json", cfg.to_dict())
        _barrier()
        self.metrics, self.routing_log = self._setup_telemetry()

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

    def _check_space(self, model) -> tuple[int, int]:
        """``(checkpoint bytes, exports bytes)`` estimated from ``model``; every rank checks its
        view of ``output_dir``'s file system has room for one checkpoint and the exports (an
        ``overwrite``n run's old files count as free)."""
        checkpoint = storage.checkpoint_estimate(model)
        exports = storage.exports_estimate(model, self.method.export_copies)
        reclaimable = storage.tree_bytes(self.output_dir) if self.config.overwrite else 0
        storage.agree(storage.space_problem(self.output_dir, checkpoint, exports, reclaimable))
        return checkpoint, exports

    def _setup_distributed(self) -> tuple[int, int]:
        """``(rank, world_size)`` once the process group is up, whatever the launcher."""
        from molf_ds.zero import init_distributed

        _ensure_launch_env()
        init_distributed(collective_timeout_s=self.config.collective_timeout_s)
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])

    def _setup_derived(self, rank: int, world_size: int) -> tuple[Derived, dict]:
        """The derived values and the filled DeepSpeed config. A global ``batch_size`` fixes
        the accumulation steps: it must divide evenly."""
        from molf_ds.zero import ds_config_path, fill_auto

        cfg = self.config
        per_step = cfg.micro_batch_size * world_size
        accumulation = cfg.gradient_accumulation_steps
        if cfg.batch_size:
            if cfg.batch_size % per_step:
                raise MoLFError(
                    f"`batch_size`={cfg.batch_size} is not divisible by micro_batch_size x ranks "
                    f"= {cfg.micro_batch_size} x {world_size}: change one of them"
                )
            accumulation = cfg.batch_size // per_step
        ds_path = ds_config_path(cfg.ds_config)
        bf16 = _bf16(cfg, ds_path)
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
        return Derived(rank, world_size, accumulation, stage, bf16), ds_config

    def _setup_model(self, ds_config: dict):
        return build_model(self.config, ds_config)

    def _setup_data(self, tokenizer) -> tuple[list, list, Any]:
        """``(training examples, held-out records, the task scoring them)``: records of
        ``data`` in ``task``'s schema (or plain prompt/completion ones, scored by loss only),
        split once by ``seed``, the training share tokenized."""
        from molf_ds.train import data, tasks

        cfg, world_size = self.config, self.derived.world_size
        records, scorer = tasks.training_records(
            tasks.get(cfg.task),
            cfg.data,
            prompt_field=cfg.prompt_field,
            completion_field=cfg.completion_field,
            seed=cfg.seed,
        )
        train_records, eval_records = data.split_records(
            records, eval_fraction=cfg.eval_fraction, seed=cfg.seed
        )
        if scorer is not None:
            train_records = scorer.to_examples(train_records)
        examples = data.tokenize(train_records, tokenizer, cfg.max_length)
        global_batch = cfg.micro_batch_size * world_size
        if len(examples) < global_batch:
            raise MoLFError(
                f"{len(examples)} training examples cannot fill one global batch of "
                f"{global_batch} (micro_batch_size={cfg.micro_batch_size} x {world_size} "
                "ranks): lower micro_batch_size or add data"
            )
        return examples, eval_records, scorer

    def _resume(self) -> int:
        """The step to start from: 0, or that of the checkpoint ``resume`` names."""
        cfg = self.config
        if cfg.resume == "no":
            return 0
        path, tag = Path(cfg.resume), None
        if cfg.resume == "auto":  # the newest complete checkpoint: never an interrupted save's
            path, tag = self.ckpt_dir, storage.newest_checkpoint(self.ckpt_dir)
            if tag is None:
                return 0  # nothing to resume: start from step 0
        elif not (path / "latest").exists():
            raise MoLFError(f"`resume` {path} holds no DeepSpeed checkpoint ('latest' missing)")
        _, client_state = self.engine.load_checkpoint(str(path), tag=tag)
        step = int(client_state["step"])
        if self.derived.is_main:
            print(f"molf-train: resumed from {path} at step {step}", flush=True)
        return step

    def _setup_telemetry(self):
        """``(metrics, routing_log)``: metrics on rank 0; the routing log too, where routed."""
        from molf_ds.train.telemetry import MetricsWriter, RoutingLog

        is_main = self.derived.is_main
        metrics = MetricsWriter(self.output_dir, enabled=is_main)
        if not (is_main and self.method.routed):
            return metrics, None
        plan = self.optimizer.plan
        routing_log = RoutingLog(
            self.output_dir / "routing.jsonl", plan.module_names, plan.expert_names
        )
        return metrics, routing_log

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> None:
        cfg, derived = self.config, self.derived
        # a bar on a terminal; in a log file (Slurm, a pipe) plain lines
        progress = console.Progress(cfg.max_steps, self.start_step, enabled=derived.is_main)
        stream = self._micro_batches(self.start_step * derived.gradient_accumulation_steps)
        self.engine.train()
        self.signals = _PreemptionSignals()
        started = time.perf_counter()
        try:
            self.final_step, self.preempted, self.tokens_per_s = self._loop(stream, progress)
        finally:
            progress.close()  # ends its line: an error after it starts a line of its own
        self.train_s = time.perf_counter() - started
        # On an exception the handlers stay until cleanup: a launcher SIGTERMs the ranks left
        # when one dies, and a rank must still get to say which one (main's error line).
        if not self.preempted:  # else kept until cleanup: a second signal must not cut
            self.signals.restore()  # the checkpoint finish() writes short

    def _loop(self, stream, progress) -> tuple[int, bool, float | None]:
        """Steps from ``start_step``; returns ``(final step, preempted, tokens/s)``.

        A step whose loss or gradient is not finite is skipped on every rank (weights, moments,
        routing and LR schedule stay as they were; its batch is used up) and counted;
        ``max_bad_steps`` of them in a row stop the run with an error, before any export.
        """
        import torch

        cfg, derived, engine = self.config, self.derived, self.engine
        tokens_done, started, losses, waited = 0, time.perf_counter(), [], 0.0
        final_step, bad_in_a_row, tokens_per_s = self.start_step, 0, None
        for step in range(self.start_step, cfg.max_steps):
            step_losses, stop = [], False
            for micro in range(derived.gradient_accumulation_steps):
                fetch = time.perf_counter()
                batch = {k: v.to(engine.device) for k, v in next(stream).items()}
                waited += time.perf_counter() - fetch
                loss = engine(**batch).loss
                engine.backward(_nan_gradient_if_nonfinite(loss))
                skip = False
                if micro == derived.gradient_accumulation_steps - 1:  # before the optimizer step
                    stop, skip = self._agree_before_step()
                if not skip:
                    self.method.after_backward(self.model, engine, step)
                engine.step()
                step_losses.append(loss.detach().float())
                tokens_done += int(batch["attention_mask"].sum()) * derived.world_size
            final_step = step + 1
            # the same on every rank: DeepSpeed's skip follows the reduced grad norm, ours the
            # all-reduced flag
            if engine.was_step_applied():
                bad_in_a_row = 0
                losses.extend(step_losses)
                if self.routing_log is not None:
                    self.routing_log.append(final_step, self.optimizer.last_routing)
            else:
                bad_in_a_row += 1
                if bad_in_a_row >= cfg.max_bad_steps:
                    raise EveryRankError(self._diverged_message(final_step, bad_in_a_row))
            if final_step % cfg.log_every == 0 or final_step == cfg.max_steps:
                # Each record covers the steps since the previous one (the first: the warm-up of
                # kernels and allocators too). Mean over the applied steps only (skipped ones
                # leave no loss).
                mean_loss = _mean_over_ranks(torch.stack(losses).mean()) if losses else None
                losses.clear()
                elapsed = time.perf_counter() - started
                tokens_per_s = tokens_done / max(elapsed, 1e-9)
                record = {
                    "loss": mean_loss,
                    "lr": engine.get_lr()[0],
                    "tokens_per_s": tokens_per_s,
                    # share of wall time spent waiting for batches: the data pipeline's cost
                    "data_wait_share": waited / max(elapsed, 1e-9),
                    "skipped_steps": ds_partitions.skipped_steps(engine),
                }
                if self.method.routed:
                    record["fft_share"] = self.optimizer.last_routing.fft_share()
                self.metrics.log(final_step, record)
                progress.show(final_step, record)
                tokens_done, started, waited = 0, time.perf_counter(), 0.0
            progress.update(1)
            if final_step == cfg.max_steps:
                break
            if stop:  # finish() checkpoints here, resume=auto continues
                return final_step, True, tokens_per_s
            if final_step == cfg.stop_after:  # (0: never)
                break  # as if preempted: finish() checkpoints here, resume=auto continues
            if cfg.save_every and final_step % cfg.save_every == 0:
                self.save_checkpoint(final_step)
        return final_step, False, tokens_per_s

    def _agree_before_step(self) -> tuple[bool, bool]:
        """``(stop, skip)``, the same on every rank, from one all-reduce (MAX) per step.

        ``stop``: any rank got a stop signal (it reaches ranks at different moments, but all
        must checkpoint the same step and leave together). ``skip``: without a DeepSpeed wrapper
        (fp32, no ZeRO) nothing checks the gradients, so each rank checks its averaged ones and
        the step is skipped everywhere if any rank saw a NaN or inf; else DeepSpeed decides.
        """
        import torch
        import torch.distributed as dist

        bad_gradient = self.checks_gradients and not _gradients_finite(self.engine.module)
        flags = [int(self.signals.received), int(bad_gradient)]
        value = torch.tensor(flags, dtype=torch.int32, device=self.engine.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        stop, skip = (bool(v) for v in value.tolist())
        if self.checks_gradients:
            ds_partitions.skip_unwrapped_step(self.engine, skip)
        return stop, skip

    def _diverged_message(self, step: int, in_a_row: int) -> str:
        newest = storage.newest_checkpoint(self.ckpt_dir)  # (not a partial save's leftovers)
        kept = (
            f"the last checkpoint, {self.ckpt_dir / newest}, is kept"
            if newest
            else "no checkpoint was saved"
        )
        return (
            f"training diverged: {in_a_row} steps in a row (to step {step}) had a non-finite "
            f"loss or gradient and were skipped (max_bad_steps={self.config.max_bad_steps}); "
            f"nothing exported, {kept}: lower lr (now {self.config.lr:g}), set "
            "gradient_clipping (e.g. 1.0) or check the data"
        )

    def _micro_batches(self, start: int):
        """This rank's micro-batches from micro-step ``start`` on, epoch after epoch; batch ``k``
        depends only on ``(seed, k)``, so a resumed run sees the data a straight run would."""
        from molf_ds.train import data

        cfg, derived = self.config, self.derived
        shape = {"micro_batch_size": cfg.micro_batch_size, "world_size": derived.world_size}
        per_epoch = data.num_batches(self.train_examples, **shape)
        k = start
        while True:
            epoch, index = divmod(k, per_epoch)
            yield from data.batches(
                self.train_examples,
                **shape,
                pad_id=self.tokenizer.pad_token_id,
                rank=derived.rank,
                seed=cfg.seed,
                epoch=epoch,
                start_step=index,
            )
            k = (epoch + 1) * per_epoch

    def save_checkpoint(self, step: int) -> None:
        """Collective: ``checkpoints/step{step}``, published only complete (`storage`)."""
        newest = storage.newest_checkpoint(self.ckpt_dir)
        # the space a full disk's message asks for: the last checkpoint's size, once there is one
        needed = storage.tree_bytes(self.ckpt_dir / newest) if newest else self.checkpoint_bytes
        client_state = {
            "universal_checkpoint_info": {},
            "step": step,
            "config": self.config.to_dict(),
        }
        storage.save_checkpoint(self.engine, self.ckpt_dir, step, client_state, needed)

    # ---- the end: checkpoint, exports, evaluation --------------------------------------------
    def finish(self) -> None:
        import torch.distributed as dist

        is_main = self.derived.is_main
        resumed_at_end = self.final_step == self.start_step
        if not (resumed_at_end and (self.ckpt_dir / f"step{self.final_step}").is_dir()):
            self.save_checkpoint(self.final_step)  # (a run resumed at its end has it already)
        if self.preempted:
            if is_main:
                print(
                    f"molf-train: preempted: checkpoint saved at step {self.final_step}; "
                    "continue with resume=auto",
                    flush=True,
                )
            return
        if self.final_step < self.config.max_steps:  # stopped early: no exports yet
            if is_main:
                print(f"molf-train: stopped at step {self.final_step}; continue with resume=auto")
            return
        problem = None
        if is_main:
            try:
                self._write_outputs()
            except Exception as err:  # noqa: BLE001 - a full disk is one line; a bug re-raised
                problem = storage.write_problem(
                    err, "the exports", self.output_dir, self.exports_bytes
                )
                if problem is None:
                    raise
                problem += f"; checkpoint step{self.final_step} is intact: free space, then "
                problem += "resume=auto writes the exports"
        storage.agree(problem)  # rank 0 alone writes: every rank leaves with its outcome
        dist.barrier()

    def _write_outputs(self) -> None:
        """Rank 0: exports, evaluation, figures, outputs.json."""
        outputs = {
            "checkpoint": str(self.ckpt_dir / f"step{self.final_step}"),
            "optimizer": type(self.optimizer).__name__,  # the class that ran the steps
        }
        outputs.update(self._export())
        evaluation = self._evaluate()
        outputs["eval"] = str(self.output_dir / "eval.json")
        outputs.update({f"eval_{k}": v for k, v in evaluation.items()})
        outputs["metrics"] = str(self.output_dir / "metrics.jsonl")
        if self.routing_log is not None:
            outputs["routing_log"] = str(self.output_dir / "routing.jsonl")
        outputs.update(self._plot())
        _write_json(self.output_dir / "outputs.json", outputs)
        outputs["outputs"] = str(self.output_dir / "outputs.json")
        for line in self._summary(outputs, evaluation):
            print(line, flush=True)

    def _summary(self, outputs: dict, evaluation: dict) -> list[str]:
        return console.summary(
            mode=self.config.mode,
            steps=self.final_step,
            world_size=self.derived.world_size,
            zero_stage=self.derived.zero_stage,
            train_s=self.train_s,
            total_s=time.perf_counter() - self.started,
            tokens_per_s=self.tokens_per_s,
            evaluation=evaluation,
            output_dir=self.output_dir,
            outputs={k: v for k, v in outputs.items() if not k.startswith("eval_")},
        )

    def _export(self) -> dict:
        """Rebuild the trained model on the CPU from the final checkpoint (DeepSpeed's
        zero_to_fp32 for ZeRO-1/2/3; without ZeRO, rank 0's weights) and write the exports."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        cfg = self.config
        if self.derived.zero_stage == 0:  # no partitions: rank 0 holds every weight
            state = {
                k: v.detach().float().cpu() for k, v in self.engine.module.state_dict().items()
            }
        else:
            with console.chatter_hidden(cfg.log_level):  # its prints and bar, step by step
                state = get_fp32_state_dict_from_zero_checkpoint(
                    str(self.ckpt_dir), tag=f"step{self.final_step}"
                )
        tokenizer, base = load_model(
            cfg.model, seed=cfg.seed, attn_implementation=cfg.attn_implementation
        )

        def load_trained():
            return _with_state(self.method.build_model(cfg, base), state)

        return self.method.export(cfg, tokenizer, base, load_trained, self.output_dir)

    def _evaluate(self) -> dict:
        """Evaluate the merged export on the held-out records; writes and returns eval.json."""
        from molf_ds.train.evaluate import evaluate_merged

        result = evaluate_merged(
            self.output_dir / "merged",
            self.eval_records[: self.config.eval_examples],
            task=self.eval_task,
            max_length=self.config.max_length,
        )
        _write_json(self.output_dir / "eval.json", result)
        return result

    def _plot(self) -> dict:
        from molf_ds.train import plot

        figures = plot.plot_run(self.output_dir, self.output_dir / "figures")
        return {"figures": str(self.output_dir / "figures")} if figures else {}

    def cleanup(self) -> None:
        if self.signals is not None:
            self.signals.restore()
        if self.metrics is not None:
            self.metrics.close()
        if self.routing_log is not None:
            self.routing_log.close()


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)  # --help, or a bad option: exits here, before any rank starts
    recipe = Recipe(config)
    code = 0
    try:
        recipe.setup()
        recipe.train()
        recipe.finish()
        if recipe.preempted:
            code = PREEMPTED_EXIT
    except MoLFError as err:  # an EveryRankError is the same on every rank: said once
        if not isinstance(err, EveryRankError) or storage.is_main_rank():
            print(f"molf-train: error: {err}", file=sys.stderr)
        code = 1
    except OSError as err:  # a write outside checkpoints and exports (metrics, logs)
        where = f" ({err.filename})" if err.filename else ""
        print(
            f"molf-train: error: {err.strerror or err}{where}: free space or fix the file system, "
            "then resume=auto continues from the newest checkpoint",
            file=sys.stderr,
        )
        code = 1
    except Exception as err:
        _report_failure(recipe, err)
        code = 1
    finally:
        try:
            recipe.cleanup()
        except OSError as err:  # closing logs on a full disk: one line, never a traceback
            if code == 0:
                message = f"closing the logs: {err.strerror or err}: free space"
                print(f"molf-train: error: {message}", file=sys.stderr)
            code = code or 1
        shutdown(code)


def _report_failure(recipe: Recipe, err: Exception) -> None:
    """A lost peer rank (dead, or silent past ``collective_timeout_s``) is one line naming it;
    anything else is a bug and keeps its traceback."""
    rank = recipe.derived.rank if recipe.derived is not None else 0
    lost = peers.describe_lost_peer(
        err, recipe.peer_processes, rank, recipe.config.collective_timeout_s
    )
    if lost is not None:
        print(f"molf-train: error: {lost}", file=sys.stderr, flush=True)
        return
    import traceback

    traceback.print_exc()


# ---- the modes: what differs between them, and the one table ------------------------------
def _as_loaded(cfg: TrainConfig, model):
    """FFT trains the model as loaded."""
    return model


def _molf_model(cfg: TrainConfig, model, *, train_base: bool):
    """MoLF (``train_base``: the base is the FFT expert) or MoLF-Efficient (base frozen)."""
    import molf_ds

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
    from torch import nn

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
    from peft import LoraConfig, get_peft_model

    from molf_ds.config import DEFAULT_TARGET_MODULES

    _check_ranks(cfg.lora_ranks[:1], model)
    peft_config = LoraConfig(
        r=cfg.lora_ranks[0],
        lora_alpha=cfg.lora_alpha,
        use_rslora=cfg.use_rslora,
        target_modules=list(DEFAULT_TARGET_MODULES),
    )
    return get_peft_model(model, peft_config)


def _adalora_model(cfg: TrainConfig, model):
    from peft import AdaLoraConfig, get_peft_model

    from molf_ds.config import DEFAULT_TARGET_MODULES

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


def _molf_engine(cfg: TrainConfig, model, ds_config: dict, zero_stage: int):
    """`MoLFAdamW` (LoRA lr and weight decay of their own; routing) under `molf_ds.initialize`."""
    import molf_ds

    optimizer = molf_ds.MoLFAdamW(
        model,
        lr=cfg.lr,
        lora_lr=cfg.lora_lr,
        weight_decay=cfg.weight_decay,
        lora_weight_decay=cfg.lora_weight_decay,
        top_k=cfg.top_k,
        score=cfg.score,
    )
    engine, _, _, _ = molf_ds.initialize(
        model=model, optimizer=optimizer, config=ds_config, lr_scheduler=_scheduler(cfg)
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
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    section = baseline_optimizer_section(ds_config, lr=lr, weight_decay=weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=weight_decay_groups(trainable, weight_decay),
        config={**ds_config, "optimizer": section},
        lr_scheduler=_scheduler(cfg),
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
    from deepspeed.accelerator import get_accelerator

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
    if storage.is_main_rank():
        print(
            f"molf-train: warning: DeepSpeed's {'CPU Adam' if offload else 'FusedAdam'} op does "
            f"not build here ({problem}); the baseline runs torch's AdamW instead",
            file=sys.stderr,
            flush=True,
        )
    fused = {} if offload or on_cpu else {"fused": True}
    return {"type": "AdamW", "params": {**params, "torch_adam": True, **fused}}


def _fft_engine(cfg: TrainConfig, model, ds_config: dict, zero_stage: int):
    return _adamw_engine(
        cfg, model, ds_config, zero_stage, lr=cfg.lr, weight_decay=cfg.weight_decay
    )


def _lora_engine(cfg: TrainConfig, model, ds_config: dict, zero_stage: int):
    """LoRA's own rate and decay where given (``lora_lr``, ``lora_weight_decay``), as MoLF's
    LoRA experts take them."""
    lr = cfg.lr if cfg.lora_lr is None else cfg.lora_lr
    decay = cfg.weight_decay if cfg.lora_weight_decay is None else cfg.lora_weight_decay
    return _adamw_engine(cfg, model, ds_config, zero_stage, lr=lr, weight_decay=decay)


def _adalora_engine(cfg: TrainConfig, model, ds_config: dict, zero_stage: int):
    if zero_stage != 0:
        raise MoLFError(
            f"mode=adalora reads every parameter's full gradient, which ZeRO-{zero_stage} "
            "partitions away: use ds_config=zero0"
        )
    return _lora_engine(cfg, model, ds_config, zero_stage)


def _adalora_reallocate(model, engine, step: int) -> None:
    """AdaLoRA re-allocates ranks from the full, averaged gradients: they exist between backward
    and step without ZeRO (checked in `_adalora_engine`)."""
    if engine.is_gradient_accumulation_boundary():
        model.base_model.update_and_allocate(step)


def _export_hf(cfg: TrainConfig, tokenizer, base, load_trained, out: Path) -> dict:
    """FFT: the trained model is a plain Hugging Face model."""
    return {"merged_model": _save_pretrained(load_trained(), tokenizer, out / "merged")}


def _export_peft_merged(cfg: TrainConfig, tokenizer, base, load_trained, out: Path) -> dict:
    """LoRA, AdaLoRA: PEFT merges the adapter into the base."""
    merged = load_trained().merge_and_unload()
    return {"merged_model": _save_pretrained(merged, tokenizer, out / "merged")}


def _export_molf_merged(cfg: TrainConfig, tokenizer, base, load_trained, out: Path) -> dict:
    """MoLF: every expert folded into the base weights."""
    from molf_ds import export

    merged = export.export_merged(load_trained(), out / "merged", tokenizer=tokenizer)
    return {"merged_model": str(merged)}


def _export_molf_adapter(cfg: TrainConfig, tokenizer, base, load_trained, out: Path) -> dict:
    """MoLF-Efficient: the merged model, and one PEFT LoRA adapter for the (frozen) base."""
    from molf_ds import export

    base_dir = Path(_save_pretrained(base, tokenizer, out / "base"))  # before it is wrapped
    model = load_trained()
    merged = export.export_merged(model, out / "merged", tokenizer=tokenizer)
    base_name = cfg.model if cfg.model not in PRESETS else str(base_dir.resolve())
    adapter = export.export_peft_adapter(model, out / "adapter", base_name)
    return {"merged_model": str(merged), "peft_adapter": str(adapter)}


METHODS: dict[str, Method] = {
    "fft": Method(build_model=_as_loaded, build_engine=_fft_engine, export=_export_hf),
    "lora": Method(build_model=_lora_model, build_engine=_lora_engine, export=_export_peft_merged),
    "adalora": Method(
        build_model=_adalora_model,
        build_engine=_adalora_engine,
        export=_export_peft_merged,
        after_backward=_adalora_reallocate,
    ),
    "molf": Method(
        build_model=partial(_molf_model, train_base=True),
        build_engine=_molf_engine,
        export=_export_molf_merged,
        routed=True,
    ),
    "molf-efficient": Method(
        build_model=partial(_molf_model, train_base=False),
        build_engine=_molf_engine,
        export=_export_molf_adapter,
        routed=True,
        export_copies=2,
    ),
}


# ---- helpers --------------------------------------------------------------------------------
def build_model(cfg: TrainConfig, ds_config: dict):
    """``(tokenizer, model)``: the model ``cfg`` trains, built the way its mode builds it
    (`METHODS`), with gradient checkpointing when asked.

    Under ZeRO-3 (``zero_init``) it is built partitioned: transformers constructs (or loads) it
    inside ``deepspeed.zero.Init``, as Trainer and accelerate do, so no rank ever holds it whole;
    a preset's random weights are then drawn by transformers' ZeRO-3 initialiser (rank 0's
    generator, seeded from ``seed``): the same on any number of ranks, other values than a
    preset built whole. The adapters' random init depends on ``seed`` alone, not on how the
    model was built.
    """
    import torch

    zero3 = ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    with _built_partitioned(ds_config if zero3 and cfg.zero_init else None):
        tokenizer, model = load_model(
            cfg.model, seed=cfg.seed, attn_implementation=cfg.attn_implementation
        )
        if cfg.gradient_checkpointing:
            _checkpoint_activations(model)
        torch.manual_seed(cfg.seed)
        model = METHODS[cfg.mode].build_model(cfg, model)
    return tokenizer, model


@contextmanager
def _built_partitioned(ds_config: dict | None):
    """Within: transformers builds models inside ``deepspeed.zero.Init`` for ``ds_config`` (a
    ZeRO-3 config; None: as usual), through the ``HfDeepSpeedConfig`` that Trainer and accelerate
    keep alive. After: never again, so that rank 0's export and evaluation load and generate
    alone."""
    if ds_config is None:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        del alive
        unset_hf_deepspeed_config()


def _checkpoint_activations(model) -> None:
    """Non-reentrant activation checkpointing (torch's recommended mode; it needs no input that
    requires grad), and no KV cache, which training never reads."""
    kwargs = {"use_reentrant": False}
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.2x
    if enable is not None:
        enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def load_model(name: str, seed: int = 0, attn_implementation: str = "sdpa"):
    """``(tokenizer, model)`` from a preset (`PRESETS`: built from a config, no download;
    initialised from ``seed``, on the rank's GPU when there is one) or from a local path / hub id
    with ``from_pretrained``."""
    import torch
    import transformers
    from transformers.integrations import is_deepspeed_zero3_enabled

    if name in PRESETS:
        torch.manual_seed(seed)
        from molf_ds.train.tokenizer import byte_tokenizer

        tokenizer = byte_tokenizer()
        config_cls, shape = PRESETS[name]
        vocab = 64 * math.ceil(len(tokenizer) / 64)
        config = getattr(transformers, config_cls)(vocab_size=vocab, **shape)
        config.pad_token_id = tokenizer.pad_token_id
        # drawn where it will train (seconds on a GPU for a model that takes minutes on a CPU);
        # zero.Init places the partitions itself
        device = "cpu" if is_deepspeed_zero3_enabled() or not _cuda() else _local_device()
        with torch.device(device), _attention_problem(name, attn_implementation):
            model = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation=attn_implementation
            )
        return tokenizer, model
    looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
    if looks_local and not Path(name).expanduser().is_dir():
        raise MoLFError(
            f"`model` path {name} does not exist: give a local model directory, a hub id, "
            f"or one of {', '.join(PRESETS)}"
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name)
        with _attention_problem(name, attn_implementation):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                name, attn_implementation=attn_implementation
            )
    except OSError as err:
        raise MoLFError(f"cannot load `model` {name!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, model


@contextmanager
def _attention_problem(name: str, attn_implementation: str):
    """transformers' refusal of an attention kernel (not installed, not for this model) as one
    line."""
    try:
        yield
    except (ImportError, ValueError) as err:
        if attn_implementation not in str(err) and "attention" not in str(err).lower():
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise MoLFError(
            f"`attn_implementation` {attn_implementation!r} does not work for `model` {name!r}: "
            f"{first}; choose another (sdpa is the default)"
        ) from None


def _with_state(model, state: dict):
    """``model`` with the trained weights of ``state``; frozen weights may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not _is_frozen(model, name) for name in missing):
        raise MoLFError(f"final checkpoint does not match the model: {missing or unexpected}")
    return model


def _is_frozen(model, name: str) -> bool:
    param = dict(model.named_parameters()).get(name)
    return param is None or not param.requires_grad


def _save_pretrained(model, tokenizer, path: Path) -> str:
    from molf_ds.export import check_finite

    check_finite(model.state_dict(), "model")  # a diverged run exports nothing
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def _scheduler(cfg: TrainConfig):
    """DeepSpeed's ``lr_scheduler`` argument: optimizer → `LambdaLR` of the schedule."""
    import torch

    factor = _lr_lambda(cfg)
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def _nan_gradient_if_nonfinite(loss):
    """``loss`` unchanged (times exactly 1), or, when it is NaN or inf, with a NaN gradient: a
    step with a non-finite loss is skipped, and the skip is decided from the gradients
    (DeepSpeed's reduced grad norm under ZeRO, `Recipe._agree_before_step` without). A NaN
    loss almost always has a NaN gradient already; this makes sure, without a host read."""
    import torch

    finite = torch.isfinite(loss.detach())
    return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)


def _gradients_finite(model) -> bool:
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def _mean_over_ranks(value) -> float:
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()


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


def _bf16(cfg: TrainConfig, ds_path: Path) -> bool:
    """``bf16``; when null, the DeepSpeed config's own ``bf16.enabled`` where it sets one, else
    whether the ranks are GPUs."""
    if cfg.bf16 is not None:
        return cfg.bf16
    import json

    try:
        fixed = json.loads(ds_path.read_text()).get("bf16", {}).get("enabled", "auto")
    except (OSError, ValueError, AttributeError):  # fill_auto reports a broken file
        fixed = "auto"
    return _cuda() if fixed == "auto" else bool(fixed)


def _local_device() -> str:
    """This rank's GPU (the one DeepSpeed's engine will use)."""
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


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


if __name__ == "__main__":
    main()
