"""What molf-train prints (`molf_ds.train.console`), in-process: the quiet set-up of the
dependencies' logs and warnings, plain progress lines off a terminal, the closing summary; and
one real 2-rank ZeRO-3 launch, whose console must say each thing once.

The whole console of real ZeRO-2 runs (a pipe, and a pseudo-terminal) is checked in
tests/test_train.py.
"""

from __future__ import annotations

import io
import logging
import os
import re
import select
import sys
import warnings
from pathlib import Path

import pytest

from molf_ds.train import console
from tests.launch import REPO, cpu_env, free_port, open_terminal, run_group

DEPRECATION = (
    "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
    "`torch.distributed.all_gather_single` instead."
)
# what DeepSpeed's ZeRO-3 gradient reduction raises in torch 2.13
ZERO3_DEPRECATION = (
    "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use "
    "`torch.distributed.reduce_scatter_single` instead."
)


@pytest.fixture
def restore_logging():
    """quiet_dependencies sets process-wide logging: put it back for the next test."""
    import transformers
    from deepspeed.utils import logging as ds_logging

    loggers = [ds_logging.logger, logging.getLogger("molf_ds"), logging.getLogger("molf_ds.zero")]
    saved = [(lg, lg.level, list(lg.handlers), list(lg.filters)) for lg in loggers]
    handler_levels = [(h, h.level) for h in ds_logging.logger.handlers]
    bars = transformers.utils.logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        yield
    for logger, level, handlers, filters in saved:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.filters[:] = filters
    for handler, level in handler_levels:
        handler.setLevel(level)
    if bars:
        transformers.utils.logging.enable_progress_bar()


@pytest.mark.parametrize(
    ("level", "deepspeed_level", "deprecation_shown", "known_line_shown"),
    [
        ("warning", logging.WARNING, False, False),
        ("info", logging.INFO, False, True),
        ("debug", logging.DEBUG, True, True),
    ],
)
def test_quiet_dependencies_levels(
    restore_logging, level, deepspeed_level, deprecation_shown, known_line_shown
) -> None:
    from deepspeed.utils import logging as ds_logging

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.quiet_dependencies(level)
        warnings.warn(DEPRECATION, FutureWarning, stacklevel=1)
        warnings.warn(ZERO3_DEPRECATION, FutureWarning, stacklevel=1)
        warnings.warn("some other future change", FutureWarning, stacklevel=1)
        warnings.warn(DEPRECATION, UserWarning, stacklevel=1)  # same text, other category
    shown = [(w.category, str(w.message)) for w in caught]
    assert ((FutureWarning, DEPRECATION) in shown) == deprecation_shown
    assert ((FutureWarning, ZERO3_DEPRECATION) in shown) == deprecation_shown
    assert (FutureWarning, "some other future change") in shown  # targeted, not a blanket
    assert (UserWarning, DEPRECATION) in shown
    assert ds_logging.logger.getEffectiveLevel() == deepspeed_level
    assert all(h.level == deepspeed_level for h in ds_logging.logger.handlers)

    stream = io.StringIO()
    ds_logging.logger.handlers[0].setStream(stream)
    try:
        ds_logging.logger.warning("**** You are using ZeRO with an untested optimizer ****")
        ds_logging.logger.warning("a warning nobody expected")
        ds_logging.logger.info("an INFO line")
    finally:
        ds_logging.logger.handlers[0].setStream(sys.stdout)
    text = stream.getvalue()
    assert ("untested optimizer" in text) == known_line_shown
    assert "a warning nobody expected" in text
    assert ("an INFO line" in text) == (deepspeed_level <= logging.INFO)


def test_quiet_dependencies_twice_adds_no_second_handler_or_filter(restore_logging) -> None:
    console.quiet_dependencies("info")
    console.quiet_dependencies("warning")
    library = logging.getLogger("molf_ds")
    assert [h.get_name() for h in library.handlers].count("molf-train") == 1
    assert len(logging.getLogger("DeepSpeed").filters) == 1


def test_progress_off_a_terminal_prints_plain_lines_first_last_and_every_interval() -> None:
    stream = io.StringIO()
    progress = console.Progress(10, stream=stream, interval_s=3600.0)
    assert not progress.is_bar
    for step in range(1, 11):
        progress.update()
        if step % 2 == 0:
            progress.show(step, {"loss": 1.0 / step, "lr": 1e-3, "tokens_per_s": 123.4})
    progress.close()
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split()[2] for line in lines] == ["2/10", "10/10"]  # first and last only
    assert "loss 0.100  lr 1.00e-03  tok/s 123" in lines[-1]

    stream = io.StringIO()
    progress = console.Progress(10, stream=stream, interval_s=0.0)
    for step in range(2, 11, 2):
        progress.show(step, {"loss": 0.5})
    assert len(stream.getvalue().splitlines()) == 5  # every logged step once the interval passed


