"""A CPU-scale study: FFT vs LoRA vs AdaLoRA vs MoLF vs MoLF-Efficient on fact editing and SQL.

    .venv/bin/python bench/study.py                 # the study: 3 seeds, ~25 min on 2 cores
    .venv/bin/python bench/study.py --smoke --out /tmp/study   # ~1 min: does everything run?

Stages, all in this one command:

1. **Pretraining** (cached): a tiny Qwen2 (molf-train's ``tiny-qwen2`` preset, byte tokenizer)
   learns a generated corpus of invented facts (subject -> object under four relations, each
   stated in five phrasings) and of SQL statements over the embedded SQL task's five tables.
   The model is saved with ``save_pretrained`` under ``.cache/study/<hash of the settings>``,
   so a rerun skips this. Then the fact task's evaluator checks the model prefers the true
   object of each fact: without that, editing facts would mean nothing.
2. **Fine-tuning**: each method on (a) a counterfactual fact-editing task in CounterFact's schema
   (edit known facts to a different object; efficacy on the edited prompt, paraphrase on the
   other phrasings; ``tasks.get("fact")``) and (b) the text-to-SQL task (``tasks.get("sql")``,
   the embedded generator, exact match). Models and optimizers come from molf-train's own
   builders (``recipe.METHODS``: PEFT LoRA/AdaLoRA, ``molf_ds.wrap`` + ``MoLFAdamW``), each run
   on a single-process DeepSpeed engine (``ds_config=zero0``) in a worker process, the loop
   being molf-train's (forward, backward, the method's after-backward hook, step). A small
   learning-rate grid per method is chosen on a validation split and that choice is reported
   on the test split, over the seeds.
3. **Report**: ``docs/results.md`` (tables, gaps to the paper's claims, optimizer-state memory,
   routing dynamics, chosen learning rates, wall time, the command), the routing figure
   ``docs/results_routing.png``, and one JSON summary line on stdout.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere: the repository's molf_ds
    sys.path.insert(0, str(REPO))

from molf_ds.errors import MoLFError, OneLineArgumentParser  # noqa: E402

# Bump when the corpus, the world or the pretraining loop change: the cache key includes it.
CORPUS_VERSION = 1
CACHE_DIR = REPO / ".cache" / "study"
METHODS = ("fft", "lora", "adalora", "molf", "molf-efficient")


# ---- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainSettings:
    """The pretraining run; its JSON is the cache key (with `CORPUS_VERSION`)."""

    model: str = "tiny-qwen2"  # molf-train's preset: Qwen2, hidden 64, 4 layers, byte tokenizer
    shape: tuple[tuple[str, int], ...] = ()  # changes to the preset's shape (config fields)
    subjects: int = 48  # invented people; each has one object per relation (4 facts)
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 192  # tokens (bytes) per packed sample, whole lines only
    fact_share: float = 0.5  # share of lines drawn from fact sentences (the rest: SQL)
    lr: float = 3e-3
    warmup_steps: int = 50
    seed: int = 0


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
    sql_steps: int = 150
    batch_size: int = 16
    warmup_steps: int = 10
    eval_batch_size: int = 32
    # learning-rate grids: per method, the options of TrainConfig to try
    grids: dict = field(
        default_factory=lambda: {
            "fft": ({"lr": 3e-4}, {"lr": 1e-3}, {"lr": 3e-3}),
            "lora": ({"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}),
            "adalora": ({"lr": 1e-3}, {"lr": 3e-3}, {"lr": 1e-2}),
            "molf": (
                {"lr": 3e-4, "lora_lr": 1e-3},
                {"lr": 1e-3, "lora_lr": 3e-3},
                {"lr": 3e-3, "lora_lr": 1e-2},
            ),
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


# ---- the world of facts -------------------------------------------------------------------------
@dataclass(frozen=True)
class Relation:
    """A relation: CounterFact's relation id, phrasings (the first is the edit prompt, the others
    its paraphrases), and the objects it takes."""

    relation_id: str
    phrasings: tuple[str, ...]
    objects: tuple[str, ...]


RELATIONS = (
    Relation(
        "P103",  # CounterFact's "native language"
        (
            "The mother tongue of {} is",
            "The native language of {} is",
            "{} grew up speaking",
            "The first language of {} is",
            "At home, {} speaks",
        ),
        (
            "French",
            "English",
            "Spanish",
            "German",
            "Italian",
            "Dutch",
            "Polish",
            "Greek",
            "Swedish",
            "Finnish",
        ),
    ),
    Relation(
        "P106",  # "occupation"
        (
            "{} works as a",
            "The profession of {} is",
            "By trade, {} is a",
            "{} earns a living as a",
            "The job of {} is",
        ),
        (
            "pilot",
            "baker",
            "farmer",
            "painter",
            "doctor",
            "lawyer",
            "sailor",
            "teacher",
            "singer",
            "chemist",
        ),
    ),
    Relation(
        "P551",  # "residence"
        (
            "{} lives in the city of",
            "The home town of {} is",
            "{} resides in",
            "The city where {} lives is",
            "{} has a house in",
        ),
        ("Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Rome", "Dublin", "Madrid", "Berlin", "Seoul"),
    ),
    Relation(
        "P1303",  # "instrument"
        (
            "{} plays the",
            "The instrument of {} is the",
            "{} is known for playing the",
            "On stage, {} plays the",
            "The favourite instrument of {} is the",
        ),
        (
            "piano",
            "violin",
            "guitar",
            "flute",
            "cello",
            "drums",
            "harp",
            "trumpet",
            "banjo",
            "organ",
        ),
    ),
)
_ONSETS = (
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kl",
    "st",
    "th",
    "qu",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "th", "k", "s")


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: Relation
    obj: str


def _invented_name(rng: random.Random) -> str:
    def word(syllables: int) -> str:
        text = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
        return (text + rng.choice(_CODAS)).capitalize()

    return f"{word(2)} {word(rng.choice((1, 2)))}"


def make_facts(subjects: int, seed: int) -> list[Fact]:
    """``subjects`` invented people, each with one object per relation, a function of ``seed``."""
    rng = random.Random(f"study-facts:{seed}")
    names: list[str] = []
    while len(names) < subjects:
        name = _invented_name(rng)
        if name not in names:
            names.append(name)
    return [Fact(name, rel, rng.choice(rel.objects)) for name in names for rel in RELATIONS]


def fact_sentences(facts: list[Fact]) -> list[str]:
    """Every fact in every phrasing: the pretraining corpus's fact lines."""
    return [f"{p.format(f.subject)} {f.obj}." for f in facts for p in f.relation.phrasings]


