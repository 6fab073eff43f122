"""A CPU-scale study: FFT vs LoRA vs AdaLoRA vs MoLF vs MoLF-Efficient on fact editing and SQL.

    .venv/bin/python -m bench.study                 # the study: 3 seeds (see docs/results.md)
    .venv/bin/python -m bench.study --smoke --out /tmp/study   # 1-2 min: does everything run?

Stages, all in this one command:

1. **Pretraining** (cached): molf-train's ``tiny-qwen2`` preset (Qwen2, byte tokenizer) learns
   from scratch a generated corpus of invented facts (people -> object under four relations,
   each stated in five phrasings) and of SQL documents (each question of the embedded SQL task
   as a comment above its statement, the fine-tuning task's held-out statements left out),
   data-parallel on two processes. The model is saved with ``save_pretrained`` under
   ``.cache/study/<hash of the settings and corpus>``, so a rerun skips this. The `fact` task's
   evaluator then checks the model prefers the true object of each fact: without that,
   editing facts would mean nothing.
2. **Fine-tuning**: each method on (a) counterfactual fact editing in CounterFact's schema
   (known facts rewritten to another object; ``tasks.get("fact")``: efficacy on the edit prompt,
   paraphrase on the other phrasings, plus the share of untouched facts kept) and (b) the
   text-to-SQL task (``tasks.get("sql")``, the embedded generator, exact match). Each run is
   molf-train's own `Recipe`, in one of two worker processes: its set-up (the DeepSpeed config
   filled, the model and optimizer built by ``methods.METHODS``: PEFT LoRA/AdaLoRA,
   ``molf_ds.wrap`` + ``MoLFAdamW``; one rank, ``ds_config=zero0``, since AdaLoRA's hook reads
   whole gradients) from the pretrained model's directory and the task's training records as a
   ``data=`` file, then `Recipe.train_step` for every step (gradient accumulation, the method's
   after-backward hook, non-finite steps skipped), as molf-train's loop calls it; the trained
   model is scored in the worker, without molf-train's exports. Each method's learning-rate grid
   runs with the first seed; the option best on the validation split then runs with the other
   seeds, and the test split reports it over all of them.
3. **Report**: ``docs/results.md`` (tables, the paper's two claims checked, optimizer-state
   memory, routing dynamics, chosen learning rates, wall time, the command), the routing figure
   ``docs/results_routing.png``, and one JSON summary line on stdout (progress goes to stderr).

The data are built in `bench.study_data`, the numbers and the report in `bench.study_report`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from bench.study_data import (
    FactSplits,
    SqlSplits,
    fact_sentences,
    fact_splits,
    make_facts,
    packed_samples,
    sql_documents,
    sql_splits,
)
from bench.study_report import (
    COMPARED_MODES,
    TASK_METRICS,
    choose_option,
    claims,
    json_summary,
    memory_table,
    options_label,
    plot_routing,
    routing_curves,
    summarize,
    task_scores,
    write_report,
)
from molf_ds.errors import MoLFError, OneLineArgumentParser
from molf_ds.train.distributed import free_port

if TYPE_CHECKING:
    from molf_ds.train.config import TrainConfig
    from molf_ds.train.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
PROG = "python -m bench.study"

# Bump when the corpus, the world or the pretraining loop change: the cache key includes it.
CORPUS_VERSION = 1
CACHE_DIR = REPO / ".cache" / "study"


# ---- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainSettings:
    """The pretraining run; its JSON is the cache key (with `CORPUS_VERSION`)."""

    model: str = "tiny-qwen2"  # molf-train's preset: Qwen2, hidden 64, 4 layers, byte tokenizer
    subjects: int = 48  # invented people; each has one object per relation (4 facts)
    # the SQL documents' question -> statement mapping "clicks" (values copied from the
    # question) between steps ~1250 and ~1750 of a 2500-step run: held-out questions in the
    # corpus's own format go from 10 % to 62 % exact match there, 81 % at step 2500 (measured;
    # a 2000-step schedule, decaying sooner, got 42 % at step 1750)
    steps: int = 2500
    batch_size: int = 16
    seq_len: int = 192  # tokens (bytes) per packed sample, whole lines only
    fact_share: float = 0.5  # share of lines drawn from fact sentences (the rest: SQL)
    lr: float = 3e-3
    warmup_steps: int = 50
    seed: int = 0
    processes: int = 2  # data-parallel pretraining processes (batch_size is split among them)


@dataclass(frozen=True)
class StudySettings:
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    seeds: tuple[int, ...] = (0, 1, 2)
    # fact editing: edits per split, all edited together in one run
    fact_edits: int = 32
    fact_steps: int = 60
    # SQL: examples in each split (the generator's 3000 records, fixed split)
    sql_train: int = 2000
    sql_val: int = 48
    sql_test: int = 96
    sql_steps: int = 100
    batch_size: int = 16
    warmup_steps: int = 10
    eval_batch_size: int = 32
    # learning-rate grids: per method, the options of TrainConfig to try
    grids: dict = field(
        default_factory=lambda: {
            "fft": ({"lr": 3e-4}, {"lr": 1e-3}, {"lr": 3e-3}),
            "lora": ({"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}),
            # PEFT's AdaLoRA scales by alpha / rank (no rsLoRA) and starts its singular values at
            # zero: it needs larger rates than LoRA (measured)
            "adalora": ({"lr": 3e-3}, {"lr": 1e-2}, {"lr": 3e-2}),
            # one rate for both experts (molf-train's default, lora_lr=null), or a 3x higher LoRA
            # rate (under EPD routing the LoRA expert then wins almost every module: measured)
            "molf": ({"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-3, "lora_lr": 3e-3}),
            "molf-efficient": ({"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}),
        }
    )
    # LoRA ranks: LoRA r=8, AdaLoRA from 8 (target 4), MoLF FFT + r=8, MoLF-Efficient r=4 + r=8
    ranks: dict = field(
        default_factory=lambda: {
            "fft": (8,),
            "lora": (8,),
            "adalora": (8,),
            "molf": (8,),
            "molf-efficient": (4, 8),
        }
    )


SMOKE = StudySettings(
    pretrain=PretrainSettings(subjects=12, steps=60, batch_size=8, seq_len=128),
    seeds=(0,),
    fact_edits=8,
    fact_steps=6,
    sql_train=200,
    sql_val=4,
    sql_test=4,
    sql_steps=6,
    batch_size=8,
    warmup_steps=2,
    grids={
        "fft": ({"lr": 1e-3},),
        "lora": ({"lr": 3e-3},),
        "adalora": ({"lr": 3e-3},),
        "molf": ({"lr": 1e-3, "lora_lr": 3e-3},),
        "molf-efficient": ({"lr": 3e-3},),
    },
)


# ---- stage 1: pretraining ----------------------------------------------------------------------
def pretrain(settings: PretrainSettings, fact_lines: list[str], sql_lines: list[str], out: Path):
    """``info`` of molf-train's preset trained from scratch on the corpus and saved to ``out``
    (``save_pretrained``, with the tokenizer): plain AdamW (warm-up, cosine, clipping at 1), loss
    on every byte, data-parallel over ``settings.processes`` spawned processes (gloo, DDP; each
    draws its share of the batch from its own stream). On a 2-core machine shared with other
    jobs, two processes also get twice the CPU share of one."""
    import multiprocessing as mp
    import queue

    context = mp.get_context("fork")  # (see `run_jobs`)
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_pretrain_rank,
            args=(rank, port, settings, fact_lines, sql_lines, str(out), results),
        )
        for rank in range(settings.processes)
    ]
    cpu_before = _children_cpu_s()
    for process in processes:
        process.start()
    try:
        while True:
            try:
                result = results.get(timeout=10)
                break
            except queue.Empty:
                if not all(p.is_alive() for p in processes):
                    raise MoLFError("a pretraining process exited early") from None
        if "error" in result:
            raise RuntimeError(f"pretraining failed: {result['error']}")
    finally:
        _join_or_terminate(processes, timeout=60)
    return {**result["info"], "cpu_s": _children_cpu_s() - cpu_before}


def _join_or_terminate(processes: list, *, timeout: float) -> None:
    """Wait up to ``timeout`` s for each process to leave, then terminate it."""
    for process in processes:
        process.join(timeout=timeout)
        if process.is_alive():
            process.terminate()
            process.join()


def _children_cpu_s() -> float:
    """CPU seconds of this process's finished (joined) children."""
    times = os.times()
    return times.children_user + times.children_system


