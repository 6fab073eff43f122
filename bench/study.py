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

import argparse
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
    subjects: int = 48  # invented people; each has one object per relation (4 facts)
    steps: int = 1500
    batch_size: int = 16
    seq_len: int = 160  # tokens (bytes) per packed sample, whole lines only
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
    sql_val=8,
    sql_test=8,
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
        ("French", "English", "Spanish", "German", "Italian", "Dutch", "Polish", "Greek",
         "Swedish", "Finnish"),
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
        ("pilot", "baker", "farmer", "painter", "doctor", "lawyer", "sailor", "teacher",
         "singer", "chemist"),
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
        ("Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Rome", "Dublin", "Madrid", "Berlin",
         "Seoul"),
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
        ("piano", "violin", "guitar", "flute", "cello", "drums", "harp", "trumpet", "banjo",
         "organ"),
    ),
)
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kl", "st", "th", "qu")
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
    """CounterFact records: ``val`` and ``test`` edits (trained together), and ``kept``, the
    untouched facts as records whose "new" target is the *true* object (efficacy on them = the
    share of untouched facts the model still knows), and ``known``: every fact that way."""

    val: list[dict]
    test: list[dict]
    kept: list[dict]
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

    def as_known(start: int, fs: list[Fact]) -> list[dict]:
        recs = [counterfact_record(start + i, f, wrong[id(f)]) for i, f in enumerate(fs)]
        for r in recs:  # "new" = the true object: efficacy = share of facts known
            rw = r["requested_rewrite"]
            rw["target_new"], rw["target_true"] = rw["target_true"], rw["target_new"]
        return recs

    return FactSplits(
        val=records[:edits_per_split],
        test=records[edits_per_split:],
        kept=as_known(len(edited), kept),
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


def sql_statements(held_out: list[dict]) -> list[str]:
    """Every SQL statement of the embedded task's language except the held-out records' answers:
    the pretraining corpus's SQL lines (the statements alone, no questions)."""
    from molf_ds.train import sql_task

    excluded = {sql_task.normalize_sql(r["sql"]) for r in held_out}
    statements = sorted({ex["completion"].strip() for pool in sql_task.all_examples() for ex in pool})
    return [s for s in statements if sql_task.normalize_sql(s) not in excluded]


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

    from molf_ds.train.recipe import load_model

    tokenizer, model = load_model(settings.model, seed=settings.seed)
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
        losses.append(float(loss))
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
        # the val and test edits are made together (one batch of edits), scored apart; "kept"
        # is every fact left alone (how much of the pretrained knowledge the edit keeps)
        "fact": TaskData(
            train=facts.val + facts.test,
            evals={"val": facts.val, "test": facts.test, "kept": facts.kept},
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
        metrics = {
            split: task.evaluate(model, self.tokenizer, records, batch_size=s.eval_batch_size)
            for split, records in self.data[job.task].evals.items()
        }
        result = {
            **asdict(job),
            "options": options,
            "metrics": metrics,
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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # (read when deepspeed is first imported)
