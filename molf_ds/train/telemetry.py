"""What a training run records, on rank 0 only: per-step metrics and the routing decisions.

* `MetricsWriter`: ``metrics.jsonl`` (one JSON object per logged step) and TensorBoard events
  under ``tensorboard/``.
* `RoutingLog`: ``routing.jsonl``, a header line with the module and expert names, then one line
  per step with the winners (lossless, one character per module for Top-1) and the scores
  (4 significant digits).

Both files are strict JSON lines, flushed per line, so a crashed run keeps every logged step and
``molf-plot`` can read a live one. A resumed run appends; the readers let a step number that goes
back in time replace what the interrupted run logged from that step on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from molf_ds.errors import MoLFError

METRICS_FILE = "metrics.jsonl"
ROUTING_FILE = "routing.jsonl"
TENSORBOARD_DIR = "tensorboard"
ROUTING_FORMAT = "molf-routing/1"
_INDEX_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


class MetricsWriter:
    """Writes ``output_dir/metrics.jsonl`` and TensorBoard scalars, or nothing when disabled.

    Pass ``enabled=(rank == 0)``: other ranks then create no files, so every rank can call
    `log` unconditionally. TensorBoard tags are ``train/<key>``, and ``eval/<name>`` for keys
    ``eval_<name>``.
    """

    def __init__(self, output_dir: str | Path, enabled: bool, *, tensorboard: bool = True) -> None:
        self.enabled = bool(enabled)
        self.path = Path(output_dir) / METRICS_FILE
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self._tb = _summary_writer(self.path.parent / TENSORBOARD_DIR)
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Record one step: e.g. ``loss``, ``lr``, ``tokens_per_s``, ``fft_share``, ``eval_loss``.

        ``None`` values are left out; numbers (or 0-d tensors) only; non-finite ones are
        written as ``null`` so the file stays strict JSON.
        """
        if self._file is None:
            return
        record: dict[str, Any] = {"step": int(step)}
        record.update({k: _number(k, v) for k, v in metrics.items() if v is not None})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and value is not None:
                    self._tb.add_scalar(_tensorboard_tag(key), value, int(step))

    def close(self) -> None:
        """Flush and close both outputs; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class RoutingStep:
    """One step of a routing log: ``winners[module][expert]`` and ``scores[module][expert]``
    (``-inf`` where the expert was no candidate, as in `molf_ds.RoutingRecord`)."""

    step: int
    winners: list[list[bool]]
    scores: list[list[float]]


class RoutingLog:
    """Appends each step's routing decision to ``path`` (``routing.jsonl``), rank 0 only.

    The first line is the header ``{"format", "module_names", "expert_names"}``. Each step line
    holds ``winners`` -- one base-36 digit per module, the index of its single winner -- or,
    when some module has not exactly one winner (Top-K > 1), ``winner_masks``: per module a
    fixed-width hex bitmask (bit ``e`` = expert ``e`` won). ``scores`` are rounded to 4
    significant digits, ``null`` where not finite. Reopening an existing log with the same
    names appends to it (a resumed run); different names are an error.
    """

    def __init__(
        self,
        path: str | Path,
        module_names: Sequence[str],
        expert_names: Sequence[str],
        *,
        enabled: bool = True,
    ) -> None:
        self.path = Path(path)
        self.module_names = tuple(module_names)
        self.expert_names = tuple(expert_names)
        self.enabled = bool(enabled)
        self._file = None
        if self.enabled:
            self._file = self._open()

    def append(self, step: int, record: Any) -> None:
        """Log ``record`` (a `molf_ds.RoutingRecord`: ``winners``/``scores`` tensors and
        names) as step ``step``. Reads both tensors to the host in one transfer."""
        if self._file is None:
            return
        if tuple(record.module_names) != self.module_names or (
            tuple(record.expert_names) != self.expert_names
        ):
            raise MoLFError(
                "routing record's module/expert names differ from this log's; open one "
                "RoutingLog per model, with optimizer.plan.module_names and .expert_names"
            )
        winners, scores = _host_rows(record)
        line = {"step": int(step), **encode_winners(winners), "scores": _round_rows(scores)}
        self._file.write(json.dumps(line, allow_nan=False, separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RoutingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _header(self) -> dict[str, Any]:
        return {
            "format": ROUTING_FORMAT,
            "module_names": list(self.module_names),
            "expert_names": list(self.expert_names),
        }

    def _open(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            header, _ = read_routing_log(self.path)
            if header != self._header():
                raise MoLFError(
                    f"{self.path} logs other modules or experts; write to a new output_dir "
                    "or delete that file"
                )
            return self.path.open("a", encoding="utf-8")
        file = self.path.open("w", encoding="utf-8")
        file.write(json.dumps(self._header()) + "\n")
        file.flush()
        return file


def encode_winners(winners: Sequence[Sequence[bool]]) -> dict[str, str]:
    """``{"winners": digits}`` when every module has exactly one winner (and at most 36
    experts), else ``{"winner_masks": hex}``; both decode exactly with `decode_winners`."""
    rows = [[bool(won) for won in row] for row in winners]
    num_experts = len(rows[0]) if rows else 0
    if num_experts <= len(_INDEX_DIGITS) and all(sum(row) == 1 for row in rows):
        return {"winners": "".join(_INDEX_DIGITS[row.index(True)] for row in rows)}
    width = _mask_width(num_experts)
    masks = (sum(1 << e for e, won in enumerate(row) if won) for row in rows)
    return {"winner_masks": "".join(f"{mask:0{width}x}" for mask in masks)}


def decode_winners(line: Mapping[str, Any], num_modules: int, num_experts: int) -> list[list[bool]]:
    """The ``[modules][experts]`` winners of a step line written by `encode_winners`."""
    if "winners" in line:
        digits = line["winners"]
        _check_length("winners", digits, num_modules)
        indices = [_INDEX_DIGITS.index(d) for d in digits]
        return [[e == index for e in range(num_experts)] for index in indices]
    hexes, width = line.get("winner_masks"), _mask_width(num_experts)
    _check_length("winner_masks", hexes, num_modules * width)
    masks = [int(hexes[i : i + width], 16) for i in range(0, len(hexes), width)]
    return [[bool(mask >> e & 1) for e in range(num_experts)] for mask in masks]


def read_routing_log(path: str | Path) -> tuple[dict[str, Any], list[RoutingStep]]:
    """``(header, steps)`` of a routing log, steps in order (a resumed run's replace the
    interrupted run's from the step it resumed at)."""
    path = Path(path)
    lines = read_jsonl(path)
    if not lines:
        raise MoLFError(f"{path} is empty; it is written by a MoLF training run's rank 0")
    header = lines[0]
    if not {"module_names", "expert_names"} <= header.keys():
        raise MoLFError(f"{path} has no routing header on its first line; is it a routing log?")
    num_modules, num_experts = len(header["module_names"]), len(header["expert_names"])
    steps = []
    for lineno, line in enumerate(lines[1:], start=2):
        try:
            winners = decode_winners(line, num_modules, num_experts)
            scores = [[-math.inf if v is None else float(v) for v in row] for row in line["scores"]]
            steps.append(RoutingStep(int(line["step"]), winners, scores))
        except (KeyError, TypeError, ValueError) as exc:
            msg = f"{path}:{lineno}: not a routing step ({exc}); delete that line"
            raise MoLFError(msg) from None
    return header, _latest_timeline(steps, merge=False)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``, one per step in order; records of the same step are
    merged (e.g. train and eval logged apart), a step going back replaces the later ones."""
    path = Path(path)
    records = read_jsonl(path)
    for lineno, record in enumerate(records, start=1):
        if not isinstance(record.get("step"), int):
            raise MoLFError(f"{path}:{lineno}: record has no integer 'step'; delete that line")
    return _latest_timeline(records, merge=True)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; an unterminated, unparsable last line (a write in
    progress) is ignored, any other bad line is an error naming it."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    out = []
    for lineno, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            if lineno == len(lines) and not text.endswith("\n"):
                break
            msg = f"{path}:{lineno}: not valid JSON ({exc.msg}); delete that line"
            raise MoLFError(msg) from None
        if not isinstance(obj, dict):
            raise MoLFError(f"{path}:{lineno}: expected a JSON object; delete that line")
        out.append(obj)
    return out


def _latest_timeline(items: Iterable, *, merge: bool) -> list:
    """Keep one item per step: a step at or before the last one drops the later steps (a
    resumed run rewinds); an equal step merges (dicts, ``merge=True``) or replaces."""
    kept: list = []
    for item in items:
        step = _step_of(item)
        while kept and _step_of(kept[-1]) > step:
            kept.pop()
        if kept and _step_of(kept[-1]) == step:
            previous = kept.pop()
            if merge:
                item = {**previous, **item}
        kept.append(item)
    return kept


def _step_of(item: Any) -> int:
    return item["step"] if isinstance(item, dict) else item.step


def _host_rows(record: Any) -> tuple[list[list[bool]], list[list[float]]]:
    import torch

    scores, winners = record.scores, record.winners
    both = torch.cat([scores.double(), winners.double()], dim=1).cpu()  # one device read
    num_experts = scores.shape[1]
    return (both[:, num_experts:] != 0).tolist(), both[:, :num_experts].tolist()


def _round_rows(rows: list[list[float]]) -> list[list[float | None]]:
    return [[float(f"{v:.4g}") if math.isfinite(v) else None for v in row] for row in rows]


def _mask_width(num_experts: int) -> int:
    return max(1, -(-num_experts // 4))


def _check_length(key: str, value: Any, expected: int) -> None:
    if not isinstance(value, str) or len(value) != expected:
        raise ValueError(f"'{key}' must be a string of {expected} characters")


def _number(key: str, value: Any) -> float | int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise MoLFError(f"metric {key!r} must be a number, got {value!r}") from None
    return number if math.isfinite(number) else None


def _tensorboard_tag(key: str) -> str:
    return "eval/" + key[len("eval_") :] if key.startswith("eval_") else "train/" + key


def _summary_writer(log_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MoLFError(
            "TensorBoard logging needs the tensorboard package: pip install tensorboard "
            "(or pass tensorboard=False)"
        ) from None
    return SummaryWriter(log_dir=str(log_dir), flush_secs=30)