def _pretrain_rank(rank: int, port: int, settings, fact_lines, sql_lines, out: str, results):
    """One pretraining process; rank 0 saves the model to ``out`` and puts ``info`` on
    ``results`` (any rank its traceback, on an error)."""
    import traceback
    from datetime import timedelta

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from molf_ds.train.models import load_model
    from molf_ds.train.schedule import lr_factor

    try:
        _quiet_dependencies()
        torch.set_num_threads(1)
        world = settings.processes
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=5),
        )
        tokenizer, model = load_model(settings.model, seed=settings.seed)  # the same on every rank
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor(warmup_steps=settings.warmup_steps, max_steps=settings.steps)
        )
        rng = random.Random(f"study-pretrain:{settings.seed}:{rank}")
        stream = packed_samples(fact_lines, sql_lines, settings.fact_share, settings.seq_len, rng)
        model.train()
        started, losses = time.perf_counter(), []
        for _ in range(settings.steps):
            texts = [next(stream) for _ in range(settings.batch_size // world)]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = ddp(**batch, labels=labels).loss
            loss.backward()  # (DDP averages the gradients over the processes)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        final_loss = torch.tensor(sum(losses[-50:]) / len(losses[-50:]))
        dist.all_reduce(final_loss)
        if rank == 0:
            model.save_pretrained(out)
            tokenizer.save_pretrained(out)
            info = {
                "final_loss": float(final_loss) / world,
                "wall_s": time.perf_counter() - started,
                "parameters": sum(p.numel() for p in model.parameters()),
                "processes": world,
            }
            results.put({"info": info})
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - reported by the parent, which stops the study
        results.put({"error": f"rank {rank}:\n{traceback.format_exc()}"})


# ---- stage 2: fine-tuning, one run per (task, method, grid option, seed) ------------------------
@dataclass(frozen=True)
class Job:
    task: str
    method: str
    option: int  # index into settings.grids[method]
    seed: int


@dataclass(frozen=True)
class TaskData:
    """What a fine-tuning run of one task trains on and is scored on (records in the task's
    public schema)."""

    train: list[dict]
    evals: dict[str, list[dict]]  # split name -> records
    train_file: Path | None = None  # ``train`` as the file molf-train reads (``data=``)


def task_data(facts: FactSplits, sql: SqlSplits) -> dict[str, TaskData]:
    return {
        # the val and test edits are made together (one batch of edits), scored apart; "kept_*"
        # are the facts left alone (how much of the pretrained knowledge the edits keep)
        "fact": TaskData(
            train=facts.val + facts.test,
            evals={
                "val": facts.val,
                "test": facts.test,
                "kept_val": facts.kept_val,
                "kept_test": facts.kept_test,
            },
        ),
        "sql": TaskData(train=sql.train, evals={"val": sql.val, "test": sql.test}),
    }


def write_training_files(data: dict[str, TaskData], folder: Path) -> dict[str, TaskData]:
    """``data`` with each task's training records written to ``folder/<task>.jsonl``: molf-train
    reads its training data from a file, as a user's run does."""
    out = {}
    for name, task in data.items():
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in task.train))
        out[name] = replace(task, train_file=path)
    return out


