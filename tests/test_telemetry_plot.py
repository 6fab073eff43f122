"""Tests of `molf_ds.train.telemetry` (metrics and routing logs) and `molf-plot`.

Routing records are built by hand for a fake 2-layer run (q_proj and up_proj per layer), so every
winner pattern the log must encode -- Top-1, Top-K, a module without a winner, non-candidates'
``-inf`` scores -- is known exactly; one test logs real records of `MoLFAdamW` steps.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import molf_ds
from molf_ds.routed_step import RoutingRecord
from molf_ds.train import plot
from molf_ds.train.telemetry import (
    METRICS_FILE,
    ROUTING_FILE,
    MetricsWriter,
    RoutingLog,
    decode_winners,
    encode_winners,
    read_jsonl,
    read_metrics,
    read_routing_log,
)

MODULES = (
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.mlp.up_proj",
    "model.layers.1.self_attn.q_proj",
    "model.layers.1.mlp.up_proj",
)
EXPERTS = ("fft", "lora0", "lora1")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _record(winners: list[list[bool]], scores: list[list[float]]) -> RoutingRecord:
    return RoutingRecord(
        module_names=MODULES,
        expert_names=EXPERTS,
        scores=torch.tensor(scores, dtype=torch.float64),
        winners=torch.tensor(winners, dtype=torch.bool),
        implementation="reference",
    )


def _top1(step: int) -> RoutingRecord:
    """Module m's winner is expert (m + step) % 3; scores make it the top one."""
    winners = [[e == (m + step) % 3 for e in range(3)] for m in range(len(MODULES))]
    scores = [
        [(1.0 if w else 0.1) * 1.23456789e-4 * (m + 1) for w in row]
        for m, row in enumerate(winners)
    ]
    return _record(winners, scores)


def _write_run(run: Path, steps: int = 5) -> None:
    with (
        MetricsWriter(run, enabled=True, tensorboard=False) as metrics,
        RoutingLog(run / ROUTING_FILE, MODULES, EXPERTS) as routing,
    ):
        for step in range(1, steps + 1):
            record = _top1(step)
            values = {"loss": 3.0 / step, "lr": 1e-3, "fft_share": record.fft_share()}
            values["eval_loss"] = 2.5 / step if step % 2 == 0 else None
            metrics.log(step, values)
            routing.append(step, record)


# --- MetricsWriter ----------------------------------------------------------------------------


def test_metrics_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with MetricsWriter(tmp_path, enabled=True) as writer:
        writer.log(1, {"loss": torch.tensor(2.0), "lr": 1e-3, "tokens_per_s": 512.0})
        writer.log(2, {"loss": float("nan"), "fft_share": 0.25, "eval_loss": 1.5, "x": None})
    lines = (tmp_path / METRICS_FILE).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 512.0},
        {"step": 2, "loss": None, "fft_share": 0.25, "eval_loss": 1.5},
    ]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr", "train/fft_share", "eval/loss"} <= set(
        events.Tags()["scalars"]
    )
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [(2, 1.5)]


def test_metrics_disabled_writes_nothing(tmp_path):
    writer = MetricsWriter(tmp_path / "run", enabled=False)
    writer.log(1, {"loss": 1.0})
    writer.close()
    assert not (tmp_path / "run").exists()


def test_metrics_reject_non_numbers(tmp_path):
    writer = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    with pytest.raises(molf_ds.MoLFError, match="'note' must be a number"):
        writer.log(1, {"note": "hello"})
    writer.close()


def test_metrics_resume_rewinds_and_merges(tmp_path):
    for steps in ([1, 2, 3, 4], [3, 4]):  # the second run resumed from step 2's checkpoint
        with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
            for step in steps:
                writer.log(step, {"loss": float(len(steps) * 10 + step)})
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        writer.log(4, {"eval_loss": 7.0})  # eval logged apart, same step
    assert read_metrics(tmp_path / METRICS_FILE) == [
        {"step": 1, "loss": 41.0},
        {"step": 2, "loss": 42.0},
        {"step": 3, "loss": 23.0},
        {"step": 4, "loss": 24.0, "eval_loss": 7.0},
    ]


# --- RoutingLog -------------------------------------------------------------------------------


def test_routing_log_round_trip_top1(tmp_path):
    path = tmp_path / ROUTING_FILE
    records = {step: _top1(step) for step in (1, 2, 3)}
    records[3].scores[:, 0] = -math.inf  # not a candidate
    records[3].winners[:, 0] = False
    records[3].winners[:, 1] = True
    with RoutingLog(path, MODULES, EXPERTS) as log:
        for step, record in records.items():
            log.append(step, record)
    lines = path.read_text().splitlines()
    assert json.loads(lines[1])["winners"] == "1201"  # one character per module
    header, steps = read_routing_log(path)
    assert header["module_names"] == list(MODULES) and header["expert_names"] == list(EXPERTS)
    assert [s.step for s in steps] == [1, 2, 3]
    for s in steps:
        record = records[s.step]
        assert s.winners == record.winners.tolist()
        expected = record.scores.tolist()
        for row, expected_row in zip(s.scores, expected, strict=True):
            for got, want in zip(row, expected_row, strict=True):
                assert got == want if math.isinf(want) else got == pytest.approx(want, rel=5e-4)


