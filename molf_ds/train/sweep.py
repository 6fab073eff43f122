"""Gather a sweep: one table of the finished runs under a directory.

    molf-sweep runs/sweep            # mode, task, lr, seed, final loss, eval loss and score
    molf-sweep runs/sweep --json     # the same rows as JSON

(also ``python -m molf_ds.train.sweep``.)

A run is any directory with a ``run_config.json`` (what molf-train writes first); it counts as
finished once it has ``outputs.json`` (written last). Unfinished runs — still running, requeued
or failed — are listed by name under the table, so a gap in the grid is visible. A run file that
is not what molf-train writes (not UTF-8, not JSON, not an object) is one error line naming the
file; values of unexpected types are shown as they are.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from molf_ds.errors import MoLFError, OneLineArgumentParser

COLUMNS = ("run", "mode", "task", "lr", "seed", "steps", "final_loss", "eval_loss")
METRICS = ("exact_match", "accuracy", "efficacy", "paraphrase")
"""The tasks' scores in eval.json (sql; med; fact): the table has a column for each that any run
reports."""


class SweepError(MoLFError):
    """A run file under the sweep directory that cannot be read as molf-train writes it."""


def gather(root: str | Path) -> tuple[list[dict], list[str]]:
    """``(rows, unfinished)``: one row per finished run under ``root``, sorted by mode, task, lr,
    seed."""
    rows, unfinished = [], []
    for config_path in sorted(Path(root).rglob("run_config.json")):
        run = config_path.parent
        name = str(run.relative_to(root)) if run != Path(root) else run.name
        if not (run / "outputs.json").exists():
            unfinished.append(name)
            continue
        config = _read_json(config_path)
        last = _last_metrics(run / "metrics.jsonl")
        evaluation = _read_json(run / "eval.json")
        rows.append(
            {
                "run": name,
                "mode": config.get("mode"),
                "task": config.get("task"),
                "lr": config.get("lr"),
                "seed": config.get("seed"),
                "steps": last.get("step"),
                "final_loss": last.get("loss"),
                "eval_loss": evaluation.get("loss"),
                **{metric: evaluation.get(metric) for metric in METRICS},
            }
        )
    rows.sort(
        key=lambda r: (
            str(r["mode"]),
            str(r["task"]),
            _number(r["lr"]),
            _number(r["seed"]),
            r["run"],
        )
    )
    return rows, unfinished


def _number(value: Any) -> float:
    """A sort key for a value that should be a number (a hand-edited file may hold anything)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        return number if not math.isnan(number) else math.inf
    return 0.0 if value is None else math.inf


def _last_metrics(path: Path) -> dict:
    last: dict = {}
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            record = _parse_object(line, f"{path} line {number}")
            if "loss" in record:
                last = record
    return last


def _read_json(path: Path) -> dict:
    text = _read_text(path)
    return _parse_object(text, str(path)) if path.exists() else {}


def _read_text(path: Path) -> str:
    """The file's text ('' when missing); SweepError when unreadable or not UTF-8."""
    if not path.exists():
        return ""
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as err:
        raise SweepError(f"cannot read {_shown(path)}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise SweepError(f"{_shown(path)} is not UTF-8 text (byte {err.start})") from None


def _parse_object(text: str, where: str) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise SweepError(f"{_shown(where)} is not JSON ({reason[:120]})") from None
    if not isinstance(value, dict):
        raise SweepError(f"{_shown(where)} holds a JSON {type(value).__name__}, not an object")
    return value


def _shown(value: Any) -> str:
    """Text for a terminal line: undecodable bytes and control characters escaped."""
    text = str(value)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def columns_of(rows: list[dict]) -> list[str]:
    """`COLUMNS`, then the `METRICS` that any of ``rows`` has."""
    return [*COLUMNS, *(m for m in METRICS if any(row[m] is not None for row in rows))]


def format_table(rows: list[dict]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return _shown(value)

    columns = columns_of(rows)
    table = [columns] + [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="molf-sweep",
        usage="molf-sweep RUNS_DIR [--json]",
        description="One table of the finished molf-train runs under a directory.",
        allow_abbrev=False,
    )
    parser.add_argument("runs_dir", metavar="RUNS_DIR", type=Path, help="where the runs are")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.runs_dir.is_dir():
        parser.error(f"{args.runs_dir} is not a directory")
    try:
        rows, unfinished = gather(args.runs_dir)
    except MoLFError as err:
        print(f"molf-sweep: error: {err}; fix or remove that file", file=sys.stderr)
        sys.exit(1)
    if args.json:
        print(json.dumps({"rows": rows, "unfinished": unfinished}, indent=2))
        return
    print(format_table(rows))
    if unfinished:
        print(f"\nunfinished ({len(unfinished)}): " + ", ".join(map(_shown, unfinished)))


if __name__ == "__main__":
    main()
