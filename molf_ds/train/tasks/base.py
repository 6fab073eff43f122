"""`Task`: a public dataset's schema, the prompts made from its records, and its metric.

A task reads records in the dataset's own schema (`Task.load`: a local .jsonl/.json/.csv/.parquet
file or the hub, through `datasets`), turns them into prompt/completion examples to train on
(`Task.to_examples`) and scores a model on them (`Task.evaluate`, batched) with the same prompts,
so a model is evaluated on exactly the text it learned. One module per task fills in the schema
check of one record, the prompt format and the metric.
"""

from __future__ import annotations

import time
from typing import Any

from molf_ds.train import data
from molf_ds.train.data import DataError

SHOWN_FIELDS = 160  # characters of a dataset's field list an error line quotes


class Task:
    """One task. Subclasses set the class attributes and implement `check_record`,
    `to_examples` and `evaluate`."""

    name: str = ""
    # the public dataset (`datasets.load_dataset(hub_id)`), read when data=default
    hub_id: str = ""
    # top-level fields every record must have, and the schema as error lines describe it
    fields: tuple[str, ...] = ()
    schema: str = ""

    @property
    def default_source(self) -> str:
        """What ``data=default`` reads: the hub dataset (the SQL task: its embedded generator)."""
        return self.hub_id

    # ---- records ----------------------------------------------------------------------------
    def load(self, source: str, seed: int = 0, *, split: str = "train") -> list[dict]:
        """Records in the dataset's own schema from a local file or a hub id (its ``split``).

        Every record is checked (`check_record`); a missing field or a value of the wrong type is
        one `DataError` line naming the field and the schema expected. ``seed`` is for sources
        generated on the fly (the SQL task's); files and hub datasets are read as they are.
        """
        return self.from_dataset(self.read(source, split=split), source)

    def read(self, source: str, *, split: str = "train") -> Any:
        """The ``datasets.Dataset`` of ``source``; unreadable: one line saying what to pass."""
        hint = (
            f"without network access (or with HF_HUB_OFFLINE=1) pass a local "
            f"{'/'.join(data.FILE_FORMATS)} file with {self.schema} via data=PATH"
        )
        if source != self.hub_id:
            hint = f"check the id, or {hint}"
        return data.read_dataset(source, split=split, hub_hint=hint)

    def from_dataset(self, dataset: Any, source: str) -> list[dict]:
        """Checked records of a ``datasets.Dataset`` already read (see `load`)."""
        self.check_fields(dataset.column_names, source)
        rows = data.dataset_rows(dataset, source)
        return [self.check_record(row, i, source) for i, row in enumerate(rows)]

    def check_fields(self, columns: list[str], source: str) -> None:
        """One line naming the first of `fields` that ``columns`` lack, and the schema."""
        missing = [field for field in self.fields if field not in columns]
        if missing:
            raise DataError(
                f"dataset {source} has no {missing[0]!r} field (fields: {shown_fields(columns)}); "
                f"task={self.name} reads {self.schema}"
            )

    def check_record(self, record: dict, index: int, source: str) -> dict:
        """``record`` with its schema checked (values of the right type), or a `DataError`."""
        raise NotImplementedError

    # ---- training and evaluation --------------------------------------------------------------
    def to_examples(self, records: list[dict]) -> list[dict]:
        """``{"prompt", "completion"}`` examples to train on, one per record."""
        raise NotImplementedError

    def evaluate(
        self, model: Any, tokenizer: Any, records: list[dict], *, batch_size: int = 16
    ) -> dict[str, float]:
        """The task's metric(s) of ``model`` (a causal LM in eval mode) on ``records``, batched,
        with ``examples`` (how many records) and ``examples_per_s`` (records / wall time)."""
        raise NotImplementedError

    # ---- helpers for subclasses ------------------------------------------------------------
    def bad_value(self, source: str, index: int, what: str, problem: str) -> DataError:
        """One line: which record, which field, what is wrong, and the schema expected."""
        return DataError(
            f"dataset {source} record {index}: {what} {problem}; task={self.name} reads "
            f"{self.schema}"
        )

    def text(self, value: Any, source: str, index: int, what: str) -> str:
        """``value`` if it is a string, else a `bad_value` error naming ``what``."""
        if not isinstance(value, str):
            raise self.bad_value(source, index, what, f"is {type(value).__name__}, not text")
        return value


def shown_fields(columns: list[str]) -> str:
    """A dataset's field names as an error line quotes them (cut at `SHOWN_FIELDS`)."""
    text = ", ".join(columns)
    return text if len(text) <= SHOWN_FIELDS else text[: SHOWN_FIELDS - 3] + "..."


def share(hits: int, total: int) -> float:
    """``hits / total``, NaN when there is nothing to score (never a division error)."""
    return hits / total if total else float("nan")


class Timer:
    """Wall time of an evaluation, for its ``examples_per_s``."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def rate(self, examples: int) -> float:
        return examples / max(time.perf_counter() - self.started, 1e-9)
