"""An embedded text-to-SQL task, generated from a seed, so training needs no download.

Each record names one table's schema and asks a question whose answer is one short SQL
statement (at most 80 characters). Five tables, thirteen query templates with two phrasings
each, and their value vocabularies give 4440 distinct questions: a tiny model on a CPU starts
to get the easy templates right within a few hundred steps, and exact match on held-out
questions tests whether it composes tables, columns and values seen in other combinations.
Records are in the schema of Gretel's ``gretelai/synthetic_text_to_sql`` (the fields
`molf_ds.train.tasks.sql` reads), so generated and downloaded data share one pipeline; that
module makes the prompts (with the byte tokenizer, 130-210 tokens for prompt, completion and
``</s>``)::

    {"sql_context": "employees(id, name, dept, salary)",
     "sql_prompt": "how many employees work in sales?",
     "sql": "SELECT COUNT(*) FROM employees WHERE dept = 'sales';"}
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

DEFAULT_NUM_EXAMPLES = 3000


@dataclass(frozen=True)
class _Table:
    """One table and the words questions use for it.

    ``cat_phrase`` places a category value in a question ("work in {v}"), ``gt``/``lt`` a
    number ("earn more than {n}"), ``top``/``bottom`` the superlatives that order by ``num``.
    """

    name: str
    columns: tuple[str, ...]
    noun: str
    cat: str
    cat_noun: str
    cat_values: tuple[str, ...]
    cat_phrase: str
    num: str
    num_noun: str
    thresholds: tuple[int, ...]
    gt: str
    lt: str
    top: str
    bottom: str

    def schema(self) -> str:
        return f"{self.name}({', '.join(self.columns)})"


TABLES: tuple[_Table, ...] = (
    _Table(
        "employees",
        ("id", "name", "dept", "salary"),
        "employees",
        "dept",
        "department",
        ("sales", "hr", "it", "legal", "finance", "support", "ops", "design"),
        "work in {v}",
        "salary",
        "salary",
        tuple(range(30000, 130000, 10000)),
        "earn more than {n}",
        "earn less than {n}",
        "best paid",
        "worst paid",
    ),
    _Table(
        "products",
        ("id", "name", "category", "price"),
        "products",
        "category",
        "category",
        ("books", "toys", "games", "tools", "food", "music", "home", "pets"),
        "are in {v}",
        "price",
        "price",
        (5, 10, 20, 30, 50, 75, 100, 200, 500, 1000),
        "cost more than {n}",
        "cost less than {n}",
        "most expensive",
        "cheapest",
    ),
    _Table(
        "students",
        ("id", "name", "major", "age"),
        "students",
        "major",
        "major",
        ("math", "physics", "art", "history", "biology", "music", "law", "chemistry"),
        "study {v}",
        "age",
        "age",
        tuple(range(18, 28)),
        "are older than {n}",
        "are younger than {n}",
        "oldest",
        "youngest",
    ),
    _Table(
        "cities",
        ("id", "name", "country", "pop"),
        "cities",
        "country",
        "country",
        ("france", "japan", "brazil", "kenya", "canada", "india", "spain", "egypt"),
        "are in {v}",
        "pop",
        "population",
        (10000, 20000, 50000, 100000, 200000, 500000, 1000000, 2000000, 5000000, 10000000),
        "have more than {n} people",
        "have fewer than {n} people",
        "largest",
        "smallest",
    ),
    _Table(
        "books",
        ("id", "title", "genre", "pages"),
        "books",
        "genre",
        "genre",
        ("fantasy", "poetry", "horror", "drama", "science", "history", "romance", "travel"),
        "are {v} books",
        "pages",
        "page count",
        (100, 150, 200, 250, 300, 400, 500, 600, 800, 1000),
        "have more than {n} pages",
        "have fewer than {n} pages",
        "longest",
        "shortest",
    ),
)

_AGGREGATES = (("AVG", "average"), ("MAX", "highest"), ("MIN", "lowest"), ("SUM", "total"))
_LIMITS = (2, 3, 4, 5, 10)

# A template turns a table into (questions, sql) items, one per choice of values; each item
# lists the question's phrasings, all answered by the same SQL.
_Items = Iterator[tuple[tuple[str, ...], str]]


def _label(t: _Table) -> str:
    """The column questions ask for by name (``title`` for books, ``name`` elsewhere)."""
    return t.columns[1]


def _comparisons(t: _Table) -> Iterator[tuple[str, str]]:
    """Each threshold as (question phrase, SQL condition), both directions."""
    for n in t.thresholds:
        yield t.gt.format(n=n), f"{t.num} > {n}"
        yield t.lt.format(n=n), f"{t.num} < {n}"


def _count_all(t: _Table) -> _Items:
    qs = (f"how many {t.noun} are there?", f"count the {t.noun}.")
    yield qs, f"SELECT COUNT(*) FROM {t.name};"


def _count_cat(t: _Table) -> _Items:
    for v in t.cat_values:
        cp = t.cat_phrase.format(v=v)
        qs = (f"how many {t.noun} {cp}?", f"count the {t.noun} that {cp}.")
        yield qs, f"SELECT COUNT(*) FROM {t.name} WHERE {t.cat} = '{v}';"


def _list_cat(t: _Table) -> _Items:
    for v in t.cat_values:
        cp = t.cat_phrase.format(v=v)
        qs = (f"which {t.noun} {cp}?", f"list the {_label(t)}s of {t.noun} that {cp}.")
        yield qs, f"SELECT {_label(t)} FROM {t.name} WHERE {t.cat} = '{v}';"


def _list_num(t: _Table) -> _Items:
    for phrase, cond in _comparisons(t):
        qs = (f"which {t.noun} {phrase}?", f"list the {_label(t)}s of {t.noun} that {phrase}.")
        yield qs, f"SELECT {_label(t)} FROM {t.name} WHERE {cond};"


def _count_num(t: _Table) -> _Items:
    for phrase, cond in _comparisons(t):
        qs = (f"how many {t.noun} {phrase}?", f"count the {t.noun} that {phrase}.")
        yield qs, f"SELECT COUNT(*) FROM {t.name} WHERE {cond};"


def _list_cat_num(t: _Table) -> _Items:
    for v in t.cat_values:
        cp = t.cat_phrase.format(v=v)
        for phrase, cond in _comparisons(t):
            qs = (
                f"which {t.noun} {cp} and {phrase}?",
                f"list the {_label(t)}s of {t.noun} that {cp} and {phrase}.",
            )
            yield qs, f"SELECT {_label(t)} FROM {t.name} WHERE {t.cat} = '{v}' AND {cond};"


def _count_cat_num(t: _Table) -> _Items:
    for v in t.cat_values:
        cp = t.cat_phrase.format(v=v)
        for phrase, cond in _comparisons(t):
            qs = (
                f"how many {t.noun} {cp} and {phrase}?",
                f"count the {t.noun} that {cp} and {phrase}.",
            )
            yield qs, f"SELECT COUNT(*) FROM {t.name} WHERE {t.cat} = '{v}' AND {cond};"


def _superlatives(t: _Table) -> tuple[tuple[str, str], ...]:
    return (t.top, "DESC"), (t.bottom, "ASC")


def _top_k(t: _Table) -> _Items:
    for k in _LIMITS:
        for word, order in _superlatives(t):
            qs = (f"what are the {k} {word} {t.noun}?", f"list the {k} {word} {t.noun}.")
            yield qs, f"SELECT {_label(t)} FROM {t.name} ORDER BY {t.num} {order} LIMIT {k};"


def _top_one_cat(t: _Table) -> _Items:
    for v in t.cat_values:
        cp = t.cat_phrase.format(v=v)
        for word, order in _superlatives(t):
            qs = (
                f"which is the {word} of the {t.noun} that {cp}?",
                f"name the {word} of the {t.noun} that {cp}.",
            )
            where = f"WHERE {t.cat} = '{v}'"
            yield qs, f"SELECT {_label(t)} FROM {t.name} {where} ORDER BY {t.num} {order} LIMIT 1;"


def _agg_all(t: _Table) -> _Items:
    for fn, word in _AGGREGATES:
        qs = (
            f"what is the {word} {t.num_noun} of all {t.noun}?",
            f"give the {word} {t.num_noun} over all {t.noun}.",
        )
        yield qs, f"SELECT {fn}({t.num}) FROM {t.name};"


def _agg_cat(t: _Table) -> _Items:
    for fn, word in _AGGREGATES:
        for v in t.cat_values:
            cp = t.cat_phrase.format(v=v)
            qs = (
                f"what is the {word} {t.num_noun} of {t.noun} that {cp}?",
                f"give the {word} {t.num_noun} of {t.noun} that {cp}.",
            )
            yield qs, f"SELECT {fn}({t.num}) FROM {t.name} WHERE {t.cat} = '{v}';"


def _agg_group(t: _Table) -> _Items:
    for fn, word in _AGGREGATES:
        qs = (
            f"what is the {word} {t.num_noun} for each {t.cat_noun}?",
            f"show the {word} {t.num_noun} per {t.cat_noun}.",
        )
        yield qs, f"SELECT {t.cat}, {fn}({t.num}) FROM {t.name} GROUP BY {t.cat};"


def _count_group(t: _Table) -> _Items:
    qs = (
        f"how many {t.noun} are there per {t.cat_noun}?",
        f"count the {t.noun} in each {t.cat_noun}.",
    )
    yield qs, f"SELECT {t.cat}, COUNT(*) FROM {t.name} GROUP BY {t.cat};"


TEMPLATES: tuple[Callable[[_Table], _Items], ...] = (
    _count_all,
    _count_cat,
    _list_cat,
    _list_num,
    _count_num,
    _list_cat_num,
    _count_cat_num,
    _top_k,
    _top_one_cat,
    _agg_all,
    _agg_cat,
    _agg_group,
    _count_group,
)


def _record(t: _Table, question: str, sql: str) -> dict[str, str]:
    """One question as a record in Gretel's schema."""
    return {"sql_context": t.schema(), "sql_prompt": question, "sql": sql}