def counterfact_record(case_id: int, fact: Fact, new: str) -> dict:
    """A record in CounterFact's schema asking to rewrite ``fact``'s object to ``new``."""
    rel = fact.relation
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": rel.phrasings[0],
            "relation_id": rel.relation_id,
            "subject": fact.subject,
            "target_new": {"str": new},
            "target_true": {"str": fact.obj},
        },
        "paraphrase_prompts": [p.format(fact.subject) for p in rel.phrasings[1:]],
    }


@dataclass(frozen=True)
class FactSplits:
    """CounterFact records: ``val`` and ``test`` edits (made together, scored apart);
    ``kept_val`` and ``kept_test``, halves of the facts left alone, as records whose "new"
    target is the *true* object (their efficacy is the share of untouched facts the model still
    knows: CounterFact's neighbourhood idea, on other subjects and relations); ``known``: every
    fact that way, with its paraphrases (the pretraining check)."""

    val: list[dict]
    test: list[dict]
    kept_val: list[dict]
    kept_test: list[dict]
    known: list[dict]


def fact_splits(facts: list[Fact], edits_per_split: int, seed: int) -> FactSplits:
    """Pick ``2 * edits_per_split`` facts to edit, each to another object of its relation."""
    rng = random.Random(f"study-edits:{seed}")
    wrong = {id(f): rng.choice([o for o in f.relation.objects if o != f.obj]) for f in facts}
    order = list(range(len(facts)))
    rng.shuffle(order)
    if 2 * edits_per_split >= len(facts):
        raise MoLFError(
            f"{2 * edits_per_split} edits need more than {len(facts)} facts: raise subjects"
        )
    edited = [facts[i] for i in order[: 2 * edits_per_split]]
    kept = [facts[i] for i in order[2 * edits_per_split :]]
    records = [counterfact_record(i, f, wrong[id(f)]) for i, f in enumerate(edited)]

    def as_known(start: int, fs: list[Fact], paraphrases: bool = True) -> list[dict]:
        recs = [counterfact_record(start + i, f, wrong[id(f)]) for i, f in enumerate(fs)]
        for r in recs:  # "new" = the true object: efficacy = share of facts known
            rw = r["requested_rewrite"]
            rw["target_new"], rw["target_true"] = rw["target_true"], rw["target_new"]
            if not paraphrases:  # (scored on the rewrite prompt only: half the cost)
                r["paraphrase_prompts"] = []
        return recs

    half = len(kept) // 2
    return FactSplits(
        val=records[:edits_per_split],
        test=records[edits_per_split:],
        kept_val=as_known(len(edited), kept[:half], paraphrases=False),
        kept_test=as_known(len(edited) + half, kept[half:], paraphrases=False),
        known=as_known(0, edited + kept),
    )


# ---- the SQL task's splits and the pretraining corpus ----------------------------------------
@dataclass(frozen=True)
class SqlSplits:
    train: list[dict]
    val: list[dict]
    test: list[dict]


def sql_splits(settings: StudySettings) -> SqlSplits:
    """The embedded generator's records (Gretel's schema), one fixed shuffle, three splits: the
    seeds vary the fine-tuning (initialisation, data order), never which questions are held out."""
    from molf_ds.train import tasks

    records = tasks.get("sql").load("generated", seed=0)
    random.Random("study-sql-split").shuffle(records)
    n_val, n_test = settings.sql_val, settings.sql_test
    needed = n_val + n_test + settings.sql_train
    if needed > len(records):
        raise MoLFError(f"the SQL splits need {needed} records, the generator gave {len(records)}")
    return SqlSplits(
        train=records[n_val + n_test : needed],
        val=records[:n_val],
        test=records[n_val : n_val + n_test],
    )


def sql_documents(held_out: list[dict]) -> list[str]:
    """The pretraining corpus's SQL: each question of the embedded task as a SQL comment above
    its statement (as SQL appears in code on the web), except the held-out records' statements,
    whose questions and answers the model never sees before the test."""
    from molf_ds.train import sql_task

    excluded = {sql_task.normalize_sql(r["sql"]) for r in held_out}
    documents = []
    for pool in sql_task.all_examples():
        for example in pool:
            statement = example["completion"].strip()
            if sql_task.normalize_sql(statement) not in excluded:
                question = example["prompt"].split("\nquestion: ")[1].removesuffix("\nsql:")
                documents.append(f"-- {question}\n{statement}")
    return documents


def packed_samples(lines_a: list[str], lines_b: list[str], share_a: float, seq_len: int, rng):
    """An endless stream of texts of whole lines (joined by newlines) of at most ``seq_len``
    bytes, each line drawn from ``lines_a`` with probability ``share_a``, else from ``lines_b``."""
    while True:
        text = ""
        while True:
            line = rng.choice(lines_a if rng.random() < share_a else lines_b)
            candidate = f"{text}\n{line}" if text else line
            if len(candidate.encode()) > seq_len:
                break
            text = candidate
        yield text or line[:seq_len]


