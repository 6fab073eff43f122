"""Data pipeline: SQL task, byte tokenizer, record loading, tokenizing and per-rank batches."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from molf_ds.train import sql_task, tasks
from molf_ds.train.data import (
    IGNORE_INDEX,
    DataError,
    batches,
    num_batches,
    split_records,
    tokenize,
)
from molf_ds.train.tokenizer import VOCAB_SIZE, byte_tokenizer

RECORDS = [{"prompt": f"q{i}?", "completion": f" a{i};"} for i in range(20)]


pytestmark = pytest.mark.usefixtures("datasets_cache")


def sql_examples(num_examples: int, seed: int) -> list[dict]:
    """The embedded SQL task's prompt/completion examples, as molf-train trains on them."""
    return tasks.get("sql").to_examples(sql_task.generate(num_examples, seed))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------- SQL task


def test_sql_generation_is_a_function_of_the_seed():
    a, b = sql_task.generate(500, seed=0), sql_task.generate(500, seed=0)
    assert a == b
    assert a != sql_task.generate(500, seed=1)


def test_sql_records_are_distinct_short_and_varied():
    records = sql_task.generate(sql_task.DEFAULT_NUM_EXAMPLES, seed=0)
    assert all(set(r) == {"sql_context", "sql_prompt", "sql"} for r in records)  # Gretel's names
    assert len({(r["sql_context"], r["sql_prompt"]) for r in records}) == len(records) >= 2000
    assert len({r["sql"] for r in records}) >= 1000
    for r in records:
        assert r["sql"].startswith("SELECT ") and r["sql"].endswith(";")
        assert len(r["sql"]) < 80
    kinds = {"COUNT(*)", "GROUP BY", "ORDER BY", "AVG(", "MAX(", "AND", "LIMIT"}
    assert all(any(k in r["sql"] for r in records) for k in kinds)
    assert len({r["sql_context"] for r in records}) == len(sql_task.TABLES)


def test_sql_generate_rejects_more_than_the_task_holds():
    capacity = sum(map(len, sql_task.all_records()))
    with pytest.raises(ValueError, match=f"0..{capacity}"):
        sql_task.generate(capacity + 1)


@pytest.mark.parametrize(
    ("prediction", "gold", "same"),
    [
        ("select count(*)  from t where a = 'x' ;", "SELECT COUNT(*) FROM t WHERE a = 'x';", True),
        (" SELECT COUNT( * ) FROM t", "SELECT COUNT(*) FROM t;", True),
        ("SELECT a,b FROM t WHERE x>=5", "SELECT a, b FROM t WHERE x >= 5;", True),
        ("SELECT a FROM t;\nschema: junk", "SELECT a FROM t;", True),
        ("SELECT a FROM t WHERE x = 'Sales'", "SELECT a FROM t WHERE x = 'sales';", False),
        ("SELECT a FROM t WHERE x = 'a  b'", "SELECT a FROM t WHERE x = 'a b';", False),
        ("SELECT a FROM t WHERE x = 'a;b'", "SELECT a FROM t WHERE x = 'a;b';", True),
        ("SELECT MAX(a) FROM t", "SELECT MIN(a) FROM t;", False),
        ("", "SELECT a FROM t;", False),
    ],
)
def test_exact_match(prediction, gold, same):
    assert sql_task.exact_match(prediction, gold) is same


def test_normalize_sql():
    assert sql_task.normalize_sql("  SELECT\tName FROM T ;  ") == "select name from t"
    assert sql_task.normalize_sql("WHERE X='Ab  C'") == "where x = 'Ab  C'"


# --------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trips_sql(tok):
    assert len(tok) == VOCAB_SIZE <= 260
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert len({tok.pad_token_id, tok.bos_token_id, tok.eos_token_id}) == 3
    for e in sql_examples(200, seed=3):
        text = e["prompt"] + e["completion"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == list(text.encode())
        assert tok.decode(ids) == text
        assert tok.decode([*ids, tok.eos_token_id], skip_special_tokens=True) == text


def test_byte_tokenizer_is_deterministic_and_reloads(tok, tmp_path):
    from transformers import AutoTokenizer

    assert byte_tokenizer().get_vocab() == tok.get_vocab()
    tok.save_pretrained(tmp_path / "tok")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    text = "sql: SELECT name FROM t WHERE x = 'é';\n"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == text
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)


# --------------------------------------------------------------------------- loading