def all_records() -> list[list[dict[str, str]]]:
    """Every distinct record, one list per (table, template) pair, in a fixed order."""
    pools = []
    for t in TABLES:
        for make in TEMPLATES:
            pools.append([_record(t, q, sql) for qs, sql in make(t) for q in qs])
    return pools


def generate(num_examples: int = DEFAULT_NUM_EXAMPLES, seed: int = 0) -> list[dict[str, str]]:
    """``num_examples`` distinct records (``sql_context``, ``sql_prompt``, ``sql``), a pure
    function of ``seed``.

    Draws a (table, template) pair uniformly, then an unused record of it, so rare templates
    (one ``GROUP BY`` question per table) are as frequent as common ones until used up, and no
    question repeats: a held-out split then holds questions the model has never seen.
    """
    pools = all_records()
    capacity = sum(map(len, pools))
    if not 0 <= num_examples <= capacity:
        raise ValueError(
            f"num_examples={num_examples} is outside the SQL task's range; use 0..{capacity}"
        )
    rng = random.Random(seed)
    for pool in pools:
        rng.shuffle(pool)
    out: list[dict[str, str]] = []
    while len(out) < num_examples:
        pools = [pool for pool in pools if pool]
        out.append(rng.choice(pools).pop())
    return out


_LITERAL = re.compile(r"'(?:[^']|'')*'")