# ---- stage 1: pretraining ----------------------------------------------------------------------
def pretrain(settings: PretrainSettings, fact_lines: list[str], sql_lines: list[str], probe=None):
    """``(tokenizer, model, info)``: molf-train's preset trained from scratch on the corpus by
    plain AdamW (warm-up, cosine). ``probe(step, model)`` is called every 250 steps, if given."""
    import torch

    tokenizer, model = new_model(settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(settings.warmup_steps, settings.steps)
    )
    rng = random.Random(f"study-pretrain:{settings.seed}")
    stream = packed_samples(fact_lines, sql_lines, settings.fact_share, settings.seq_len, rng)
    model.train()
    started, losses = time.perf_counter(), []
    for step in range(settings.steps):
        texts = [next(stream) for _ in range(settings.batch_size)]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if probe is not None and (step + 1) % 250 == 0:
            probe(step + 1, model, sum(losses[-50:]) / len(losses[-50:]))
            model.train()
    model.eval()
    info = {
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "wall_s": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    return tokenizer, model, info


def new_model(settings: PretrainSettings):
    """``(tokenizer, model)``: molf-train's preset (`recipe.load_model`), its shape changed by
    ``settings.shape``, initialised from ``settings.seed``."""
    import torch
    import transformers

    from molf_ds.train.recipe import load_model

    tokenizer, model = load_model(settings.model, seed=settings.seed)
    if not settings.shape:
        return tokenizer, model
    config = model.config.to_dict()
    config.update(dict(settings.shape))
    torch.manual_seed(settings.seed)
    config = type(model.config).from_dict(config)
    return tokenizer, transformers.AutoModelForCausalLM.from_config(config)


def _warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return factor


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


class Worker:
    """One process's fine-tuning state: the pretrained model (copied for every run), the
    tokenizer, the tokenized training sets, and the process group DeepSpeed needs (one rank)."""

    def __init__(self, model_dir: str, settings: StudySettings, data: dict[str, TaskData]):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from molf_ds.train import data as train_data
        from molf_ds.train import tasks

        _quiet_dependencies()
        torch.set_num_threads(1)  # see `main`: one thread per process
        _start_single_rank_group()
        self.settings = settings
        self.data = data
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.train_examples = {
            name: train_data.tokenize(tasks.get(name).to_examples(d.train), self.tokenizer, 256)
            for name, d in data.items()
        }

    def run(self, job: Job) -> dict:
        """Fine-tune a copy of the pretrained model as molf-train would, then evaluate it."""
        import copy

        import torch

        from molf_ds.train import recipe, tasks
        from molf_ds.train.config import TrainConfig
        from molf_ds.zero import fill_auto

        s = self.settings
        steps = s.fact_steps if job.task == "fact" else s.sql_steps
        options = s.grids[job.method][job.option]
        cfg = TrainConfig(
            mode=job.method,
            lora_ranks=s.ranks[job.method],
            max_steps=steps,
            warmup_steps=s.warmup_steps,
            micro_batch_size=s.batch_size,
            ds_config="zero0",
            seed=job.seed,
            **options,
        )
        method = recipe.METHODS[job.method]
        torch.manual_seed(job.seed)  # the LoRA factors' initialisation
        model = method.build_model(cfg, copy.deepcopy(self.base))
        ds_config = fill_auto(
            recipe.CONFIG_DIR / "zero0.json",
            micro_batch_size=cfg.micro_batch_size,
            gradient_accumulation_steps=1,
            world_size=1,
            gradient_clipping=cfg.gradient_clipping,
            bf16=False,
        )
        engine, optimizer = method.build_engine(cfg, model, ds_config, 0)
        started = time.perf_counter()
        losses, winners, state_bytes = self._train(job, cfg, method, model, engine, optimizer)
        train_s = time.perf_counter() - started
        model.eval()
        task = tasks.get(job.task)
        started = time.perf_counter()
        metrics = evaluate(task, model, self.tokenizer, self.data[job.task], s.eval_batch_size)
        result = {
            **asdict(job),
            "options": options,
            "metrics": metrics,
            "scores": task_scores(job.task, metrics),
            "final_loss": sum(losses[-5:]) / len(losses[-5:]),
            "train_s": train_s,
            "eval_s": time.perf_counter() - started,
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            # the most the method kept beside the weights at any step (AdaLoRA frees its
            # sensitivity averages once the ranks are final)
            "state_bytes": max(state_bytes),
        }
        if method.routed:
            result["routing"] = {
                "module_names": list(optimizer.plan.module_names),
                "expert_names": list(optimizer.plan.expert_names),
                "winners": winners,  # [step][module] -> index of the (top-1) winning expert
            }
        return result

    def _train(self, job, cfg, method, model, engine, optimizer):
        """molf-train's loop on one rank: forward, backward, the method's hook, step."""
        from molf_ds.train import data

        examples = self.train_examples[job.task]
        per_epoch = data.num_batches(examples, micro_batch_size=cfg.micro_batch_size)
        losses, winners, state_bytes = [], [], []
        engine.train()
        for step in range(cfg.max_steps):
            epoch, index = divmod(step, per_epoch)
            if index == 0:
                stream = data.batches(
                    examples,
                    micro_batch_size=cfg.micro_batch_size,
                    pad_id=self.tokenizer.pad_token_id,
                    seed=cfg.seed,
                    epoch=epoch,
                )
            batch = next(stream)
            loss = engine(**batch).loss
            engine.backward(loss)
            method.after_backward(model, engine, step)
            engine.step()
            losses.append(float(loss.detach()))
            state_bytes.append(optimizer_state_bytes(optimizer) + rank_allocator_bytes(model))
            if method.routed:
                winners.append(optimizer.last_routing.winners.float().argmax(dim=1).tolist())
        return losses, winners, state_bytes


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


def _start_single_rank_group() -> None:
    """A one-rank process group (gloo), as `deepspeed.initialize` needs, on a free port."""
    import socket

    from molf_ds.zero import init_distributed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    init_distributed()


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


def run_jobs(jobs: list[Job], model_dir: Path, settings, data, workers: int, log) -> list[dict]:
    """Every job's result, run by ``workers`` processes (spawned: a fresh interpreter each, one
    DeepSpeed process group each); the longest jobs (SQL) go first."""
    import multiprocessing as mp
    import queue

    context = mp.get_context("spawn")
    job_queue, results = context.Queue(), context.Queue()
    for job in sorted(jobs, key=lambda j: j.task != "sql"):
        job_queue.put(job)
    processes = [
        context.Process(
            target=_worker_main, args=(str(model_dir), settings, data, job_queue, results)
        )
        for _ in range(workers)
    ]
    for process in processes:
        job_queue.put(None)
        process.start()
    done: list[dict] = []
    try:
        while len(done) < len(jobs):
            try:
                result = results.get(timeout=10)
            except queue.Empty:
                if not any(p.is_alive() for p in processes):
                    raise MoLFError("every fine-tuning worker exited early") from None
                continue
            if "error" in result:
                raise RuntimeError(f"a fine-tuning run failed: {result['error']}")
            done.append(result)
            log(f"[{len(done)}/{len(jobs)}] {_describe(result)}")
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join()
    return done


def _describe(result: dict) -> str:
    scores = ", ".join(
        f"{split} {name} {value:.2f}"
        for split, values in result["scores"].items()
        for name, value in values.items()
    )
    return (
        f"{result['task']} {result['method']} {_options_label(result['options'])} seed "
        f"{result['seed']}: {scores} ({result['train_s']:.0f}+{result['eval_s']:.0f} s)"
    )


def _options_label(options: dict) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in options.items())