def read_records(
    source: str, *, eval_fraction: float = 0.1, seed: int = 0, **fields: str
) -> tuple[list[dict], list[dict]]:
    """``(train, held-out)`` records of ``data=source`` as molf-train reads them (``task=sql``,
    the default, under which a prompt/completion file trains as it is)."""
    records, _ = tasks.training_records(tasks.get("sql"), source, seed=seed, **fields)
    return split_records(records, eval_fraction=eval_fraction, seed=seed)


def test_embedded_sql_task_split():
    train, held = read_records("sql", seed=1)
    n = sql_task.DEFAULT_NUM_EXAMPLES
    assert (len(train), len(held)) == (n - round(n * 0.1), round(n * 0.1))
    assert read_records("default", seed=1) == (train, held)
    assert read_records("sql", seed=2) != (train, held)
    assert {e["sql_prompt"] for e in train}.isdisjoint(e["sql_prompt"] for e in held)


def test_records_from_jsonl_csv_parquet(tmp_path):
    import datasets

    jsonl = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    csv = tmp_path / "d.csv"
    datasets.Dataset.from_list(RECORDS).to_csv(str(csv), index=False)
    parquet = tmp_path / "d.parquet"
    rows = [{"q": r["prompt"], "a": r["completion"], "x": 1} for r in RECORDS]
    datasets.Dataset.from_list(rows).to_parquet(str(parquet))
    expected = read_records(jsonl, seed=5)
    assert read_records(str(csv), seed=5) == expected
    renamed = read_records(str(parquet), prompt_field="q", completion_field="a", seed=5)
    assert renamed == expected
    train, held = expected
    assert (len(train), len(held)) == (18, 2)
    assert sorted(train + held, key=lambda r: r["prompt"]) == sorted(
        RECORDS, key=lambda r: r["prompt"]
    )


@pytest.mark.parametrize(
    ("n", "fraction", "n_eval"),
    [(1, 0.1, 0), (2, 0.1, 1), (2, 0.9, 1), (10, 0.01, 1), (10, 0.25, 2), (20, 0.1, 2), (5, 0, 0)],
)
def test_eval_split_sizes(tmp_path, n, fraction, n_eval):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS[:n])
    train, held = read_records(path, eval_fraction=fraction)
    assert (len(train), len(held)) == (n - n_eval, n_eval)


def test_split_depends_on_seed_only(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    assert read_records(path, seed=3) == read_records(path, seed=3)
    assert read_records(path, seed=3) != read_records(path, seed=4)


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "match"),
    [
        ("missing.jsonl", None, {}, "does not exist"),
        ("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": \n', {}, "could not read"),
        ("bad.parquet", "not a parquet file", {}, "could not read"),
        ("empty.jsonl", "\n", {}, "has no records"),
        ("empty.csv", "prompt,completion\n", {}, "has no records"),
        ("notes.txt", "hello", {}, "unsupported format"),
        # a first value of null crashed the process inside datasets' JSON reader
        ("null.jsonl", " null\n", {}, "its first value is not a JSON object"),
        (
            "cols.csv",
            "question,answer\nq,a\n",
            {},
            r"neither the fields of task=sql .* nor 'prompt'/'completion' "
            r"\(fields: question, answer\)",
        ),
        ("cols2.jsonl", '{"prompt": "p", "answer": "a"}\n', {}, r"nor 'prompt'/'completion'"),
        ("renamed.jsonl", '{"prompt": "p"}\n', {"prompt_field": "q"}, r"nor 'q'/'completion'"),
        ("num.jsonl", '{"prompt": "p", "completion": 3}\n', {}, "'completion' is int, not a str"),
        ("hole.csv", "prompt,completion\np,c\np2,\n", {}, "record 1: 'completion' is NoneType"),
    ],
)
def test_data_errors(tmp_path, name, content, kwargs, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_records(str(path), **kwargs)


def test_empty_parquet_and_too_many_generated(tmp_path):
    import datasets

    path = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"prompt": [], "completion": []}).to_parquet(str(path))
    with pytest.raises(DataError, match="has no records"):
        read_records(str(path))
    with pytest.raises(DataError, match="num_generated"):
        tasks.get("sql").load(tasks.GENERATED, 0, num_generated=10**6)


# --------------------------------------------------------------------------- tokenizing


