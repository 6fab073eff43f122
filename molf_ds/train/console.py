"""What `molf-train` prints: its own lines, and as little as possible of its dependencies'.

* `quiet_dependencies`: at ``log_level=warning`` (the default) DeepSpeed's logger shows warnings
  and errors only, the deprecation notices our dependencies raise in each other (nothing a user
  can act on) are filtered by message, and the libraries' own progress bars (model loading and
  saving, DeepSpeed's checkpoint conversion) are off; ``info`` shows DeepSpeed's INFO lines,
  ``debug`` everything, unfiltered.
* `Progress`: a tqdm bar when stderr is a terminal; otherwise (a Slurm log, a pipe) plain lines,
  never a carriage return.
* `summary`: the lines that end a run: method, steps, time, throughput, eval score, outputs.

The deepspeed launcher runs before any of this, in a process of its own: ``launch/deepspeed.sh``
passes it the level (``--log_level``) from the ``log_level=`` on its command line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

LOG_LEVELS = ("warning", "info", "debug")
PREFIX = "molf-train: "
# Deprecation notices one dependency triggers in another (DeepSpeed 0.19 calling torch 2.13's
# renamed collectives, PEFT calling transformers 5's renamed property): not ours to fix, nothing
# a user can act on. Matched by category and the start of the message, never a blanket ignore;
# shown again at log_level=debug.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),
    (FutureWarning, r"`torch\.distributed\.reduce_scatter_tensor` is deprecated"),  # ZeRO-3
    # PEFT (lora, adalora) asking transformers 5 for a renamed property
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)
# Log lines about choices the job makes on purpose (an optimizer DeepSpeed does not know, allowed
# by `molf_ds.initialize` / the job's DeepSpeed config): shown from log_level=info on.
KNOWN_LOG_LINES: dict[str, tuple[str, ...]] = {
    "DeepSpeed": ("You are using ZeRO with an untested optimizer",),
    "molf_ds.zero": ("molf_ds.initialize set in the DeepSpeed config",),
}
# Plain progress lines (no terminal): at most one per this many seconds, plus the first and last.
PLAIN_LINE_INTERVAL_S = 30.0
# What a progress line shows of a metrics record: key -> (label, format).
SHOWN_METRICS = {
    "loss": ("loss", "{:.3f}"),
    "lr": ("lr", "{:.2e}"),
    "fft_share": ("fft", "{:.2f}"),
    "tokens_per_s": ("tok/s", "{:.0f}"),
    "skipped_steps": ("skipped", "{:d}"),
}
_HANDLER_NAME = "molf-train"


def quiet_dependencies(log_level: str) -> None:
    """Set this process's console for ``log_level`` (one of `LOG_LEVELS`); safe to call again."""
    level = getattr(logging, log_level.upper())
    quiet = log_level != "debug"
    _set_deepspeed_level(level)
    _show_library_logs(level)
    for logger_name, messages in KNOWN_LOG_LINES.items():
        _drop_known_lines(logging.getLogger(logger_name), messages if level > logging.INFO else ())
    if quiet:
        for category, message in KNOWN_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
    import transformers

    if quiet:
        transformers.utils.logging.disable_progress_bar()  # model loading / saving bars
    else:
        transformers.utils.logging.enable_progress_bar()


def _set_deepspeed_level(level: int) -> None:
    """DeepSpeed's logger (created at import with its own stdout handler) and its handlers."""
    from deepspeed.utils import logging as ds_logging

    ds_logging.logger.setLevel(level)
    for handler in ds_logging.logger.handlers:
        handler.setLevel(level)


def _show_library_logs(level: int) -> None:
    """molf_ds's own log lines (``logging.getLogger("molf_ds....")``) on stderr from ``level``
    on; without a handler Python would show only warnings, unformatted."""
    logger = logging.getLogger("molf_ds")
    logger.setLevel(level)
    handler = next((h for h in logger.handlers if h.get_name() == _HANDLER_NAME), None)
    if handler is None:
        handler = logging.StreamHandler()  # stderr at the time of each line
        handler.set_name(_HANDLER_NAME)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    handler.setLevel(level)


class _DropLines(logging.Filter):
    """Drops records whose message starts with one of ``messages``."""

    def __init__(self, messages: tuple[str, ...]) -> None:
        super().__init__(_HANDLER_NAME)
        self.messages = messages

    def filter(self, record: logging.LogRecord) -> bool:
        text = str(record.msg).lstrip("* ")
        return not text.startswith(self.messages)


def _drop_known_lines(logger: logging.Logger, messages: tuple[str, ...]) -> None:
    for old in [f for f in logger.filters if isinstance(f, _DropLines)]:
        logger.removeFilter(old)
    if messages:
        logger.addFilter(_DropLines(messages))