# ---- the metrics of each task --------------------------------------------------------------
# The numbers a run is compared by, per task; the first is the one the learning rate is chosen by.
TASK_METRICS = {"fact": ("score", "efficacy", "paraphrase", "kept"), "sql": ("exact_match",)}
# Evaluator options per task: the embedded SQL task's answers are at most 80 bytes (+ eos), and
# the tiny model's 256 positions must hold prompt and generation.
EVAL_OPTIONS = {"fact": {}, "sql": {"max_new_tokens": 96}}


def task_scores(task: str, metrics: dict[str, dict]) -> dict[str, dict[str, float]]:
    """``{"val": {metric: value}, "test": {...}}`` from the evaluators' outputs per split.

    fact: efficacy and paraphrase of the split's edits, ``kept`` (the share of untouched facts
    still known), and ``score``, CounterFact's summary: their harmonic mean, so an edit that
    generalises but erases other knowledge scores low (and so does one that changes nothing).
    """
    if task == "sql":
        return {split: {"exact_match": metrics[split]["exact_match"]} for split in ("val", "test")}
    out = {}
    for split in ("val", "test"):
        values = {
            "efficacy": metrics[split]["efficacy"],
            "paraphrase": metrics[split]["paraphrase"],
            "kept": metrics[f"kept_{split}"]["efficacy"],
        }
        out[split] = {"score": _harmonic_mean(values.values()), **values}
    return out


def _harmonic_mean(values) -> float:
    values = list(values)
    return 0.0 if min(values) <= 0 else len(values) / sum(1 / v for v in values)


# ---- stage 3: summary -------------------------------------------------------------------------
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def summarize(runs: list[dict], settings: StudySettings) -> dict:
    """Per task and method: the option chosen on validation (highest mean over seeds of the
    task's first metric; the first option on a tie) and its test metrics over the seeds."""
    summary: dict = {}
    for task, metrics in TASK_METRICS.items():
        summary[task] = {}
        for method in METHODS:
            mine = [r for r in runs if r["task"] == task and r["method"] == method]
            if not mine:
                continue
            options = settings.grids[method]
            val = []
            for index in range(len(options)):
                values = [r["scores"]["val"][metrics[0]] for r in mine if r["option"] == index]
                val.append(mean_std(values)[0])
            chosen = max(range(len(options)), key=lambda i: (val[i], -i))
            at_chosen = sorted((r for r in mine if r["option"] == chosen), key=lambda r: r["seed"])
            test = {m: mean_std([r["scores"]["test"][m] for r in at_chosen]) for m in metrics}
            summary[task][method] = {
                "chosen": chosen,
                "options": options[chosen],
                "val_by_option": val,
                "test": {m: {"mean": v[0], "std": v[1]} for m, v in test.items()},
                "test_by_seed": {m: [r["scores"]["test"][m] for r in at_chosen] for m in metrics},
                "seeds": [r["seed"] for r in at_chosen],
                "final_loss": mean_std([r["final_loss"] for r in at_chosen])[0],
                "train_s": mean_std([r["train_s"] for r in mine])[0],
                "eval_s": mean_std([r["eval_s"] for r in mine])[0],
            }
    return summary


def compare(summary: dict, task: str, metric: str, method: str, against: list[str]) -> dict:
    """``method``'s test mean minus the best of ``against`` (absolute and relative), with the
    standard error of that difference over the seeds."""
    rows = summary[task]
    best = max(against, key=lambda m: rows[m]["test"][metric]["mean"])
    a, b = rows[method]["test"][metric], rows[best]["test"][metric]
    n_a, n_b = len(rows[method]["seeds"]), len(rows[best]["seeds"])
    gap = a["mean"] - b["mean"]
    se = math.sqrt(a["std"] ** 2 / n_a + b["std"] ** 2 / n_b)
    return {
        "method": method,
        "reference": best,
        "value": a["mean"],
        "reference_value": b["mean"],
        "gap": gap,
        "relative_gap": gap / b["mean"] if b["mean"] else float("nan"),
        "se": se,
    }


def claims(summary: dict) -> dict:
    """The paper's two claims, checked on every metric of every task."""
    within, beats = [], []
    for task, metrics in TASK_METRICS.items():
        if not all(m in summary[task] for m in METHODS):
            continue
        for metric in metrics:
            row = compare(summary, task, metric, "molf", ["fft", "lora"])
            holds = row["gap"] >= -0.015 * row["reference_value"]  # (a 0 reference: gap >= 0)
            row.update(task=task, metric=metric, holds=holds)
            within.append(row)
            row = compare(summary, task, metric, "molf-efficient", ["adalora"])
            row.update(task=task, metric=metric, holds=row["gap"] > 0)
            beats.append(row)
    return {"molf_within_1.5pct_of_best_of_fft_lora": within, "molf_efficient_beats_adalora": beats}


