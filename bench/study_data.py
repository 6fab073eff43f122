"""The study's data (`bench/study.py`): a world of invented facts, CounterFact records that edit
them, the SQL task's fixed splits, and the pretraining corpus made of both.

Everything is a pure function of its arguments (seeded ``random.Random`` instances, no global
state), so a rerun builds the same corpus, and the pretrained model's cache key can hash it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from molf_ds.errors import MoLFError


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


def sql_splits(n_train: int, n_val: int, n_test: int) -> SqlSplits:
    """The embedded generator's records (Gretel's schema), one fixed shuffle, three splits: the
    seeds vary the fine-tuning (initialisation, data order), never which questions are held out."""
    from molf_ds.train import tasks

    records = tasks.get("sql").load("generated", seed=0)
    random.Random("study-sql-split").shuffle(records)
    needed = n_val + n_test + n_train
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
    for pool in sql_task.all_records():
        for record in pool:
            if sql_task.normalize_sql(record["sql"]) not in excluded:
                documents.append(f"-- {record['sql_prompt']}\n{record['sql']}")
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