def _normalize_code(code: str) -> str:
    """Lower-case and canonical spacing for SQL outside string literals."""
    code = re.sub(r"\s+", " ", code.lower())
    code = re.sub(r"\s*(<=|>=|<>|!=|=|<|>)\s*", r" \1 ", code)
    code = re.sub(r"\s*\(\s*", "(", code)
    code = re.sub(r"\s*\)", ")", code)
    return re.sub(r"\s*,\s*", ", ", code)


def normalize_sql(s: str) -> str:
    """Canonical form for comparing SQL: keywords/identifiers case-folded, spacing unified.

    String literals keep their case and spaces (``'Sales'`` is not ``'sales'``); elsewhere
    whitespace collapses, spacing around parentheses, commas and comparisons is unified, and a
    trailing ``;`` is dropped, so formatting alone never fails an exact match.
    """
    parts, last = [], 0
    for m in _LITERAL.finditer(s):
        parts.append(_normalize_code(s[last : m.start()]))
        parts.append(m.group())
        last = m.end()
    parts.append(_normalize_code(s[last:]))
    return "".join(parts).strip().rstrip(";").strip()


def _first_statement(s: str) -> str:
    """``s`` up to its first ``;`` outside a string literal (generation may run past it)."""
    pos, in_literal = 0, False
    for pos, ch in enumerate(s):
        if ch == "'":
            in_literal = not in_literal
        elif ch == ";" and not in_literal:
            return s[:pos]
    return s


def exact_match(prediction: str, gold: str) -> bool:
    """Whether ``prediction``'s first statement equals ``gold`` after `normalize_sql`.

    Only the first statement counts because a model that has not yet learned to stop emits
    text after the ``;``; what it wrote up to there is the answer.
    """
    return normalize_sql(_first_statement(prediction)) == normalize_sql(_first_statement(gold))
