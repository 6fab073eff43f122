"""Non-finite losses and gradients: a bad step is skipped on every rank, as if it never was;
a run that keeps producing them stops with one error line; exports refuse non-finite weights.

Real 2-rank jobs (CPU ranks over gloo). The NaN is injected on one rank at one step by
`tests/workers/nonfinite_train.py` through a global forward hook of torch; the reference is the
same job with that step's micro-batches left out of the data stream and one step fewer, so
"skipped" means: weights, moments, step counts, routing and LR schedule as if the step never
happened, and its batch used up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.launch import BIN, REPO, WORKERS, cpu_env, free_port, run, run_group

# warm-up longer than the run under a constant schedule: the LR changes every step and does not
# depend on max_steps, so a skip that advanced the scheduler would show in the weights
SHORT = [
    "micro_batch_size=2",
    "eval_examples=1",
    "log_every=1",
    "warmup_steps=8",
    "schedule=constant",
    "lr=3e-3",
]


def _worker(out: Path, mode: list[str], args: list[str]) -> None:
    command = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port())]
    run([*command, str(WORKERS / "nonfinite_train.py"), *mode, "--", f"output_dir={out}", *args])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _routing_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "routing.jsonl").read_text().splitlines()[1:]  # after the header
    return [json.loads(line)["step"] for line in lines]


def _assert_same_merged_weights(a: Path, b: Path) -> None:
    wa = load_file(str(a / "merged" / "model.safetensors"))
    wb = load_file(str(b / "merged" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ds_config", "inject", "rank", "step"),
    [
        # ZeRO-2: DeepSpeed skips on the reduced grad norm; the NaN loss has a finite gradient,
        # so only the job's own rule (a non-finite loss makes the gradient NaN) can trigger it
        ("zero2", "inject-loss", 1, 2),
        # no ZeRO: DeepSpeed checks nothing; the job's own check and skip
        ("zero0", "inject-grad", 0, 1),
    ],
)
def test_nonfinite_step_is_skipped_as_if_it_never_was(tmp_path, ds_config, inject, rank, step):
    steps = 4
    injected, reference = tmp_path / "injected", tmp_path / "reference"
    args = [*SHORT, f"ds_config={ds_config}"]
    _worker(injected, [inject, str(rank), str(step)], [*args, f"max_steps={steps}"])
    _worker(reference, ["drop", str(step)], [*args, f"max_steps={steps - 1}"])
    _assert_same_merged_weights(injected, reference)
    metrics = _metrics(injected)
    assert [m["skipped_steps"] for m in metrics] == [int(m["step"] > step) for m in metrics]
    assert "loss" not in metrics[step]  # the skipped step (1-based step + 1) logs no loss
    assert _routing_steps(injected) == [s for s in range(1, steps + 1) if s != step + 1]
    assert all(m["skipped_steps"] == 0 for m in _metrics(reference))


@pytest.mark.slow
def test_diverging_run_stops_with_one_error_line_and_keeps_its_checkpoints(tmp_path):
    """The issue's run: lr=1e9 without clipping diverged and exported a NaN model with exit 0."""
    out = tmp_path / "run"
    env = cpu_env()
    env.update(PYTHON=sys.executable, MASTER_PORT=str(free_port()))
    args = [f"output_dir={out}", "lr=1e9", "gradient_clipping=0", "max_steps=40", "save_every=5"]
    command = ["bash", str(REPO / "launch" / "deepspeed.sh"), *args, "micro_batch_size=2"]
    result = run_group(command, env, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "molf-train: error" in line]
    assert len(errors) == 1 and "training diverged: 10 steps in a row" in errors[0], errors
    assert "Traceback" not in result.stderr
    assert not (out / "merged").exists() and not (out / "outputs.json").exists()
    metrics = _metrics(out)
    assert metrics[-1]["skipped_steps"] >= 9 and len(metrics) < 40 / 5
    kept = sorted((out / "checkpoints").glob("step*"), key=lambda p: int(p.name[4:]))
    assert kept and str(kept[-1]) in errors[0]


def test_exports_refuse_nonfinite_weights(tmp_path) -> None:
    import molf_ds
    from molf_ds import export
    from molf_ds.errors import MoLFError
    from molf_ds.model import molf_layers
    from molf_ds.train.models import load_model

    _, model = load_model("tiny-qwen2")
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=(4,), train_base=False))
    export.export_merged(model, tmp_path / "fine")  # finite: exported
    with torch.no_grad():
        model.model.norm.weight[3] = float("inf")  # outside every MoLF layer: merge never sees it
    with pytest.raises(MoLFError, match="non-finite weights in 1 of .* model.norm.weight"):
        export.export_merged(model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    with torch.no_grad():
        next(molf_layers(model))[1].lora_B[0][0, 0] = float("nan")
    with pytest.raises(MoLFError, match="adapter has non-finite weights"):
        export.export_peft_adapter(model, tmp_path / "adapter", "base")
    assert not (tmp_path / "adapter").exists()