def test_tokenize_masks_the_prompt(tok):
    records = sql_examples(50, seed=0)
    examples = tokenize(records, tok, max_length=256)
    assert len(examples) == 50 and examples.dropped == examples.truncated == 0
    for r, e in zip(records, examples, strict=True):
        n_prompt = len(r["prompt"].encode())
        assert e["input_ids"] == list((r["prompt"] + r["completion"]).encode()) + [tok.eos_token_id]
        assert e["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert e["labels"][n_prompt:] == e["input_ids"][n_prompt:]


def test_tokenize_truncates_and_drops(tok, caplog):
    records = [
        {"prompt": "p" * 10, "completion": "c" * 10},
        {"prompt": "p" * 30, "completion": "c"},
        {"prompt": "p" * 3, "completion": "c" * 3},
    ]
    with caplog.at_level(logging.WARNING, logger="molf_ds.train.data"):
        examples = tokenize(records, tok, max_length=16)
        quiet = tokenize(records, tok, max_length=16, report=False)  # a rank but the main one
    assert (len(examples), examples.dropped, examples.truncated) == (2, 1, 1)
    assert quiet == examples and (quiet.dropped, quiet.truncated) == (1, 1)
    assert [r.getMessage() for r in caplog.records] == [
        "max_length=16: dropped 1 and truncated 1 of 3 records; raise max_length to keep whole "
        "completions"
    ]
    assert [len(e["input_ids"]) for e in examples] == [16, 7]
    assert examples[0]["labels"][10:] == examples[0]["input_ids"][10:]
    with pytest.raises(DataError, match="raise max_length"):  # on every rank: all must stop
        tokenize(records[1:2], tok, max_length=16, report=False)
    assert tokenize([], tok, max_length=16) == []


# --------------------------------------------------------------------------- batching


def _examples(n):
    return [
        {"input_ids": [i] * (1 + i % 5), "labels": [IGNORE_INDEX] + [i] * (i % 5)} for i in range(n)
    ]


def _ids(batch):
    """The example index of each row (every example's ids are all its index)."""
    return batch["input_ids"][:, 0].tolist()


def test_batches_pad_right_and_mask():
    (batch,) = batches(_examples(4)[1:3], micro_batch_size=2, pad_id=-7, seed=0)
    row = _ids(batch).index(1)
    assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape == (2, 3)
    assert batch["input_ids"][row].tolist() == [1, 1, -7]
    assert batch["labels"][row].tolist() == [IGNORE_INDEX, 1, IGNORE_INDEX]
    assert batch["attention_mask"][row].tolist() == [1, 1, 0]


def test_ranks_split_each_global_batch_disjointly():
    examples, mb, world = _examples(53), 2, 3
    single = [_ids(b) for b in batches(examples, micro_batch_size=mb * world, pad_id=0, seed=4)]
    kw = {"micro_batch_size": mb, "world_size": world, "seed": 4, "pad_id": 0}
    per_rank = [[_ids(b) for b in batches(examples, rank=r, **kw)] for r in range(world)]
    assert len(single) == num_batches(examples, micro_batch_size=mb, world_size=world) == 8
    for step, global_batch in enumerate(single):
        parts = [per_rank[r][step] for r in range(world)]
        assert all(len(p) == mb for p in parts)
        assert sorted(sum(parts, [])) == sorted(global_batch)
        assert len(set(sum(parts, []))) == mb * world
    seen = [i for rank in per_rank for b in rank for i in b]
    assert len(seen) == len(set(seen)) == 48


def test_batches_deterministic_per_seed_and_epoch():
    def order(**kw):
        return [_ids(b) for b in batches(_examples(40), micro_batch_size=4, pad_id=0, **kw)]

    assert order(seed=1, epoch=0) == order(seed=1, epoch=0)
    assert order(seed=1, epoch=0) != order(seed=1, epoch=1)
    assert order(seed=1, epoch=0) != order(seed=2, epoch=0)


def test_resume_from_step_k_continues_the_same_stream():
    examples = _examples(60)
    kw = {"micro_batch_size": 3, "world_size": 2, "rank": 1, "seed": 9, "epoch": 2, "pad_id": 0}
    full = list(batches(examples, **kw))
    tail = list(batches(examples, start_step=4, **kw))
    assert len(tail) == len(full) - 4
    for a, b in zip(full[4:], tail, strict=True):
        assert all(torch.equal(a[key], b[key]) for key in a)
    assert list(batches(examples, start_step=len(full), **kw)) == []


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"micro_batch_size": 0}, "both must be >= 1"),
        ({"micro_batch_size": 2, "world_size": 2, "rank": 2}, "rank=2 is outside 0..1"),
        ({"micro_batch_size": 8, "world_size": 2}, "do not fill one global batch of 16"),
        ({"micro_batch_size": 2, "start_step": -1}, "start_step=-1"),
    ],
)
def test_batch_argument_errors(kwargs, match):
    with pytest.raises(DataError, match=match):
        next(batches(_examples(10), pad_id=0, **kwargs))