def test_progress_on_a_terminal_is_a_bar_and_disabled_prints_nothing() -> None:
    controller, terminal = open_terminal()
    with os.fdopen(terminal, "w") as stream:
        progress = console.Progress(4, stream=stream)
        assert progress.is_bar
        progress.update()
        progress.show(1, {"loss": 2.0})
        progress.close()
        stream.flush()
        written = b""
        while select.select([controller], [], [], 0.2)[0]:  # all of it, while still open
            written += os.read(controller, 65536)
    os.close(controller)
    text = written.decode()
    assert re.search("\r(?!\n)", text) and "loss=2.000" in text, text  # a bar redrawn in place

    stream = io.StringIO()
    quiet = console.Progress(4, stream=stream, enabled=False)
    quiet.update()
    quiet.show(4, {"loss": 2.0})
    quiet.close()
    assert stream.getvalue() == ""


def test_summary_names_method_speed_score_and_outputs(tmp_path) -> None:
    (tmp_path / "merged").mkdir()
    (tmp_path / "eval.json").write_text("{}")
    lines = console.summary(
        mode="molf",
        steps=600,
        world_size=2,
        engine="ZeRO-2",
        train_s=185.2,
        finish_s=41.0,
        total_s=3725.0,
        tokens_per_s=18354.4,
        evaluation={"examples": 64, "loss": 0.01234, "exact_match": 38 / 64},
        output_dir=tmp_path,
        outputs={"merged_model": str(tmp_path / "merged"), "eval": str(tmp_path / "eval.json")},
    )
    assert lines == [
        "molf-train: done: molf, 600 steps, 2 ranks, ZeRO-2: training 3 min 05 s, "
        "18,354 tokens/s, exports and eval 41 s, total 1 h 02 min",
        "molf-train: eval: exact_match 0.594 (38 of 64 held-out), loss 0.0123",
        f"molf-train: outputs in {tmp_path}: merged/, eval.json",
    ]
    assert console.eval_text({"examples": 3, "loss": 1.5}) == "loss 1.5000"


def test_chatter_hidden_keeps_a_failing_blocks_output(capsys) -> None:
    with console.chatter_hidden("warning"):
        print("Processing zero checkpoint")
    assert capsys.readouterr().out == ""
    with pytest.raises(RuntimeError), console.chatter_hidden("warning"):
        print("the step that failed")
        raise RuntimeError("boom")
    assert "the step that failed" in capsys.readouterr().err
    with console.chatter_hidden("info"):
        print("shown at info")
        print("\rLoading checkpoint shards: 100%", file=sys.stderr)  # a bar: held back
    assert capsys.readouterr() == ("shown at info\n", "")
    with console.chatter_hidden("debug"):
        print("\rLoading checkpoint shards: 100%", file=sys.stderr)
    assert "Loading checkpoint shards" in capsys.readouterr().err


@pytest.mark.slow
def test_zero3_two_ranks_console_says_each_line_once(tmp_path: Path) -> None:
    """A 2-rank ZeRO-3 run to a pipe: DeepSpeed's call of a renamed torch collective
    (``reduce_scatter_tensor``) shows no FutureWarning, and the data's cuts, which every rank
    computes, are reported by rank 0 alone. One step, then stop: the console of the set-up and
    of a ZeRO-3 step is what is checked."""
    env = {**cpu_env(), "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
    args = [f"output_dir={tmp_path / 'run'}", "ds_config=zero3", "max_length=128"]
    # eval_examples=2: the first held-out prompt (132 tokens) alone cannot fit max_length=128,
    # which set-up refuses (the run's end could not evaluate it)
    args += ["max_steps=2", "stop_after=1", "micro_batch_size=2", "eval_examples=2"]
    result = run_group(["bash", str(REPO / "launch" / "deepspeed.sh"), *args], env, timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert "FutureWarning" not in log, log
    lines = log.splitlines()
    assert sum(line.startswith("max_length=128: dropped ") for line in lines) == 1, log
    assert len(set(lines)) == len(lines), log  # no line said by both ranks
