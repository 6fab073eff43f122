"""The tasks molf-train trains and evaluates on: ``sql``, ``med``, ``fact``.

    from molf_ds.train import tasks

    task = tasks.get("fact")
    records = task.load("counterfact.json")        # the public dataset's own schema
    examples = task.to_examples(records)           # [{"prompt", "completion"}] to train on
    metrics = task.evaluate(model, tokenizer, records, batch_size=16)

One module per task (`sql`, `med`, `fact`: schema check, prompt format, metric); `base.Task` is
what they share, `scoring` the batched log-likelihood scoring and greedy generation.
`training_records` is what molf-train reads for ``task=`` and ``data=``.
"""

from __future__ import annotations

from molf_ds.errors import MoLFConfigError
from molf_ds.train import data
from molf_ds.train.data import DataError
from molf_ds.train.tasks.base import Task, shown_fields
from molf_ds.train.tasks.fact import FactTask
from molf_ds.train.tasks.med import MedTask
from molf_ds.train.tasks.sql import GENERATED, SQLTask

__all__ = ["NAMES", "Task", "get", "training_records"]

NAMES: tuple[str, ...] = ("sql", "med", "fact")
_CLASSES: dict[str, type[Task]] = {"sql": SQLTask, "med": MedTask, "fact": FactTask}
DEFAULT_SOURCE = "default"  # data=default: the task's own source
EMBEDDED_SQL = "sql"  # data=sql: the embedded SQL task (molf-train's original name for it)


def get(name: str) -> Task:
    """The task called ``name`` (one of `NAMES`)."""
    if name not in _CLASSES:
        raise MoLFConfigError(f"unknown task {name!r}: choose one of {', '.join(NAMES)}")
    return _CLASSES[name]()


def training_records(
    task: Task,
    source: str,
    *,
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    seed: int = 0,
) -> tuple[list[dict], Task | None]:
    """``(records, scorer)``: what molf-train trains on for ``task=`` and ``data=source``.

    - ``default``: the task's own source — the embedded generated SQL task for ``sql``, the
      hub dataset for ``med`` and ``fact``; ``sql`` (or ``generated``): the embedded task
      (``task=sql`` only).
    - a local file or hub id holding the task's fields: records in its schema, ``scorer`` is
      ``task`` (its metric is computed at the end).
    - one holding none of them but ``prompt_field`` and ``completion_field``: plain
      prompt/completion records, trained on as they are; ``scorer`` is None (held-out loss
      only). This keeps every prompt/completion file working with the default ``task=sql``.
    """
    if source == DEFAULT_SOURCE:
        source = task.default_source
    if source in (EMBEDDED_SQL, GENERATED):
        if task.name != "sql":
            raise DataError(
                f"data={source} is the embedded SQL task; with task={task.name} use "
                f"data=default (the hub dataset {task.hub_id}) or a local file"
            )
        return task.load(GENERATED, seed), task
    dataset = task.read(source)
    columns = dataset.column_names
    plain = prompt_field in columns and completion_field in columns
    if plain and not any(field in columns for field in task.fields):
        return data.records_from_dataset(dataset, source, prompt_field, completion_field), None
    if not any(field in columns for field in task.fields):
        raise DataError(
            f"dataset {source} has neither the fields of task={task.name} ({task.schema}) nor "
            f"{prompt_field!r}/{completion_field!r} (fields: {shown_fields(columns)}); pass a "
            "file in the task's schema, or set prompt_field/completion_field to the columns to "
            "train on"
        )
    return task.from_dataset(dataset, source), task