def test_routing_log_top_k_masks(tmp_path):
    path = tmp_path / ROUTING_FILE
    winners = [[True, True, False], [False, True, True], [False, False, False], [True, False, True]]
    with RoutingLog(path, MODULES, EXPERTS) as log:
        log.append(7, _record(winners, [[1.0, 2.0, 3.0]] * 4))
    assert json.loads(path.read_text().splitlines()[1])["winner_masks"] == "3605"
    assert read_routing_log(path)[1][0].winners == winners


@pytest.mark.parametrize("num_experts", [1, 4, 5, 9, 40])
def test_winner_encoding_is_lossless(num_experts):
    generator = torch.Generator().manual_seed(num_experts)
    for top_k_like in (False, True):
        if top_k_like:
            winners = (torch.rand(6, num_experts, generator=generator) < 0.4).tolist()
        else:
            index = torch.randint(0, num_experts, (6,), generator=generator)
            winners = torch.nn.functional.one_hot(index, num_experts).bool().tolist()
        encoded = encode_winners(winners)
        assert decode_winners(encoded, 6, num_experts) == winners


def test_routing_log_resume_and_name_check(tmp_path):
    path = tmp_path / ROUTING_FILE
    with RoutingLog(path, MODULES, EXPERTS) as log:
        for step in (1, 2, 3):
            log.append(step, _top1(step))
    with RoutingLog(path, MODULES, EXPERTS) as log:  # resumed from step 1
        log.append(2, _top1(5))
    steps = read_routing_log(path)[1]
    assert [s.step for s in steps] == [1, 2]
    assert steps[1].winners == _top1(5).winners.tolist()
    with pytest.raises(molf_ds.MoLFError, match="new output_dir or delete"):
        RoutingLog(path, MODULES[:2], EXPERTS)
    log = RoutingLog(tmp_path / "other.jsonl", MODULES[:2], EXPERTS)
    with pytest.raises(molf_ds.MoLFError, match="names differ"):
        log.append(1, _top1(1))
    log.close()


def test_routing_log_disabled_writes_nothing(tmp_path):
    with RoutingLog(tmp_path / "run" / ROUTING_FILE, MODULES, EXPERTS, enabled=False) as log:
        log.append(1, _top1(1))
    assert not (tmp_path / "run").exists()


def test_routing_log_of_real_optimizer_steps(tmp_path):
    model = nn.Sequential()
    model.add_module("up_proj", nn.Linear(8, 8))
    model.add_module("down_proj", nn.Linear(8, 4))
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=(2, 4)))
    optimizer = molf_ds.MoLFAdamW(model, lr=1e-2, top_k=2)
    plan = optimizer.plan
    path = tmp_path / ROUTING_FILE
    records = []
    with RoutingLog(path, plan.module_names, plan.expert_names) as log:
        for step in range(1, 4):
            model(torch.randn(3, 8)).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            log.append(step, optimizer.last_routing)
            records.append(optimizer.last_routing.winners.tolist())
    assert [s.winners for s in read_routing_log(path)[1]] == records


def test_read_jsonl_tolerates_a_line_being_written(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    assert read_jsonl(path) == [{"step": 1}]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(molf_ds.MoLFError, match=r"x.jsonl:2: not valid JSON"):
        read_jsonl(path)


# --- molf-plot --------------------------------------------------------------------------------

EXPECTED_PNGS = {
    "loss.png",
    "routing_share.png",
    "routing_heatmap_q_proj.png",
    "routing_heatmap_up_proj.png",
}


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, path


@pytest.mark.slow
def test_molf_plot_cli(tmp_path):
    run = tmp_path / "run"
    _write_run(run)
    out = tmp_path / "plots"
    result = subprocess.run(
        [sys.executable, "-m", "molf_ds.train.plot", str(run), "--out", str(out)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    printed = {Path(line).name for line in result.stdout.splitlines()}
    assert printed == EXPECTED_PNGS == {p.name for p in out.iterdir()}
    for name in EXPECTED_PNGS:
        _assert_png(out / name)


@pytest.mark.slow
def test_molf_plot_bad_input_cli(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "molf_ds.train.plot", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("molf-plot: error: ") and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_molf_plot_metrics_only_run(tmp_path, capsys):
    with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as writer:
        for step in range(1, 4):
            writer.log(step, {"loss": 1.0 / step})
    assert plot.main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(tmp_path / "loss.png")]
    assert "routing plots skipped" in captured.err
    _assert_png(tmp_path / "loss.png")


def _empty_metrics(run: Path) -> None:
    (run / METRICS_FILE).write_text("")


def _header_only_routing(run: Path) -> None:
    _write_run(run)
    RoutingLog(run / "fresh.jsonl", MODULES, EXPERTS).close()
    (run / "fresh.jsonl").replace(run / ROUTING_FILE)


def _no_loss(run: Path) -> None:
    (run / METRICS_FILE).write_text('{"step": 1, "lr": 0.1}\n')


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda run: run.rmdir(), "is not a directory"),
        (lambda run: None, "has neither metrics.jsonl nor routing.jsonl"),
        (_empty_metrics, "no 'loss' values"),
        (_no_loss, "no 'loss' values"),
        (_header_only_routing, "has no steps yet"),
        (lambda run: (run / ROUTING_FILE).write_text("\n"), "routing.jsonl is empty"),
    ],
    ids=["missing_dir", "no_logs", "empty_metrics", "no_loss", "no_steps", "empty_routing"],
)
def test_molf_plot_bad_input(tmp_path, capsys, prepare, message):
    run = tmp_path / "run"
    run.mkdir()
    prepare(run)
    assert plot.main([str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("molf-plot: error: ") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not list(tmp_path.rglob("*.png"))  # checked before writing anything