class Worker:
    """One process's fine-tuning runs: each is molf-train's own `Recipe` (its set-up, then
    `Recipe.train_step` for every step), on the pretrained model's directory and the task's
    training records written as a file (``data=``), in an output directory of its own that goes
    once the run is scored."""

    def __init__(self, model_dir: str, settings: StudySettings, data: dict[str, TaskData]):
        import torch

        _quiet_dependencies()
        torch.set_num_threads(1)  # see `main`: one thread per process
        self.model_dir = model_dir
        self.settings = settings
        self.data = data

    def config(self, job: Job, output_dir: Path) -> TrainConfig:
        """The molf-train options of ``job``: the study's settings, zero0 (the builders hand
        back an engine, AdaLoRA's hook reads it), all of ``data`` for training (the study
        scores its own splits, not a held-out share)."""
        from molf_ds.train.config import TrainConfig

        s = self.settings
        return TrainConfig(
            output_dir=str(output_dir),
            model=self.model_dir,
            task=job.task,
            data=str(self.data[job.task].train_file),
            eval_fraction=0.0,
            max_length=MAX_LENGTH,
            mode=job.method,
            lora_ranks=s.ranks[job.method],
            max_steps=s.fact_steps if job.task == "fact" else s.sql_steps,
            warmup_steps=s.warmup_steps,
            micro_batch_size=s.batch_size,
            ds_config="zero0",
            seed=job.seed,
            **s.grids[job.method][job.option],
        )

    def run(self, job: Job) -> dict:
        """Fine-tune the pretrained model as molf-train does, then evaluate it."""
        import tempfile

        from molf_ds.train import tasks
        from molf_ds.train.recipe import Recipe

        with tempfile.TemporaryDirectory(prefix="study-run-") as scratch:
            recipe = Recipe(self.config(job, Path(scratch) / "run"))
            try:
                # molf-train's set-up lines (e.g. "evaluation off") join the progress on stderr:
                # stdout is the study's one JSON line
                with contextlib.redirect_stdout(sys.stderr):
                    recipe.setup()
                started = time.perf_counter()
                trace = run_steps(recipe)
                train_s = time.perf_counter() - started
                model = recipe.model.eval()
                started = time.perf_counter()
                task, evals = tasks.get(job.task), self.data[job.task]
                metrics = evaluate(
                    task, model, recipe.tokenizer, evals, self.settings.eval_batch_size
                )
                eval_s = time.perf_counter() - started
            finally:
                recipe.cleanup()
        losses = [loss for loss in trace.losses if loss is not None]
        result = {
            **asdict(job),
            "options": self.settings.grids[job.method][job.option],
            "metrics": metrics,
            "scores": task_scores(job.task, metrics),
            "final_loss": sum(losses[-5:]) / max(1, len(losses[-5:])),
            "skipped_steps": len(trace.losses) - len(losses),
            "train_s": train_s,
            "eval_s": eval_s,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            # the most the method kept beside the weights at any step (AdaLoRA frees its
            # sensitivity averages once the ranks are final)
            "state_bytes": max(trace.state_bytes),
        }
        if recipe.method.routed:
            plan = recipe.optimizer.plan
            result["routing"] = {
                "module_names": list(plan.module_names),
                "expert_names": list(plan.expert_names),
                # [step][module] -> index of the (top-1) winning expert; None: a skipped step
                "winners": trace.winners,
            }
        return result