@contextlib.contextmanager
def chatter_hidden(log_level: str) -> Iterator[None]:
    """Hold back what a dependency writes inside the block (DeepSpeed's zero_to_fp32 prints each
    step on stdout and draws a bar on stderr): both at log_level warning, the bar (stderr) at
    info, nothing at debug. If the block fails, what it wrote comes out before the error."""
    if log_level == "debug":
        yield
        return
    captured = io.StringIO()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(contextlib.redirect_stderr(captured))
            if log_level == "warning":
                stack.enter_context(contextlib.redirect_stdout(captured))
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise


def metrics_text(record: Mapping[str, Any]) -> dict[str, str]:
    """The shown metrics of ``record`` as ``{label: text}`` (absent or None ones left out)."""
    return {
        label: fmt.format(record[key])
        for key, (label, fmt) in SHOWN_METRICS.items()
        if record.get(key) is not None
    }


class Progress:
    """Training progress on rank 0: a tqdm bar on a terminal, else plain lines on ``stream``.

    Call `update` after every step and `show` with each logged metrics record; `close` at the
    end. Plain lines come at most every `PLAIN_LINE_INTERVAL_S` seconds (and for the first and
    the last logged step), so a long run's log stays readable.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        *,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval_s: float = PLAIN_LINE_INTERVAL_S,
    ) -> None:
        self.total = total
        self.step = initial
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.interval_s = interval_s
        self.started = time.perf_counter()
        self._last_line: float | None = None
        self._bar = None
        if enabled and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, desc="molf-train", dynamic_ncols=True, file=stream
            )

    @property
    def is_bar(self) -> bool:
        return self._bar is not None

    def update(self, steps: int = 1) -> None:
        self.step += steps
        if self._bar is not None:
            self._bar.update(steps)

    def show(self, step: int, record: Mapping[str, Any]) -> None:
        """Show the metrics logged at ``step`` (the bar's postfix, or a plain line)."""
        if not self.enabled:
            return
        shown = metrics_text(record)
        if self._bar is not None:
            self._bar.set_postfix(shown)
            return
        now = time.perf_counter()
        due = self._last_line is None or now - self._last_line >= self.interval_s
        if not (due or step >= self.total):
            return
        self._last_line = now
        parts = "  ".join(f"{label} {text}" for label, text in shown.items())
        elapsed = _duration(now - self.started)
        line = f"{PREFIX}step {step}/{self.total}  {parts}  ({elapsed})"
        print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()  # ends its line: whatever comes next starts a line of its own
            self._bar = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 01 min``."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def summary(
    *,
    mode: str,
    steps: int,
    world_size: int,
    engine: str,
    train_s: float,
    finish_s: float,
    total_s: float,
    tokens_per_s: float | None,
    evaluation: Mapping[str, Any],
    output_dir: str | Path,
    outputs: Mapping[str, Any],
) -> list[str]:
    """The lines that end a run, each starting with ``molf-train: ``: what ran and how fast, the
    eval score, and where the outputs went (``outputs`` maps names to paths, `outputs.json`).
    ``finish_s``: rank 0's exports, evaluation and figures, which the other ranks wait for."""
    ranks = f"{world_size} rank{'s' if world_size > 1 else ''}"
    speed = f", {tokens_per_s:,.0f} tokens/s" if tokens_per_s is not None else ""
    return [
        f"{PREFIX}done: {mode}, {steps} steps, {ranks}, {engine}: training "
        f"{_duration(train_s)}{speed}, exports and eval {_duration(finish_s)}, "
        f"total {_duration(total_s)}",
        f"{PREFIX}eval: {eval_text(evaluation)}",
        f"{PREFIX}outputs in {output_dir}: {', '.join(_output_names(outputs, Path(output_dir)))}",
    ]


def eval_text(evaluation: Mapping[str, Any]) -> str:
    """``exact_match 0.594 (38 of 64 held-out), loss 0.0123`` (what ``evaluation`` holds)."""
    examples = int(evaluation.get("examples", 0))
    parts = []
    if "exact_match" in evaluation:
        score = float(evaluation["exact_match"])
        parts.append(f"exact_match {score:.3f} ({round(score * examples)} of {examples} held-out)")
    if "loss" in evaluation:
        parts.append(f"loss {float(evaluation['loss']):.4f}")
    return ", ".join(parts) or f"{examples} held-out examples"


def _output_names(outputs: Mapping[str, Any], output_dir: Path) -> list[str]:
    """Each output that is a path, relative to ``output_dir`` where it lies inside (folders end
    in ``/``)."""
    names = []
    for value in outputs.values():
        if not isinstance(value, str):
            continue
        path = Path(value)
        try:
            name = str(path.relative_to(output_dir))
        except ValueError:
            name = value
        names.append(name + "/" if path.is_dir() else name)
    return names
