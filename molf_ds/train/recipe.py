"""molf-train: fine-tune a causal LM by FFT, LoRA, AdaLoRA, MoLF or MoLF-Efficient on DeepSpeed
or FSDP2.

Copy-paste launches (each starts the same job; add ``--config run.yaml`` and ``key=value``s):

    molf-train max_steps=20                                     # one process
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module molf_ds.train   # 2 CPU ranks
    deepspeed --num_gpus 8 --module molf_ds.train ds_config=zero3 mode=molf model=Qwen/Qwen2.5-3B
    torchrun --nproc_per_node 2 -m molf_ds.train                # torchrun
    torchrun --nproc_per_node 8 -m molf_ds.train engine=fsdp2   # PyTorch's FSDP2
    mpirun -n 2 python -m molf_ds.train                         # MPI (ranks from mpi4py)
    sbatch slurm/train.sbatch                                   # Slurm

``molf-train --help`` lists every option with its default. Outputs in ``output_dir``:
metrics.jsonl, tensorboard/, routing.jsonl (MoLF modes), figures (molf-plot), checkpoints/,
merged/ (a plain Hugging Face model), adapter/ (PEFT LoRA, MoLF-Efficient), eval.json.

This module holds the `Recipe` (set-up → loop → finish, the same for every mode) and `main`.
What differs by mode is the table `methods.METHODS`, by engine (DeepSpeed, FSDP2) the table
`engines.ENGINES`; the models are `models`, the ranks and their agreement `distributed`, the
learning-rate schedule `schedule`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from molf_ds import ds_partitions
from molf_ds.errors import EveryRankError, MoLFError
from molf_ds.runtime import shutdown
from molf_ds.train import console, data, peers, plot, storage, tasks
from molf_ds.train.config import TrainConfig, parse_args
from molf_ds.train.distributed import (
    PREEMPTED_EXIT,
    PreemptionSignals,
    agree,
    agree_flags,
    barrier,
    ensure_launch_env,
    is_main_rank,
    mean_over_ranks,
    share_cpu_cores,
    wait_group,
)
from molf_ds.train.engines import ENGINES, Settings, checkpoint_engine
from molf_ds.train.evaluate import evaluate_merged, heldout_note, heldout_problem
from molf_ds.train.methods import METHODS
from molf_ds.train.models import build_model, load_model, with_state
from molf_ds.train.telemetry import MetricsWriter, RoutingLog
from molf_ds.zero import init_distributed


@dataclass(frozen=True)
class Derived:
    """What the job derives from the config and its launch. The validated config is never
    changed: a global ``batch_size`` fixes the accumulation steps here, not in the config."""

    rank: int
    world_size: int
    gradient_accumulation_steps: int
    zero_stage: int  # from the DeepSpeed config (0 under FSDP2)
    bf16: bool  # `bf16`, or when null: whether the ranks are GPUs
    engine_label: str  # what shards the run, for the summary: "ZeRO-2", "FSDP2"


@dataclass(frozen=True)
class StepMetrics:
    """What `Recipe.train_step` returns about one optimizer step; nothing in it was read back
    from the device (the losses stay there, the token count is a host tensor)."""

    step: int  # steps done, this one included
    losses: list[torch.Tensor]  # this rank's loss of each micro-batch, on the device
    tokens: torch.Tensor  # non-padding tokens over all ranks: a host tensor, summed before the copy
    data_wait_s: float  # waiting for the micro-batches and copying them to the device
    applied: bool  # False: skipped on every rank (a non-finite loss or gradient)
    stop_requested: bool  # a rank got a stop signal: every rank checkpoints this step and leaves


@dataclass(frozen=True)
class TrainResult:
    """What `Recipe.train` returns and `Recipe.finish` reads."""

    final_step: int
    preempted: bool  # stopped by a signal: finish() checkpoints, exits with PREEMPTED_EXIT
    train_s: float  # wall time of the loop
    tokens_per_s: float | None  # over the last logged steps, all ranks


@dataclass
class LogWindow:
    """The steps since the previous metrics record: the next record covers them (the first:
    the warm-up of kernels and allocators too)."""

    started: float = field(default_factory=time.perf_counter)
    losses: list[torch.Tensor] = field(default_factory=list)  # applied steps' only
    tokens: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.int64))
    waited: float = 0.0


class Recipe:
    """One training run: ``setup`` → ``train`` → ``finish``; ``cleanup`` always runs.

    ``__init__`` keeps the config and what follows from it alone; ``setup`` assigns what the
    ``_setup_*`` helpers return (the model, engine, data, telemetry, ...), and nothing else
    assigns attributes but ``finish``, which names the timeout its wait runs under. ``cleanup``
    undoes what was set up so far, whichever step failed.
    """

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.started = time.perf_counter()  # the summary's total time
        self.method = METHODS[config.mode]
        self.engine_kind = ENGINES[config.engine]
        self.output_dir = Path(config.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        # every rank's host and PID, filled by setup once the ranks are up; a failure before
        # that names no peer
        self.peer_processes: list[peers.Peer] = []
        # the option bounding the collective a rank waits in now: a lost peer's line names it
        self.timeout_key = "collective_timeout_s"
        self._cleanups = ExitStack()  # closes the logs, restores the signal handlers

    # ---- set-up: everything is checked before anything is written -------------------------
    def setup(self) -> None:
        cfg = self.config
        self._check_output_dir()
        console.quiet_dependencies(cfg.log_level)  # (imports DeepSpeed: after the cheap check)
        ensure_launch_env()  # rank variables for whatever launched this process
        init_distributed(collective_timeout_s=cfg.collective_timeout_s)
        share_cpu_cores()  # CPU ranks on one host: no more torch threads than cores
        # every rank, at once: the group the end of the run waits on for rank 0's exports
        self.finish_group = wait_group(cfg.finish_timeout_s)
        agree(storage.writable_problem(self.output_dir))
        self.derived, self.settings = self._setup_derived(
            int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        )
        self.tokenizer, self.model = build_model(
            cfg, self.settings.ds_config, self.method.build_model
        )
        self.checkpoint_bytes, self.exports_bytes = self._check_space(self.model)
        self.train_examples, self.eval_records, self.eval_task = self._setup_data(self.tokenizer)
        self.engine, self.optimizer = self._setup_engine()
        # where the engine does not skip non-finite steps itself (DeepSpeed's fp32 without ZeRO,
        # FSDP2): how the recipe makes the next step skip, after checking the gradients
        self.skip_step = self.engine_kind.step_skipper(self.engine)
        # after the engine: it sets this rank's device, which NCCL's object all-gather uses
        self.peer_processes.extend(peers.gather_peers())
        self.start_step = self._resume()
        if is_main_rank():  # every check passed: only now is anything written
            if cfg.overwrite and self.output_dir.is_dir():
                _clear_run_dir(self.output_dir)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.output_dir / "run_config.json", cfg.to_dict())
        barrier()
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
        agree(storage.space_problem(self.output_dir, checkpoint, exports, reclaimable))
        return checkpoint, exports

    def _setup_derived(self, rank: int, world_size: int) -> tuple[Derived, Settings]:
        """The derived values and the engine's settings (the filled DeepSpeed config). A global
        ``batch_size`` fixes the accumulation steps: it must divide evenly."""
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
        settings = self.engine_kind.settings(cfg, accumulation, world_size)
        derived = Derived(
            rank, world_size, accumulation, settings.zero_stage, settings.bf16, settings.label
        )
        return derived, settings

    def _setup_engine(self) -> tuple[Any, Any]:
        """``(engine, optimizer)``: the mode's optimizer on the configured engine (DeepSpeed's,
        or `engines.FSDP2Engine` over the model sharded by ``fully_shard``)."""
        return self.engine_kind.build(
            self.config,
            self.method,
            self.model,
            self.settings,
            self.derived.gradient_accumulation_steps,
        )

    def _setup_data(self, tokenizer) -> tuple[list, list, Any]:
        """``(training examples, held-out records, the task scoring them)``: records of
        ``data`` in ``task``'s schema (or plain prompt/completion ones, scored by loss only),
        split once by ``seed``, the training share tokenized, the held-out one cut to the
        ``eval_examples`` the end evaluates and checked that it can."""
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
        examples = data.tokenize(train_records, tokenizer, cfg.max_length, report=is_main_rank())
        global_batch = cfg.micro_batch_size * world_size
        if len(examples) < global_batch:
            raise MoLFError(
                f"{len(examples)} training examples cannot fill one global batch of "
                f"{global_batch} (micro_batch_size={cfg.micro_batch_size} x {world_size} "
                "ranks): lower micro_batch_size or add data"
            )
        return examples, self._setup_heldout(eval_records, scorer, tokenizer), scorer

    def _setup_heldout(self, held_out: list[dict], scorer: Any, tokenizer) -> list[dict]:
        """The held-out records the end evaluates; raises `EveryRankError` (the data is the same
        on every rank) if the evaluation could not score them, and says where it scores fewer
        than ``eval_examples``."""
        cfg = self.config
        records = held_out[: cfg.eval_examples]
        problem = heldout_problem(
            records, task=scorer, tokenizer=tokenizer, max_length=cfg.max_length
        )
        if problem is not None:
            raise EveryRankError(problem)
        note = heldout_note(len(held_out), cfg.eval_examples, cfg.eval_fraction)
        if note is not None and is_main_rank():
            print(f"molf-train: {note}", flush=True)
        return records

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
            raise MoLFError(f"`resume` {path} holds no checkpoint ('latest' missing)")
        tag_dir = path / (tag or (path / "latest").read_text().strip())
        written_by = checkpoint_engine(tag_dir)
        if written_by != cfg.engine:  # the other engine's files: one line, not its traceback
            raise EveryRankError(
                f"checkpoint {tag_dir} was written by engine={written_by}, but this run has "
                f"engine={cfg.engine}: resume with engine={written_by}, or start anew"
            )
        _, client_state = self.engine.load_checkpoint(str(path), tag=tag)
        step = int(client_state["step"])
        if is_main_rank():
            print(f"molf-train: resumed from {path} at step {step}", flush=True)
        return step

    def _setup_telemetry(self) -> tuple[MetricsWriter, RoutingLog | None]:
        """``(metrics, routing_log)``: metrics on rank 0; the routing log too, where routed."""
        is_main = is_main_rank()
        routing_log = None
        if is_main and self.method.routed:
            plan = self.optimizer.plan
            routing_log = RoutingLog(
                self.output_dir / "routing.jsonl", plan.module_names, plan.expert_names
            )
            self._cleanups.callback(routing_log.close)
        metrics = MetricsWriter(self.output_dir, enabled=is_main)
        self._cleanups.callback(metrics.close)  # (closed before the routing log, as ever)
        return metrics, routing_log

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Steps from ``start_step`` to ``max_steps``, or until a stop; see `_end_of_loop`."""
        cfg, derived = self.config, self.derived
        # a bar on a terminal; in a log file (Slurm, a pipe) plain lines
        progress = console.Progress(cfg.max_steps, self.start_step, enabled=is_main_rank())
        stream = self.micro_batches(self.start_step * derived.gradient_accumulation_steps)
        self.engine.train()
        signals = PreemptionSignals()
        # On an exception the handlers stay until cleanup: a launcher SIGTERMs the ranks left
        # when one dies, and a rank must still get to say which one (main's error line).
        self._cleanups.callback(signals.restore)
        started = time.perf_counter()
        try:
            final_step, preempted, tokens_per_s = self._loop(stream, progress, signals)
        finally:
            progress.close()  # ends its line: an error after it starts a line of its own
        train_s = time.perf_counter() - started
        if not preempted:  # else kept until cleanup: a second signal must not cut
            signals.restore()  # the checkpoint finish() writes short
        return TrainResult(final_step, preempted, train_s, tokens_per_s)

    def _loop(
        self, stream: Iterator[dict], progress: console.Progress, signals: PreemptionSignals
    ) -> tuple[int, bool, float | None]:
        """``(final step, preempted, tokens/s)``: `train_step`, `log_step`, `_end_of_loop`."""
        window, bad_in_a_row, tokens_per_s = LogWindow(), 0, None
        for step in range(self.start_step, self.config.max_steps):
            metrics = self.train_step(stream, step, stop_requested=lambda: signals.received)
            bad_in_a_row = 0 if metrics.applied else bad_in_a_row + 1
            end = self._end_of_loop(metrics, bad_in_a_row)
            record = self.log_step(metrics, window, progress)
            if record is not None:
                window, tokens_per_s = LogWindow(), record["tokens_per_s"]
            if end is not None:
                return metrics.step, end == "preempted", tokens_per_s
            if self.config.save_every and metrics.step % self.config.save_every == 0:
                self.save_checkpoint(metrics.step)
        return self.start_step, False, tokens_per_s  # resumed at max_steps: nothing to do

    def train_step(
        self,
        micro_batches: Iterator[dict[str, torch.Tensor]],
        step: int,
        stop_requested: Callable[[], bool] = lambda: False,
    ) -> StepMetrics:
        """Collective: optimizer step ``step`` (0-based), from the next
        ``gradient_accumulation_steps`` of ``micro_batches`` (host tensors, e.g. from
        `micro_batches`): forward and backward of each, the agreement between ranks before the
        optimizer step, then the step. Makes no host read of its own beyond the agreement's
        (the routed optimizer makes its one).

        A step whose loss or gradient is not finite is skipped on every rank (weights, moments,
        routing and LR schedule stay as they were; its batch is used up): ``applied`` says so.
        ``stop_requested`` is asked once, at the agreement; if it is true on any rank,
        ``stop_requested`` is true in the result on every rank.

        An outside driver (bench/study.py) may call this after `setup` and
        ``engine.train()``, without `train`: it writes no log and shows no progress.
        """
        engine, accumulation = self.engine, self.derived.gradient_accumulation_steps
        losses, tokens, waited, stop = [], torch.zeros((), dtype=torch.int64), 0.0, False
        for micro in range(accumulation):
            fetch = time.perf_counter()
            host_batch = next(micro_batches)
            batch = {k: v.to(engine.device) for k, v in host_batch.items()}
            waited += time.perf_counter() - fetch
            # counted on the host copy: a count of the device copy would wait for the device
            tokens += host_batch["attention_mask"].sum()
            loss = engine(**batch).loss
            engine.backward(_nan_gradient_if_nonfinite(loss))
            skip = False
            if micro == accumulation - 1:  # before the optimizer step
                stop, skip = self._agree_before_step(stop_requested)
            if not skip:
                self.method.after_backward(self.model, engine, step)
            engine.step()
            losses.append(loss.detach().float())
        # the same on every rank: DeepSpeed's skip follows the reduced grad norm, ours the
        # all-reduced flag
        applied = engine.was_step_applied()
        world = self.derived.world_size
        return StepMetrics(step + 1, losses, tokens * world, waited, applied, stop)

    def log_step(
        self, metrics: StepMetrics, window: LogWindow, progress: console.Progress
    ) -> dict[str, Any] | None:
        """Account ``metrics`` in ``window`` and the routing log; every ``log_every`` steps (and
        at the last) write the metrics record of the window and return it (the caller then starts
        a new window), else None."""
        cfg, engine = self.config, self.engine
        if metrics.applied:  # skipped steps leave no loss and no routing
            window.losses.extend(metrics.losses)
            if self.routing_log is not None:
                self.routing_log.append(metrics.step, self.optimizer.last_routing)
        window.tokens += metrics.tokens
        window.waited += metrics.data_wait_s
        record = None
        if metrics.step % cfg.log_every == 0 or metrics.step == cfg.max_steps:
            losses = window.losses
            elapsed = time.perf_counter() - window.started
            record = {
                "loss": mean_over_ranks(torch.stack(losses).mean()) if losses else None,
                "lr": engine.get_lr()[0],
                "tokens_per_s": int(window.tokens) / max(elapsed, 1e-9),
                # share of wall time spent waiting for batches: the data pipeline's cost
                "data_wait_share": window.waited / max(elapsed, 1e-9),
                "skipped_steps": ds_partitions.skipped_steps(engine),
            }
            if self.method.routed:
                record["fft_share"] = self.optimizer.last_routing.fft_share()
            self.metrics.log(metrics.step, record)
            progress.show(metrics.step, record)
        progress.update(1)
        return record

    def _end_of_loop(self, metrics: StepMetrics, bad_in_a_row: int) -> str | None:
        """Why the loop ends after this step (``"done"``, ``"preempted"``: finish() checkpoints
        here, resume=auto continues; ``"stop_after"``: the same, asked for), or None. Raises
        `EveryRankError` after ``max_bad_steps`` skipped steps in a row, before any export."""
        cfg = self.config
        if bad_in_a_row >= cfg.max_bad_steps:
            raise EveryRankError(self._diverged_message(metrics.step, bad_in_a_row))
        if metrics.step == cfg.max_steps:
            return "done"
        if metrics.stop_requested:
            return "preempted"
        if metrics.step == cfg.stop_after:  # (0: never)
            return "stop_after"
        return None

    def _agree_before_step(self, stop_requested: Callable[[], bool]) -> tuple[bool, bool]:
        """``(stop, skip)``, the same on every rank, from one all-reduce (MAX) per step.

        ``stop``: any rank got a stop signal (it reaches ranks at different moments, but all
        must checkpoint the same step and leave together). ``skip``: where the engine does not
        check the gradients (DeepSpeed without a wrapper: fp32, no ZeRO; FSDP2), each rank
        checks its averaged ones (its shards) and the step is skipped everywhere if any rank saw
        a NaN or inf; else DeepSpeed decides.
        """
        checks = self.skip_step is not None
        bad_gradient = checks and not _gradients_finite(self.engine.module)
        stop, skip = agree_flags([stop_requested(), bad_gradient], self.engine.device)
        if checks:
            self.skip_step(skip)
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

    def micro_batches(self, start: int) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's micro-batches from micro-step ``start`` on, epoch after epoch; batch ``k``
        depends only on ``(seed, k)``, so a resumed run sees the data a straight run would."""
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
    def finish(self, result: TrainResult) -> None:
        """Checkpoint the final step; after ``max_steps``, rank 0 writes the exports, the
        evaluation and the figures."""
        is_main, final_step = is_main_rank(), result.final_step
        resumed_at_end = final_step == self.start_step
        if not (resumed_at_end and (self.ckpt_dir / f"step{final_step}").is_dir()):
            self.save_checkpoint(final_step)  # (a run resumed at its end has it already)
        if result.preempted:
            if is_main:
                print(
                    f"molf-train: preempted: checkpoint saved at step {final_step}; "
                    "continue with resume=auto",
                    flush=True,
                )
            return
        if final_step < self.config.max_steps:  # stopped early: no exports yet
            if is_main:
                print(f"molf-train: stopped at step {final_step}; continue with resume=auto")
            return
        problem = None
        if is_main:
            try:
                self._write_outputs(result)
            except Exception as err:  # noqa: BLE001 - a full disk is one line; a bug re-raised
                problem = storage.write_problem(
                    err, "the exports", self.output_dir, self.exports_bytes
                )
                if problem is None:
                    raise
                problem += f"; checkpoint step{final_step} is intact: free space, then "
                problem += "resume=auto writes the exports"
        # rank 0 alone writes, for as long as finish_timeout_s: every rank leaves with its outcome
        self.timeout_key = "finish_timeout_s"
        agree(problem, group=self.finish_group)
        barrier(self.finish_group)
        self.timeout_key = "collective_timeout_s"

    def _write_outputs(self, result: TrainResult) -> None:
        """Rank 0: exports, evaluation, figures, outputs.json."""
        started = time.perf_counter()
        outputs = {
            "checkpoint": str(self.ckpt_dir / f"step{result.final_step}"),
            "optimizer": type(self.optimizer).__name__,  # the class that ran the steps
        }
        outputs.update(self._export(result.final_step))
        evaluation = self._evaluate()
        outputs["eval"] = str(self.output_dir / "eval.json")
        outputs.update({f"eval_{k}": v for k, v in evaluation.items()})
        outputs["metrics"] = str(self.output_dir / "metrics.jsonl")
        if self.routing_log is not None:
            outputs["routing_log"] = str(self.output_dir / "routing.jsonl")
        outputs.update(self._plot())
        _write_json(self.output_dir / "outputs.json", outputs)
        outputs["outputs"] = str(self.output_dir / "outputs.json")
        finish_s = time.perf_counter() - started  # what the other ranks waited for
        for line in self._summary(result, outputs, evaluation, finish_s):
            print(line, flush=True)

    def _summary(
        self, result: TrainResult, outputs: dict, evaluation: dict, finish_s: float
    ) -> list[str]:
        return console.summary(
            mode=self.config.mode,
            steps=result.final_step,
            world_size=self.derived.world_size,
            engine=self.derived.engine_label,
            train_s=result.train_s,
            finish_s=finish_s,
            total_s=time.perf_counter() - self.started,
            tokens_per_s=result.tokens_per_s,
            evaluation=evaluation,
            output_dir=self.output_dir,
            outputs={k: v for k, v in outputs.items() if not k.startswith("eval_")},
        )

    def _export(self, final_step: int) -> dict:
        """Rebuild the trained model on the CPU from the final checkpoint (DeepSpeed's
        zero_to_fp32 for ZeRO-1/2/3, without ZeRO rank 0's weights; FSDP2: the DCP checkpoint
        read whole) and write the exports."""
        cfg = self.config
        state = self.engine_kind.trained_state(
            cfg, self.engine, self.settings, self.ckpt_dir / f"step{final_step}"
        )
        tokenizer, base = load_model(
            cfg.model, seed=cfg.seed, attn_implementation=cfg.attn_implementation
        )

        def load_trained():
            return with_state(self.method.build_model(cfg, base), state)

        return self.method.export(cfg, tokenizer, base, load_trained, self.output_dir)

    def _evaluate(self) -> dict:
        """Evaluate the merged export on the held-out records; writes and returns eval.json."""
        result = evaluate_merged(
            self.output_dir / "merged",
            self.eval_records,
            task=self.eval_task,
            max_length=self.config.max_length,
        )
        _write_json(self.output_dir / "eval.json", result)
        return result

    def _plot(self) -> dict:
        figures = plot.plot_run(self.output_dir, self.output_dir / "figures")
        return {"figures": str(self.output_dir / "figures")} if figures else {}

    def cleanup(self) -> None:
        """Restore the signal handlers and close the logs, as far as set up."""
        self._cleanups.close()


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)  # --help, or a bad option: exits here, before any rank starts
    recipe = Recipe(config)
    code = 0
    try:
        recipe.setup()
        result = recipe.train()
        recipe.finish(result)
        if result.preempted:
            code = PREEMPTED_EXIT
    except MoLFError as err:  # an EveryRankError is the same on every rank: said once
        if not isinstance(err, EveryRankError) or is_main_rank():
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
    """A lost peer rank (dead, or silent past ``collective_timeout_s``, at the end of the run
    ``finish_timeout_s``) is one line naming it;
    anything else is a bug and keeps its traceback."""
    rank = int(os.environ.get("RANK", "0"))  # (set by the launcher, or by setup)
    key = recipe.timeout_key
    timeout_s = getattr(recipe.config, key)
    lost = peers.describe_lost_peer(err, tuple(recipe.peer_processes), rank, timeout_s, key)
    if lost is not None:
        print(f"molf-train: error: {lost}", file=sys.stderr, flush=True)
        return
    traceback.print_exc()


# ---- helpers --------------------------------------------------------------------------------
def _nan_gradient_if_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` unchanged (times exactly 1), or, when it is NaN or inf, with a NaN gradient: a
    step with a non-finite loss is skipped, and the skip is decided from the gradients
    (DeepSpeed's reduced grad norm under ZeRO, `Recipe._agree_before_step` without). A NaN
    loss almost always has a NaN gradient already; this makes sure, without a host read."""
    finite = torch.isfinite(loss.detach())
    return loss * torch.where(finite, 1.0, float("nan")).to(loss.dtype)


def _gradients_finite(model: torch.nn.Module) -> bool:
    """Whether this rank's gradients are finite: FSDP2's DTensor gradients by their local
    shards (the caller's agreement combines the ranks' answers, with no collective here)."""
    grads = [_local(p.grad) for p in model.parameters() if p.grad is not None]
    grads = [g for g in grads if g.numel()]
    return not grads or bool(torch.isfinite(torch.nn.utils.get_total_norm(grads)))


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)  # a DTensor
    return to_local() if to_local is not None else tensor


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


def _clear_run_dir(path: Path) -> None:
    for child in path.iterdir():
        shutil.rmtree(child) if child.is_dir() else child.unlink()


if __name__ == "__main__":
    main()
