"""Gather a sweep: one table of the finished runs under a directory.

    molf-sweep runs/sweep            # mode, lr, seed, final loss, eval
    molf-sweep runs/sweep --json     # the same rows as JSON

(also ``python -m molf_ds.train.sweep``.)

A run is any directory with a ``run_config.json`` (what molf-train writes first); it counts as
finished once it has ``outputs.json`` (written last). Unfinished runs — still running, requeued
or failed — are listed by name under the table, so a gap in the grid is visible.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COLUMNS = ("run", "mode", "lr", "seed", "steps", "final_loss", "eval_loss", "exact_match")


def gather(root: str | Path) -> tuple[list[dict], list[str]]:
    """``(rows, unfinished)``: one row per finished run under ``root``, sorted by mode, lr, seed."""
    rows, unfinished = [], []
    for config_path in sorted(Path(root).rglob("run_config.json")):
        run = config_path.parent
        name = str(run.relative_to(root)) if run != Path(root) else run.name
        if not (run / "outputs.json").exists():
            unfinished.append(name)
            continue
        config = json.loads(config_path.read_text())
        last = _last_metrics(run / "metrics.jsonl")
        evaluation = _read_json(run / "eval.json")
        rows.append(
            {
                "run": name,
                "mode": config.get("mode"),
                "lr": config.get("lr"),
                "seed": config.get("seed"),
                "steps": last.get("step"),
                "final_loss": last.get("loss"),
                "eval_loss": evaluation.get("loss"),
                "exact_match": evaluation.get("exact_match"),
            }
        )
    rows.sort(key=lambda r: (str(r["mode"]), r["lr"] or 0.0, r["seed"] or 0, r["run"]))
    return rows, unfinished


def _last_metrics(path: Path) -> dict:
    last: dict = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                if "loss" in record:
                    last = record
    return last


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def format_table(rows: list[dict]) -> str:
    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    table = [list(COLUMNS)] + [[cell(row[c]) for c in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    rows, unfinished = gather(args.runs_dir)
    if args.json:
        print(json.dumps({"rows": rows, "unfinished": unfinished}, indent=2))
        return
    print(format_table(rows))
    if unfinished:
        print(f"\nunfinished ({len(unfinished)}): " + ", ".join(unfinished))


if __name__ == "__main__":
    main()