def memory_table(runs: list[dict]) -> dict:
    """Per method: trainable parameters and the most optimizer state measured in any run."""
    table = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if mine:
            table[method] = {
                "trainable_parameters": max(r["trainable_parameters"] for r in mine),
                "state_bytes": max(r["state_bytes"] for r in mine),
            }
    return table


LAYER_TYPES = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def routing_curves(runs: list[dict], summary: dict) -> dict:
    """Per task and routed method, at the chosen option, averaged over the seeds: per step the
    share of modules of each layer type (and of each projection) whose update went to the
    *tracked* expert -- the FFT expert for MoLF, the largest LoRA expert for MoLF-Efficient
    (whose frozen base never wins)."""
    curves: dict = {}
    for task in summary:
        for method, row in summary[task].items():
            routed = [
                r["routing"]
                for r in runs
                if r["task"] == task
                and r["method"] == method
                and r["option"] == row["chosen"]
                and "routing" in r
            ]
            if not routed:
                continue
            names, experts = routed[0]["module_names"], routed[0]["expert_names"]
            tracked = 0 if method == "molf" else len(experts) - 1
            projections = [p for ps in LAYER_TYPES.values() for p in ps]
            curves.setdefault(task, {})[method] = {
                "tracked_expert": experts[tracked],
                "by_type": {
                    t: _share_curve(routed, _rows(names, ps), tracked)
                    for t, ps in LAYER_TYPES.items()
                },
                "by_projection": {
                    p: _share_curve(routed, _rows(names, (p,)), tracked) for p in projections
                },
            }
    return curves


def _rows(module_names: list[str], projections: tuple[str, ...]) -> list[int]:
    return [i for i, name in enumerate(module_names) if name.endswith(projections)]


def _share_curve(routed: list[dict], rows: list[int], expert: int) -> list[float]:
    """Per step, the share of (run, module in ``rows``) pairs whose winner was ``expert``."""
    steps = len(routed[0]["winners"])
    return [
        sum(r["winners"][step][i] == expert for r in routed for i in rows)
        / (len(routed) * len(rows))
        for step in range(steps)
    ]