@dataclass
class Trace:
    """What the study keeps of each step of a run (None where the step was skipped)."""

    losses: list[float | None] = field(default_factory=list)
    winners: list[list[int] | None] = field(default_factory=list)  # routed methods only
    state_bytes: list[int] = field(default_factory=list)


def run_steps(recipe: Recipe) -> Trace:
    """Every step of a set-up `Recipe`, by its own `Recipe.train_step` (gradient accumulation,
    the method's hook, skipping of non-finite steps), on its own micro-batches; the loss, the
    routing and the optimizer state read back after each."""
    trace = Trace()
    stream = recipe.micro_batches(0)
    recipe.engine.train()
    for step in range(recipe.config.max_steps):
        metrics = recipe.train_step(stream, step)
        loss = sum(float(x) for x in metrics.losses) / len(metrics.losses)
        trace.losses.append(loss if metrics.applied else None)
        trace.state_bytes.append(
            optimizer_state_bytes(recipe.optimizer) + rank_allocator_bytes(recipe.model)
        )
        if recipe.method.routed:
            winners = recipe.optimizer.last_routing.winners.float().argmax(dim=1).tolist()
            trace.winners.append(winners if metrics.applied else None)
    return trace


def evaluate(task, model, tokenizer, data: TaskData, batch_size: int) -> dict[str, dict]:
    """The task's evaluator on each evaluation split of ``data``."""
    import torch

    options = EVAL_OPTIONS[task.name]
    with torch.no_grad():
        return {
            split: task.evaluate(model, tokenizer, records, batch_size=batch_size, **options)
            for split, records in data.evals.items()
        }


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of every tensor the optimizer keeps per parameter (AdamW's moments and steps)."""
    import torch

    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )


