"""``sql``: text-to-SQL in the schema of Gretel's ``gretelai/synthetic_text_to_sql``.

A record (other fields of Gretel's, such as ``domain`` or ``sql_explanation``, are kept and
not used)::

    {"sql_context": "employees(id, name, dept, salary)",
     "sql_prompt": "how many employees work in sales?",
     "sql": "SELECT COUNT(*) FROM employees WHERE dept = 'sales';"}

``load("generated")`` gives the embedded task (`molf_ds.train.sql_task`, no download), whose
generator writes records in this schema, so generated and real data go through one pipeline.
The prompt is the one molf-train has always trained on; the completion is ``" " + sql``::

    schema: employees(id, name, dept, salary)
    question: how many employees work in sales?
    sql:
    ->  " SELECT COUNT(*) FROM employees WHERE dept = 'sales';"

Metric: **exact match** of the greedy generation's first line with ``sql``, both normalised by
`sql_task.exact_match` (case and spacing outside string literals; the first statement only).
"""

from __future__ import annotations

from typing import Any

from molf_ds.train import sql_task
from molf_ds.train.data import DataError
from molf_ds.train.tasks import scoring
from molf_ds.train.tasks.base import Task, Timer, share

GENERATED = "generated"  # the source name of the embedded task
PROMPT = "schema: {context}\nquestion: {question}\nsql:"
# Generation budget: the embedded task's answers are at most 80 bytes (+ eos); Gretel's SQL is a
# few dozen tokens with a subword tokenizer. Rows stop at eos or their first line break.
MAX_NEW_TOKENS = 128


class SQLTask(Task):
    name = "sql"
    hub_id = "gretelai/synthetic_text_to_sql"
    fields = ("sql_context", "sql_prompt", "sql")
    schema = "Gretel's text-to-SQL schema: sql_context, sql_prompt, sql (text)"

    @property
    def default_source(self) -> str:
        return GENERATED

    # ---- records ----------------------------------------------------------------------------
    def load(
        self,
        source: str,
        seed: int = 0,
        *,
        split: str = "train",
        num_generated: int = sql_task.DEFAULT_NUM_EXAMPLES,
    ) -> list[dict]:
        """As `Task.load`; ``"generated"`` is the embedded task: ``num_generated`` records, a
        pure function of ``seed``."""
        if source == GENERATED:
            return generated_records(num_generated, seed)
        return super().load(source, seed, split=split)

    def check_record(self, record: dict, index: int, source: str) -> dict:
        for field in self.fields:
            self.text(record[field], source, index, repr(field))
        return record

    # ---- training and evaluation --------------------------------------------------------------
    @staticmethod
    def prompt(record: dict) -> str:
        return PROMPT.format(context=record["sql_context"], question=record["sql_prompt"])

    def to_examples(self, records: list[dict]) -> list[dict]:
        return [{"prompt": self.prompt(r), "completion": " " + r["sql"]} for r in records]

    def evaluate(
        self,
        model: Any,
        tokenizer: Any,
        records: list[dict],
        *,
        batch_size: int = 16,
        max_new_tokens: int = MAX_NEW_TOKENS,
    ) -> dict[str, float]:
        timer = Timer()
        predictions = scoring.greedy_generate(
            model,
            tokenizer,
            [self.prompt(r) for r in records],
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            stop_at_newline=True,
        )
        hits = sum(
            sql_task.exact_match(prediction.split("\n")[0], record["sql"])
            for prediction, record in zip(predictions, records, strict=True)
        )
        n = len(records)
        return {
            "exact_match": share(hits, n),
            "examples": n,
            "examples_per_s": timer.rate(n),
        }


def generated_records(num_examples: int, seed: int) -> list[dict]:
    """The embedded task's records (`sql_task.generate`), its range error as a `DataError`."""
    try:
        return sql_task.generate(num_examples, seed)
    except ValueError as e:
        raise DataError(f"num_generated: {e}") from None