def plot_routing(curves: dict, settings: StudySettings, path: Path) -> Path:
    """One panel per task and routed method: the share of modules taking the tracked expert's
    update per step, attention vs MLP (thick), each projection (thin)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tasks = [t for t in ("fact", "sql") if t in curves]
    methods = [m for m in ("molf", "molf-efficient") if any(m in curves[t] for t in tasks)]
    fig = Figure(figsize=(5.2 * len(methods), 3.4 * len(tasks)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(tasks), len(methods), squeeze=False, sharey=True)
    colours = {"attention": "tab:blue", "mlp": "tab:orange"}
    for row, task in enumerate(tasks):
        for col, method in enumerate(methods):
            ax = axes[row][col]
            curve = curves[task].get(method)
            if curve is None:
                ax.set_axis_off()
                continue
            for layer_type, projections in LAYER_TYPES.items():
                for p in projections:
                    y = curve["by_projection"][p]
                    ax.plot(range(1, len(y) + 1), y, color=colours[layer_type], lw=0.6, alpha=0.35)
                y = curve["by_type"][layer_type]
                label = f"{layer_type} ({'/'.join(p.split('_')[0] for p in projections)})"
                ax.plot(range(1, len(y) + 1), y, color=colours[layer_type], lw=2, label=label)
            ranks = settings.ranks[method]
            tracked = curve["tracked_expert"]
            what = "FFT expert" if tracked == "fft" else f"rank-{max(ranks)} LoRA expert"
            ax.set(
                title=f"{task}: {method}",
                xlabel="step",
                ylabel=f"share of modules updating\nthe {what}",
                ylim=(-0.03, 1.03),
            )
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path


def _early_late(series: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last fifth of the steps."""
    k = max(1, len(series) // 5)
    return sum(series[:k]) / k, sum(series[-k:]) / k


# ---- the report ------------------------------------------------------------------------------
METRIC_LABELS = {
    "score": "fact score",
    "efficacy": "fact efficacy",
    "paraphrase": "fact paraphrase",
    "kept": "facts kept",
    "exact_match": "SQL exact match",
}


def _pm(cell: dict) -> str:
    return f"{100 * cell['mean']:.1f} ± {100 * cell['std']:.1f}"


def write_report(report: dict, settings: StudySettings, out: Path) -> Path:
    """``out/results.md`` from the study's report (the same numbers as the JSON summary)."""
    summary, pre = report["summary"], report["pretraining"]
    lines = [
        "# Study: FFT vs LoRA vs AdaLoRA vs MoLF vs MoLF-Efficient at CPU scale",
        "",
        "Generated by `bench/study.py` (do not edit: rerun it). Command:",
        "",
        f"    {report['command']}",
        "",
        f"Wall time: **{report['wall_s'] / 60:.1f} min** in all (pretraining "
        f"{'cached, 0' if pre['cached'] else format(pre['wall_s'] / 60, '.1f')} min; "
        f"{len(report['runs'])} fine-tuning runs {report['finetune_wall_s'] / 60:.1f} min on "
        f"{report['workers']} worker processes) on a machine with {report['cpus']} CPU cores; "
        f"load average {report['load_start']:.1f} at the start and {report['load_end']:.1f} at the "
        "end (above the core count: other jobs shared the machine).",
        "",
        "## Set-up",
        "",
        f"- **Model**: molf-train's `{settings.pretrain.model}` preset (Qwen2: hidden 64, 4 "
        f"layers, {pre['parameters']:,} parameters, byte tokenizer), **pretrained** from "
        f"scratch for {settings.pretrain.steps} steps of {settings.pretrain.batch_size} packed "
        f"samples of ≤ {settings.pretrain.seq_len} bytes (AdamW, lr "
        f"{settings.pretrain.lr:g}, cosine) on a generated corpus: {pre['fact_lines']} fact "
        f"sentences ({pre['facts']} invented facts: {settings.pretrain.subjects} people × "
        f"{len(RELATIONS)} relations — native language, occupation, residence, instrument — each "
        f"in 5 phrasings) and {pre['sql_documents']} SQL documents (a question of the embedded "
        "SQL task as a `--` comment above its statement; the fine-tuning task's validation and "
        "test statements left out). Final pretraining loss "
        f"{pre['final_loss']:.3f} nats/byte.",
        f"- **Knowledge check** (the `fact` evaluator on every fact, true object vs the "
        f"counterfactual one): the pretrained model prefers the true object for "
        f"**{100 * pre['known']['efficacy']:.1f} %** of the facts on the edit prompt and "
        f"{100 * pre['known']['paraphrase']:.1f} % on the paraphrases (untrained model: "
        f"{100 * pre['known_untrained']['efficacy']:.1f} % / "
        f"{100 * pre['known_untrained']['paraphrase']:.1f} %). "
        + (
            "So the edits below overwrite facts the model knows."
            if pre["known"]["efficacy"] >= 0.9
            else "**Too low: the fact-editing results below do not mean much.**"
        ),
        f"- **fact** (counterfactual editing, CounterFact's schema): {2 * settings.fact_edits} "
        f"known facts are rewritten to another object of their relation in one fine-tuning run "
        f"({settings.fact_steps} steps of {settings.batch_size}, training on the edit prompt "
        f"only); {settings.fact_edits} of the edits are the validation split, "
        f"{settings.fact_edits} the test split. Metrics: efficacy (the new object beats the "
        "true one after the edit prompt), paraphrase (the same on the 4 other phrasings, never "
        "trained on), kept (the share of the untouched facts — other people, other relations — "
        "still known; half scored with validation, half with test) and score, their harmonic "
        "mean (CounterFact's summary; the learning rate is chosen by it).",
        f"- **sql** (the `sql` task's embedded generator, Gretel's schema): {settings.sql_train} "
        f"training records, {settings.sql_val} validation, {settings.sql_test} test (a fixed "
        f"split), {settings.sql_steps} steps of {settings.batch_size}; metric: exact match of "
        "the greedy generation (the `sql` evaluator).",
        "- **Methods**: built by molf-train's own table (`molf_ds.train.recipe.METHODS`: "
        "`build_model`, `build_engine`, `after_backward`) on a single-process DeepSpeed engine "
        "(`ds_config=zero0`, fp32, gradient clipping 1.0, warm-up "
        f"{settings.warmup_steps} steps then cosine), molf-train's loop. "
        + "; ".join(f"`{m}`: {_method_shape(m, settings)}" for m in METHODS)
        + ".",
        f"- **Learning rates**: a grid of {len(settings.grids['fft'])} per method, the option "
        "with the best mean over the seeds on the validation split is reported on the test "
        f"split; seeds {', '.join(map(str, settings.seeds))} (LoRA initialisation and data "
        "order; the splits are fixed).",
        "",
        "## Results (test split, % mean ± std over the seeds, at the learning rate chosen on "
        "validation)",
        "",
    ]
    lines += _results_table(report)
    lines += ["", "## The paper's claims at this scale", ""]
    lines += _claims_section(report["claims"])
    lines += ["", "## Optimizer-state memory (measured)", ""]
    lines += _memory_section(report["memory"])
    lines += ["", "## Routing dynamics", ""]
    lines += _routing_section(report, settings)
    lines += ["", "## Learning-rate grid (validation, mean over the seeds)", ""]
    lines += _grid_table(summary, settings)
    lines += ["", "## Discussion", ""]
    lines += _discussion(report, settings)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _method_shape(method: str, settings: StudySettings) -> str:
    ranks = settings.ranks[method]
    return {
        "fft": "every weight, AdamW",
        "lora": f"PEFT LoRA r={ranks[0]} (rsLoRA, alpha 16) on q/k/v/o/gate/up/down, AdamW",
        "adalora": f"PEFT AdaLoRA from r={ranks[0]} to an average of {max(1, ranks[0] // 2)}, "
        "AdamW, ranks re-allocated after each backward",
        "molf": f"`molf_ds.wrap` FFT expert + LoRA r={ranks[0]}, `MoLFAdamW` top-1 (EPD)",
        "molf-efficient": "`molf_ds.wrap` base frozen, LoRA experts r="
        + "+".join(map(str, ranks))
        + ", `MoLFAdamW` top-1 (EPD)",
    }[method]


def _results_table(report: dict) -> list[str]:
    summary, baseline = report["summary"], report["pretrained_scores"]
    columns = [(t, m) for t, ms in TASK_METRICS.items() for m in ms if t in summary]
    head = "| method | learning rate (chosen) | " + " | ".join(METRIC_LABELS[m] for _, m in columns)
    lines = [head + " |", "|---" * (len(columns) + 2) + "|"]
    cells = [f"{100 * baseline[t][m]:.1f}" for t, m in columns]
    lines.append("| pretrained, not fine-tuned | — | " + " | ".join(cells) + " |")
    for method in METHODS:
        lrs = {
            t: _options_label(summary[t][method]["options"])
            for t in summary
            if method in summary[t]
        }
        if not lrs:
            continue
        lr_text = "; ".join(f"{t}: {v}" for t, v in lrs.items())
        cells = [
            _pm(summary[t][method]["test"][m]) if method in summary[t] else "—" for t, m in columns
        ]
        lines.append(f"| {method} | {lr_text} | " + " | ".join(cells) + " |")
    return lines


def _relative(row: dict) -> str:
    relative = row["relative_gap"]
    return "—" if math.isnan(relative) else f"{100 * relative:+.1f} %"


def _claims_section(checked: dict) -> list[str]:
    lines = [
        "**Claim 1: MoLF stays within 1.5 % of the better of FFT and LoRA on every task.** "
        "Gap = MoLF − the better of the two (test means); relative = gap / the better's mean; "
        "SE = standard error of the gap over the seeds.",
        "",
        "| task | metric | better of FFT, LoRA | MoLF | gap (points) | relative | SE (points) "
        "| within 1.5 %? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in checked["molf_within_1.5pct_of_best_of_fft_lora"]:
        lines.append(_claim_row(row, "yes" if row["holds"] else "**no**"))
    lines += [
        "",
        "**Claim 2: MoLF-Efficient beats AdaLoRA (by up to 20 % on factual knowledge).**",
        "",
        "| task | metric | AdaLoRA | MoLF-Efficient | gap (points) | relative | SE (points) "
        "| beats AdaLoRA? |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in checked["molf_efficient_beats_adalora"]:
        lines.append(_claim_row(row, "yes" if row["holds"] else "**no**"))
    return lines


def _claim_row(row: dict, verdict: str) -> str:
    reference = f"{row['reference']} {100 * row['reference_value']:.1f}"
    relative_text = _relative(row)
    resolved = abs(row["gap"]) >= 2 * row["se"] if row["se"] > 0 else True
    return (
        f"| {row['task']} | {METRIC_LABELS[row['metric']]} | {reference} | "
        f"{100 * row['value']:.1f} | {100 * row['gap']:+.1f} | {relative_text} | "
        f"{100 * row['se']:.1f}{'' if resolved else ' (gap < 2 SE)'} | {verdict} |"
    )


def _memory_section(memory: dict) -> list[str]:
    lines = [
        "Bytes of every tensor the optimizer keeps (AdamW's two moments and step counts; "
        "`MoLFAdamW` keeps moments for *every* expert, winner or not), plus AdaLoRA's "
        "sensitivity averages held by PEFT's rank allocator, at the step where the sum was "
        "largest. fp32 throughout.",
        "",
        "| method | trainable parameters | optimizer state | × LoRA | × FFT |",
        "|---|---|---|---|---|",
    ]
    lora, fft = memory["lora"]["state_bytes"], memory["fft"]["state_bytes"]
    for method, row in memory.items():
        b = row["state_bytes"]
        lines.append(
            f"| {method} | {row['trainable_parameters']:,} | {b:,} B ({b / 2**20:.2f} MiB) | "
            f"{b / lora:.2f} | {b / fft:.2f} |"
        )
    return lines


def _routing_section(report: dict, settings: StudySettings) -> list[str]:
    curves = report["routing"]
    lines = [
        f"![routing]({report['routing_figure']})",
        "",
        "Share of routed modules whose update went to the tracked expert — the FFT expert for "
        "MoLF, the largest LoRA expert for MoLF-Efficient (its frozen base is no candidate) — "
        "per step, at the chosen learning rate, averaged over the seeds; thick: attention "
        "(q/k/v/o) and MLP (gate/up/down), thin: each projection. First and last fifth of the "
        "steps:",
        "",
        "| task | method | tracked expert | attention: first → last | MLP: first → last |",
        "|---|---|---|---|---|",
    ]
    for task, methods in curves.items():
        for method, curve in methods.items():
            cells = []
            for layer_type in LAYER_TYPES:
                early, late = _early_late(curve["by_type"][layer_type])
                cells.append(f"{100 * early:.0f} % → {100 * late:.0f} %")
            lines.append(
                f"| {task} | {method} | {curve['tracked_expert']} | " + " | ".join(cells) + " |"
            )
    return lines


def _grid_table(summary: dict, settings: StudySettings) -> list[str]:
    lines = [
        "| task (metric) | method | "
        + " | ".join(f"option {i + 1}" for i in range(max(len(g) for g in settings.grids.values())))
        + " |",
        "|---|---|" + "---|" * max(len(g) for g in settings.grids.values()),
    ]
    for task, rows in summary.items():
        for method, row in rows.items():
            cells = []
            for i, options in enumerate(settings.grids[method]):
                text = f"{_options_label(options)}: {100 * row['val_by_option'][i]:.1f}"
                cells.append(f"**{text}**" if i == row["chosen"] else text)
            metric = METRIC_LABELS[TASK_METRICS[task][0]]
            lines.append(f"| {task} ({metric}) | {method} | " + " | ".join(cells) + " |")
    return lines


def _discussion(report: dict, settings: StudySettings) -> list[str]:
    """What the numbers say, worded from them (so a rerun's text matches its numbers), then
    what limits them."""
    checked, memory, curves = report["claims"], report["memory"], report["routing"]
    within = checked["molf_within_1.5pct_of_best_of_fft_lora"]
    beats = checked["molf_efficient_beats_adalora"]
    lines = []
    failed = [r for r in within if not r["holds"]]
    noisy = [r for r in failed if abs(r["gap"]) < 2 * r["se"]]
    lines.append(
        f"- **Claim 1** holds on {len(within) - len(failed)} of {len(within)} task metrics. "
        + (
            "Where it fails: "
            + "; ".join(
                f"{r['task']} {METRIC_LABELS[r['metric']]} ({100 * r['gap']:+.1f} points vs "
                f"{r['reference']}, {_relative(r)})"
                for r in failed
            )
            + ". "
            + (
                f"{len(noisy)} of these gaps are smaller than twice their standard error over "
                f"{len(settings.seeds)} seeds, i.e. not resolved by this study."
                if noisy
                else ""
            )
            if failed
            else "Every gap is above −1.5 %."
        )
    )
    won = [r for r in beats if r["holds"]]
    best = max(beats, key=lambda r: r["relative_gap"] if r["reference_value"] else -1, default=None)
    lines.append(
        f"- **Claim 2**: MoLF-Efficient beats AdaLoRA on {len(won)} of {len(beats)} task "
        "metrics"
        + (
            f"; the largest relative margin is {_relative(best)} "
            f"({best['task']} {METRIC_LABELS[best['metric']]}, "
            f"{100 * best['reference_value']:.1f} → {100 * best['value']:.1f})."
            if best
            else "."
        )
        + " AdaLoRA here is PEFT's, with a schedule squeezed into a few dozen steps "
        "(warm-up, rank budget, final phase: `recipe._adalora_model`); that is a real handicap "
        "at this length and part of any margin."
    )
    ratio = memory["molf"]["state_bytes"] / memory["fft"]["state_bytes"]
    lines.append(
        f"- **Memory**: MoLF keeps {ratio:.2f}× "
        f"the optimizer state of FFT (moments of the FFT expert *and* the LoRA expert, every "
        "step: the router needs both), MoLF-Efficient "
        f"{memory['molf-efficient']['state_bytes'] / memory['lora']['state_bytes']:.2f}× that "
        f"of LoRA r={settings.ranks['lora'][0]} (its experts' ranks add up to "
        f"{sum(settings.ranks['molf-efficient'])}), AdaLoRA "
        f"{memory['adalora']['state_bytes'] / memory['lora']['state_bytes']:.2f}× LoRA's "
        "(its singular values and sensitivity averages). On this 64-wide model the "
        "embeddings and norms (trained by FFT and MoLF) are a large share; on a real model the "
        "FFT moments dominate and MoLF ≈ FFT + LoRA."
    )
    for task, methods in curves.items():
        curve = methods.get("molf")
        if curve is None:
            continue
        parts = []
        for layer_type in LAYER_TYPES:
            early, late = _early_late(curve["by_type"][layer_type])
            parts.append(f"{layer_type} {100 * early:.0f} % → {100 * late:.0f} %")
        lines.append(
            f"- **Routing, {task}**: MoLF's share of modules taking the FFT update, first → last "
            f"fifth of the steps: {', '.join(parts)}."
        )
    lines += [
        "- **Scale**: a 0.2M-parameter model with 64-wide layers, where a rank-8 LoRA is 1/8 "
        "of the width (on a 0.5B model, r=64 of 896 is 1/14 and the FFT expert has ~1000× "
        "the parameters), a byte tokenizer, tens to a few hundred fine-tuning steps, "
        f"{len(settings.seeds)} seeds and test sets of {2 * settings.fact_edits // 2} edits "
        f"and {settings.sql_test} questions: one edit is "
        f"{100 / settings.fact_edits:.1f} points of efficacy and one question "
        f"{100 / settings.sql_test:.1f} points of exact match, so gaps of a few points are "
        "within the noise, and the paper's 1.5 % threshold is below this study's resolution.",
        "- **What transfers and what does not**: the claims are about relative quality at "
        "the scale of the paper's models and data; this study checks that the machinery "
        "(routing in the optimizer, PEFT baselines, one harness) produces them the same way, "
        "and reports what happens on a tiny model. A claim that fails here may hold at scale "
        "and the reverse; what the study does show is measured directly: the memory cost of "
        "routing (every expert's moments), and how the router splits the work between FFT "
        "and LoRA as training goes.",
    ]
    return lines


# ---- the command ---------------------------------------------------------------------------------
def pretrained_model(
    settings: StudySettings, sql: SqlSplits, facts_known: list[dict], cache: Path, log
):
    """``(model directory, info)``: the cached pretrained model for these settings, or a new one
    (trained, checked, saved). ``info`` holds the corpus sizes, the loss and the knowledge check."""
    import shutil

    import torch

    from molf_ds.train import tasks

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
    tokenizer, model, info = pretrain(p, fact_lines, sql_lines=documents)
    fact_task = tasks.get("fact")
    _, untrained = new_model(p)
    with torch.no_grad():
        info["known"] = _scores_only(
            fact_task.evaluate(model, tokenizer, facts_known, batch_size=64)
        )
        info["known_untrained"] = _scores_only(
            fact_task.evaluate(untrained.eval(), tokenizer, facts_known, batch_size=64)
        )
    info.update(facts=len(facts), fact_lines=len(fact_lines), sql_documents=len(documents))
    partial = cache / f"{key}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
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


def parse_args(argv: list[str] | None):
    parser = OneLineArgumentParser(
        prog="bench/study.py",
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
    started = time.perf_counter()
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
        sql = sql_splits(settings)
        model_dir, pre = pretrained_model(settings, sql, facts.known, Path(args.cache), log)
    except MoLFError as err:
        print(f"bench/study.py: error: {err}", file=sys.stderr)
        return 1
    log(
        f"knowledge check: true object preferred for {100 * pre['known']['efficacy']:.1f} % of "
        f"facts (paraphrases {100 * pre['known']['paraphrase']:.1f} %)"
    )
    data = task_data(facts, sql)
    baseline = pretrained_scores(model_dir, data, settings)
    jobs = [
        Job(task, method, option, seed)
        for task in TASK_METRICS
        for method in METHODS
        for option in range(len(settings.grids[method]))
        for seed in settings.seeds
    ]
    log(f"{len(jobs)} fine-tuning runs on {workers} processes")
    finetune_started = time.perf_counter()
    runs = run_jobs(jobs, model_dir, settings, data, workers, log)
    finetune_wall = time.perf_counter() - finetune_started
    summary = summarize(runs, settings)
    out = Path(args.out)
    curves = routing_curves(runs, summary)
    figure = plot_routing(curves, settings, out / "results_routing.png")
    report = {
        "command": " ".join(
            ["python bench/study.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "wall_s": time.perf_counter() - started,
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
    path = write_report(report, settings, out)
    log(f"wrote {path} and {figure}")
    print(json.dumps(_json_summary(report, path, figure)))
    return 0


def _json_summary(report: dict, path: Path, figure: Path) -> dict:
    """The stdout line: everything results.md states, without the per-run and per-step data."""
    return {
        "study": "molf_vs_baselines",
        "command": report["command"],
        "results_md": str(path),
        "routing_figure": str(figure),
        "wall_s": round(report["wall_s"], 1),
        "finetune_wall_s": round(report["finetune_wall_s"], 1),
        "runs": len(report["runs"]),
        "pretraining": report["pretraining"],
        "pretrained_scores": report["pretrained_scores"],
        "results": {
            task: {
                method: {
                    "options": row["options"],
                    "test": row["test"],
                    "val_by_option": row["val_by_option"],
                }
                for method, row in rows.items()
            }
            for task, rows in report["summary"].items()
        },
        "claims": report["claims"],
        "memory": report["memory"],
    }


if __name__ == "__main__":
    sys.exit(main())