def rank_allocator_bytes(model) -> int:
    """AdaLoRA's sensitivity averages, kept by PEFT's rank allocator beside the optimizer (0 for
    every other method): state of the method, so counted with the optimizer's."""
    allocator = getattr(getattr(model, "base_model", None), "rankallocator", None)
    if allocator is None:
        return 0
    buffers = (allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc)
    return sum(t.numel() * t.element_size() for b in buffers for t in b.values())


def _quiet_dependencies() -> None:
    """DeepSpeed's INFO lines and known deprecation warnings would bury the study's output."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    logging.getLogger("molf_ds").setLevel(logging.ERROR)  # (the zero0 config's adjustments)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # (generation-length reminders)
    transformers_logging.disable_progress_bar()  # (weight loading and saving)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # (reading the data files)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # (read when deepspeed is first imported)


def _worker_main(model_dir: str, settings: StudySettings, data, jobs, results) -> None:
    """A worker process: runs jobs from ``jobs`` until ``None``, puts each result (or the
    error's traceback) on ``results``."""
    import traceback

    try:
        worker = Worker(model_dir, settings, data)
    except Exception:  # noqa: BLE001 - reported by the parent, which stops the study
        results.put({"error": traceback.format_exc()})
        return
    while (job := jobs.get()) is not None:
        try:
            results.put(worker.run(job))
        except Exception:  # noqa: BLE001 - as above
            results.put({"error": f"{job}:\n{traceback.format_exc()}"})


class GridSearch:
    """The study's runs: for each task and method, every grid option with the first seed; once
    those are in, the option with the best validation score (`study_report.choose_option`) with
    each other seed. SQL first: its runs are the longest, so the workers finish together."""

    def __init__(self, settings: StudySettings) -> None:
        self.settings = settings
        self.first_seed = settings.seeds[0]
        self.grid_results: dict[tuple[str, str], dict[int, dict]] = {}

    def first_jobs(self) -> list[Job]:
        s = self.settings
        return [
            Job(task, method, option, self.first_seed)
            for task in sorted(TASK_METRICS, key=lambda t: t != "sql")
            for method in COMPARED_MODES
            for option in range(len(s.grids[method]))
        ]

    def total(self) -> int:
        s = self.settings
        modes = COMPARED_MODES
        per_seed = sum(len(s.grids[m]) for m in modes) + len(modes) * (len(s.seeds) - 1)
        return len(TASK_METRICS) * per_seed

    def follow_up(self, result: dict) -> list[Job]:
        """The jobs ``result`` completes the grid for: the chosen option's other seeds."""
        if result["seed"] != self.first_seed:
            return []
        group = (result["task"], result["method"])
        done = self.grid_results.setdefault(group, {})
        done[result["option"]] = result
        if len(done) < len(self.settings.grids[result["method"]]):
            return []
        selection_metric = TASK_METRICS[result["task"]][0]
        chosen = choose_option([done[i]["scores"]["val"][selection_metric] for i in sorted(done)])
        return [Job(*group, chosen, seed) for seed in self.settings.seeds[1:]]


def run_jobs(search: GridSearch, model_dir: Path, settings, data, workers: int, log) -> list[dict]:
    """Every result of ``search``'s jobs, run by ``workers`` processes, one DeepSpeed process
    group each. Forked, not spawned: a spawned process imports torch, transformers and DeepSpeed
    again, over a minute on this machine when it is busy; this process holds no thread pool or
    process group to inherit (one torch thread, no collectives here)."""
    import multiprocessing as mp
    import queue

    context = mp.get_context("fork")
    job_queue, results = context.Queue(), context.Queue()
    submitted = 0
    for job in search.first_jobs():
        job_queue.put(job)
        submitted += 1
    processes = [
        context.Process(
            target=_worker_main, args=(str(model_dir), settings, data, job_queue, results)
        )
        for _ in range(workers)
    ]
    for process in processes:
        process.start()
    done: list[dict] = []
    try:
        while len(done) < submitted:
            try:
                result = results.get(timeout=10)
            except queue.Empty:
                if not any(p.is_alive() for p in processes):
                    raise MoLFError("every fine-tuning worker exited early") from None
                continue
            if "error" in result:
                raise RuntimeError(f"a fine-tuning run failed: {result['error']}")
            done.append(result)
            log(f"[{len(done)}/{search.total()}] {_describe(result)}")
            for job in search.follow_up(result):
                job_queue.put(job)
                submitted += 1
        for _ in processes:
            job_queue.put(None)  # every job is done: the workers may leave
    finally:
        _join_or_terminate(processes, timeout=30)
    return done


def finetune(search: GridSearch, model_dir: Path, settings, data, workers: int, log) -> list[dict]:
    """`run_jobs` on the tasks' training records written to a scratch folder, which also holds
    the datasets cache of reading them: the study leaves nothing behind."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="molf-study-") as scratch:
        # read when the workers first import datasets (this process has not)
        os.environ["HF_DATASETS_CACHE"] = str(Path(scratch) / "datasets")
        files = write_training_files(data, Path(scratch))
        return run_jobs(search, model_dir, settings, files, workers, log)


def _describe(result: dict) -> str:
    scores = ", ".join(
        f"{split} {name} {value:.2f}"
        for split, values in result["scores"].items()
        for name, value in values.items()
    )
    skipped = f", {result['skipped_steps']} steps skipped" if result["skipped_steps"] else ""
    return (
        f"{result['task']} {result['method']} {options_label(result['options'])} seed "
        f"{result['seed']}: {scores} ({result['train_s']:.0f}+{result['eval_s']:.0f} s{skipped})"
    )


# Evaluator options per task: the embedded SQL task's answers are at most 80 bytes (+ eos), and
# the tiny model's 256 positions must hold prompt and generation.
EVAL_OPTIONS = {"fact": {}, "sql": {"max_new_tokens": 96}}
MAX_LENGTH = 256  # tokens per training example: the tiny model's positions


# ---- the command ---------------------------------------------------------------------------------
def pretrained_model(
    settings: StudySettings, sql: SqlSplits, facts_known: list[dict], cache: Path, log
):
    """``(model directory, info)``: the cached pretrained model for these settings, or a new one
    (trained, checked, saved). ``info`` holds the corpus sizes, the loss and the knowledge check."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from molf_ds.train import tasks
    from molf_ds.train.models import load_model

    p = settings.pretrain
    facts = make_facts(p.subjects, p.seed)
    fact_lines = fact_sentences(facts)
    documents = sql_documents(sql.val + sql.test)
    key = hashlib.sha256(
        json.dumps(
            {"version": CORPUS_VERSION, "settings": asdict(p), "corpus": [fact_lines, documents]},
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    where = cache / key
    if (where / "pretraining.json").is_file():
        info = json.loads((where / "pretraining.json").read_text())
        log(f"pretrained model: cached in {where}")
        return where, {**info, "cached": True}
    log(f"pretraining {p.steps} steps: {len(fact_lines)} fact lines, {len(documents)} SQL docs")
    partial = cache / f"{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    info = pretrain(p, fact_lines, documents, partial)
    tokenizer = AutoTokenizer.from_pretrained(partial)
    model = AutoModelForCausalLM.from_pretrained(partial, dtype=torch.float32).eval()
    fact_task = tasks.get("fact")
    _, untrained = load_model(p.model, seed=p.seed)
    with torch.no_grad():
        info["known"] = _scores_only(
            fact_task.evaluate(model, tokenizer, facts_known, batch_size=64)
        )
        info["known_untrained"] = _scores_only(
            fact_task.evaluate(untrained.eval(), tokenizer, facts_known, batch_size=64)
        )
    info.update(facts=len(facts), fact_lines=len(fact_lines), sql_documents=len(documents))
    (partial / "pretraining.json").write_text(json.dumps(info, indent=2) + "\n")
    shutil.rmtree(where, ignore_errors=True)
    partial.rename(where)  # published only complete
    return where, {**info, "cached": False}


def _scores_only(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("examples", "examples_per_s")}


def pretrained_scores(model_dir: Path, data: dict[str, TaskData], settings: StudySettings) -> dict:
    """The pretrained model's test scores before any fine-tuning (the table's first row)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from molf_ds.train import tasks

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for name, d in data.items():
            metrics = evaluate(tasks.get(name), model, tokenizer, d, settings.eval_batch_size)
            out[name] = task_scores(name, metrics)["test"]
    return out


def _process_age_s() -> float:
    """Seconds since this process started (Linux's /proc; 0 elsewhere)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def parse_args(argv: list[str] | None):
    parser = OneLineArgumentParser(
        prog=PROG,
        description="FFT vs LoRA vs AdaLoRA vs MoLF vs MoLF-Efficient on fact editing and SQL, "
        "from a pretrained tiny model; writes results.md, a routing figure and a JSON line.",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny settings, 1 seed (~1 min)")
    parser.add_argument("--out", default=str(REPO / "docs"), help="where results.md goes")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3)")
    parser.add_argument(
        "--workers", type=int, default=None, help="processes (default: cores, at most 2)"
    )
    parser.add_argument("--cache", default=str(CACHE_DIR), help="pretrained models' cache")
    args = parser.parse_args(argv)
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give at least 1")
    if args.workers is not None and args.workers < 1:
        parser.error(f"--workers {args.workers}: give at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter() - _process_age_s()  # the wall time counts the imports too
    load_start = os.getloadavg()[0]
    settings = SMOKE if args.smoke else StudySettings()
    if args.seeds is not None:
        settings = replace(settings, seeds=tuple(range(args.seeds)))
    # One thread per process: on 64-wide layers torch's intra-op threads cost more in
    # synchronisation than they gain, and on a shared machine they can be 10x slower.
    workers = args.workers or max(1, min(2, os.cpu_count() or 1))

    def log(message: str) -> None:
        print(
            f"study [{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True
        )

    _quiet_dependencies()
    import torch

    torch.set_num_threads(1)
    try:
        p = settings.pretrain
        facts = fact_splits(make_facts(p.subjects, p.seed), settings.fact_edits, p.seed)
        sql = sql_splits(settings.sql_train, settings.sql_val, settings.sql_test)
        model_dir, pre = pretrained_model(settings, sql, facts.known, Path(args.cache), log)
    except MoLFError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    log(
        f"knowledge check: true object preferred for {100 * pre['known']['efficacy']:.1f} % of "
        f"facts (paraphrases {100 * pre['known']['paraphrase']:.1f} %)"
    )
    data = task_data(facts, sql)
    baseline = pretrained_scores(model_dir, data, settings)
    search = GridSearch(settings)
    log(f"{search.total()} fine-tuning runs on {workers} processes")
    finetune_started = time.perf_counter()
    runs = finetune(search, model_dir, settings, data, workers, log)
    finetune_wall = time.perf_counter() - finetune_started
    plain_settings = asdict(settings)  # as the report's JSON holds them
    summary = summarize(runs, plain_settings)
    out = Path(args.out)
    curves = routing_curves(runs, summary)
    figure = plot_routing(curves, plain_settings, out / "results_routing.png")
    report = {
        "command": " ".join([PROG, *(argv if argv is not None else sys.argv[1:])]),
        "settings": plain_settings,  # all the report reads of them: it never imports the study
        "wall_s": time.perf_counter() - started,
        # every process's CPU time: this one's and its joined children's (pretraining ranks,
        # fine-tuning workers); a cached pretraining's is in "pretraining"
        "cpu_s": sum(os.times()[:4]),
        "finetune_wall_s": finetune_wall,
        "workers": workers,
        "cpus": os.cpu_count(),
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "pretraining": pre,
        "pretrained_scores": baseline,
        "summary": summary,
        "claims": claims(summary),
        "memory": memory_table(runs),
        "routing": curves,
        "routing_figure": figure.name,
        "runs": [{k: v for k, v in r.items() if k != "routing"} for r in runs],
    }
    path = write_report(report, out)
    log(f"wrote {path} and {figure}")
    print(json.dumps(json_summary(report, path, figure)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
