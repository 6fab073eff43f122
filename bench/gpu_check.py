"""The GPU check: what a lent GPU is for, as one command; prints one JSON line per check.

    bench/gpu_check.sh               # on the GPU machine (installs the carried wheels, then this)
    bench/gpu_check.sh --dry-run     # every step on the CPU with small sizes (also: DEVICE=cpu)

Each check runs in a subprocess with a time limit, so a check that fails or hangs costs at most
its limit and the next one still runs; the whole stays within ``--budget-s`` (default 450 s: under
8 minutes with the wheels' installation). A dry run on a CPU machine (2 busy cores) is slower
than the GPU machine: its limits are 4x, its budget 1800 s. In order:

- ``environment``: python, torch, the GPU, DeepSpeed, transformers; whether ``nvcc`` and ``g++``
  exist (DeepSpeed's ops compile with them on first use).
- ``ds_op`` (one line per op, built in the background while ``exactness`` runs): DeepSpeed's
  FusedAdam and CPU Adam ops loaded or compiled, timed (on CPU ranks only CPU Adam: molf-train
  runs torch's AdamW there); where one cannot build, molf-train's baselines fall back to torch's
  AdamW and say so. The build is never killed: ninja puts the compilers in process groups of
  their own, so a killed build would leave them running and its lock file behind, and every
  later load of the op would wait on that lock.
- ``exactness`` (one line per implementation): bench/gpu_exactness.py, MoLFAdamW on the GPU
  (multi-tensor and reference paths; the fused kernel on the CPU) against the float64 CPU
  reference of tests/test_optimizer_exactness.py.
- ``zero``: tests/workers/zero_train.py on one GPU rank (ZeRO-2, ZeRO-3, optimizer and parameter
  offload, the FFT baseline with DeepSpeed's Adam) against one plain CPU process: within 1e-5,
  the same winners.
- ``optimizer_step``: bench/optimizer_step.py on ~1.1B parameters, MoLFAdamW against torch's fused
  AdamW (targets: at most 1.5x when FFT wins, 1.0x when LoRA wins); ``kernel_launches`` from the
  same run: kernels and launch calls per step (torch.profiler) of MoLF and of fused AdamW.
- ``offload_step`` (one line per case): bench/offload_step.py, MoLF's engine step under ZeRO-2
  and ZeRO-3 offload (``offload_optimizer``, and with ``offload_param``), LoRA winning, with the
  selective copy-back and with DeepSpeed's full copy, against FFT with DeepSpeed's CPU Adam, and
  the bytes copied back into the model's parameters per step (host-to-device on a GPU).
- ``train`` (one line per model): bench/train_loop.py, molf-train's loop on one GPU in bf16,
  tokens/s of ``mode=molf`` and ``mode=fft``: tiny-qwen2, then the random-qwen2.5 presets in
  increasing size while the previous pair took at most 2 minutes and the budget lasts.
- ``molf_train``: one whole ``python -m molf_ds.train`` run (tiny-qwen2, defaults: bf16, ZeRO-2,
  checkpoint, merged export, evaluation) on the GPU.
- ``fsdp2``: tests/workers/fsdp2_train.py on one GPU rank under ``fully_shard`` over NCCL (MoLF,
  top-2 PFN, MoLF-Efficient, the multi-tensor path, ``CPUOffloadPolicy`` with the score
  all-reduce's trip through the GPU) against one plain CPU process (within 1e-5 of each
  tensor's largest value, the same winners); bf16 ``MixedPrecisionPolicy`` against one CPU rank
  under the same policy (the tests' bf16 criteria).
- ``fsdp2_trainer``: tests/workers/hf_trainer.py with the Trainer's FSDP2 on one GPU rank, by
  accelerate's own FSDP path (on CPU ranks accelerate drops FSDP; the tests switch it on by
  hand): against one plain CPU Trainer (within 1e-5, the same routing logs), a DCP checkpoint
  resumed by a new Trainer, and a bf16 run (fp32 shards, within 5e-2).

``--only fsdp2`` runs the environment line and the two FSDP2 checks alone (about 2 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ZERO_CASES = "z2,z3,z2_offload,z3_offload_param,fft_z2,fft_z2_offload"
GPU_PRESETS = ["tiny-qwen2", "random-qwen2.5-0.5b", "random-qwen2.5-3b"]
PAIR_LIMIT_S = 120  # a model's fft + molf runs: the "2-minute budget"


class Checks:
    """Runs the checks one after another within a deadline and prints their lines."""

    def __init__(self, budget_s: float, device: str, dry_run: bool) -> None:
        self.deadline = time.monotonic() + budget_s
        self.device = device
        self.dry_run = dry_run
        self.slowness = 4.0 if dry_run else 1.0  # time limits are for the GPU machine
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(REPO), self.env.get("PYTHONPATH", "")] if p
        )
        if device == "cpu":
            self.env["DS_ACCELERATOR"] = "cpu"
        self.all_ok = True

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def emit(self, line: dict) -> None:
        if line.get("ok") is False:
            self.all_ok = False
        print(json.dumps(line), flush=True)

    def run(self, command: list[str], limit_s: float, **env: str) -> dict:
        """``command`` (with ``env`` added to the environment) in a process group of its own, for
        at most ``limit_s`` and the budget: ``{"rc", "seconds", "lines" (its JSON lines), "tail"
        (the end of its stderr)}``."""
        limit = max(1.0, min(limit_s * self.slowness, self.remaining()))
        started = time.monotonic()
        with subprocess.Popen(
            command,
            cwd=REPO,
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as proc:
            try:
                out, err = proc.communicate(timeout=limit)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                out, err = proc.communicate()
                rc = "timeout"
        return {
            "rc": rc,
            "seconds": round(time.monotonic() - started, 1),
            "lines": json_lines(out),
            "tail": " | ".join(err.strip().splitlines()[-3:])[-600:],
        }

    def run_steps(self, check: str, steps: list[tuple]) -> float | None:
        """Run ``(step, command, limit_s, env)`` in order; the seconds they took, or None after
        reporting the first that failed (``check`` failed at ``step``)."""
        seconds = 0.0
        for step, command, limit, env in steps:
            done = self.run(command, limit, **env)
            seconds += done["seconds"]
            if done["rc"] != 0:
                self.failed(check, done, step=step)
                return None
        return seconds

    def failed(self, check: str, done: dict, **extra) -> None:
        self.emit(
            {
                "check": check,
                "ok": False,
                "rc": done["rc"],
                "seconds": done["seconds"],
                "error": done["tail"],
                **extra,
            }
        )

    def skipped(self, check: str, why: str, **extra) -> None:
        self.emit({"check": check, "ok": None, "skipped": why, **extra})


def json_lines(text: str) -> list[dict]:
    """The JSON objects among ``text``'s lines (a Trainer prints its logs as Python dicts)."""
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                found.append(json.loads(line))
    return found


def environment(setup_s: float | None) -> dict:
    import torch

    line = {
        "check": "environment",
        "ok": True,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count(),
        "nvcc": shutil.which("nvcc")
        or (
            os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
            if "CUDA_HOME" in os.environ
            else None
        ),
        "gxx": shutil.which("g++") or shutil.which("c++"),
        "wheels_install_s": setup_s,
    }
    for module in ("deepspeed", "transformers", "peft", "pydantic"):
        try:
            with contextlib.redirect_stdout(sys.stderr):  # (DeepSpeed logs to stdout)
                line[module] = __import__(module).__version__
        except Exception as err:  # noqa: BLE001 - report what is missing, go on
            line[module] = None
            line["ok"] = False
            line.setdefault("missing", []).append(f"{module}: {err}")
    return line


DS_OP_SCRIPT = """
import json, time
from deepspeed.accelerator import get_accelerator
on_cpu = get_accelerator().device_name() == "cpu"
for name in ("CPUAdamBuilder",) if on_cpu else ("FusedAdamBuilder", "CPUAdamBuilder"):
    started = time.monotonic()
    line = {"check": "ds_op", "op": name, "accelerator": get_accelerator().device_name()}
    try:
        get_accelerator().create_op_builder(name).load(verbose=False)
        line["ok"] = True
    except Exception as err:
        line["ok"] = False
        line["error"] = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
    line["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(line), flush=True)
"""


def ds_ops(checks: Checks, ops: subprocess.Popen, limit_s: float) -> None:
    """The op builds' lines once they finish, or a line saying they are still running (they go
    on: later loads of an op wait for its build, then find it built)."""
    try:
        out, _ = ops.communicate(timeout=max(1.0, min(limit_s, checks.remaining())))
    except subprocess.TimeoutExpired:
        return checks.emit(  # (its lines follow at the end)
            {"check": "ds_op", "ok": None, "pending": f"still building after {limit_s:.0f} s"}
        )
    for line in out.splitlines():
        if line.startswith("{"):
            checks.emit(json.loads(line))


def exactness(checks: Checks) -> None:
    done = checks.run([sys.executable, "-m", "bench.gpu_exactness", "--device", checks.device], 120)
    for line in done["lines"]:
        checks.emit(line)
    if done["rc"] != 0 or not done["lines"]:
        checks.failed("exactness", done)


def zero(checks: Checks, out: Path) -> None:
    """One GPU rank under ZeRO against one plain CPU process (zero_train.py's own compare)."""
    worker = str(REPO / "tests" / "workers" / "zero_train.py")
    common = ["--cases", ZERO_CASES, "--data-world", "1"]
    reference = [sys.executable, worker, "--reference", "--out", str(out / "ref"), *common]
    done = checks.run(reference, 60, CUDA_VISIBLE_DEVICES="")  # the plain process: on the CPU
    if done["rc"] != 0:
        return checks.failed("zero", done, step="reference")
    # here, not at the top: the orchestrator itself stays free of torch (molf_ds imports it)
    from molf_ds.train.distributed import free_port

    launcher = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1"]
    launcher += ["--master_port", str(free_port())]
    done = checks.run([*launcher, worker, "--out", str(out / "gpu"), *common], 150)
    if done["rc"] != 0:
        return checks.failed("zero", done, step="deepspeed")
    compared = checks.run(
        [sys.executable, worker, "--compare", str(out / "ref"), "--out", str(out / "gpu"), *common],
        30,
    )
    if compared["rc"] != 0 or not compared["lines"]:
        return checks.failed("zero", compared, step="compare")
    import torch

    report = compared["lines"][0]
    for case in report:
        result = torch.load(out / "gpu" / f"{case}.pt", weights_only=False)
        report[case]["optimizer"] = result.get("basic_optimizer")
        report[case]["implementation"] = result.get("implementation")
    checks.emit(
        {
            "check": "zero",
            "ok": all(r["ok"] for r in report.values()),
            "device": checks.device,
            "seconds": done["seconds"],
            "cases": report,
        }
    )


def optimizer_step(checks: Checks) -> None:
    small = "--layers 2 --hidden 128 --mlp 352 --rank 8 --repeats 3 --burn-in 1"
    large = "--layers 20 --hidden 2048 --mlp 5632 --rank 64 --repeats 10 --burn-in 3"
    size = (small if checks.dry_run else large).split()
    command = [
        sys.executable,
        "-m",
        "bench.optimizer_step",
        "--device",
        checks.device,
        *size,
        "--kernels",
        "--targets",
        "1.5,1.0",
    ]
    done = checks.run(command, 150)
    if done["rc"] != 0 or not done["lines"]:
        return checks.failed("optimizer_step", done)
    result = done["lines"][0]
    launches = {case: result[case].pop("kernels_per_step") for case in ("fft_wins", "lora_wins")}
    checks.emit(
        {
            "check": "optimizer_step",
            # the targets are for ~1B parameters on a GPU; a dry run's tiny CPU case only runs
            "ok": True if checks.dry_run else result["meets_targets"],
            "seconds": done["seconds"],
            **result,
        }
    )
    checks.emit(
        {
            "check": "kernel_launches",
            "ok": True,
            "device": checks.device,
            "routed_modules": result["routed_modules"],
            "per_step": launches,
        }
    )


def offload_step(checks: Checks) -> None:
    """bench/offload_step.py on one GPU rank: MoLF's engine step under ZeRO-Offload (the selective
    copy-back, and DeepSpeed's full copy) against FFT with DeepSpeed's CPU Adam; on a GPU the
    copy-back is host-to-device traffic, where skipping what did not move saves the most."""
    small = "--layers 2 --hidden 128 --mlp 352 --repeats 3 --burn-in 1"
    large = "--layers 8 --hidden 2048 --mlp 5632 --repeats 6 --burn-in 2"
    size = (small if checks.dry_run else large).split()
    cases = "zero2:16:lora,zero3_all:16:lora"
    done = checks.run([sys.executable, "-m", "bench.offload_step", *size, "--cases", cases], 180)
    if done["rc"] != 0 or not done["lines"]:
        return checks.failed("offload_step", done)
    for result in done["lines"]:
        result.pop("benchmark")
        checks.emit(
            {
                "check": "offload_step",
                # the targets are for this model size on a GPU; a dry run's tiny case only runs
                "ok": True if checks.dry_run else result["meets_target"],
                "seconds": done["seconds"],
                **result,
            }
        )


def train(checks: Checks, presets: list[str], steps: dict[str, int], micro: int) -> None:
    """fft and molf on each preset in turn; the next, larger one only if this pair fit in
    `PAIR_LIMIT_S` and the budget still holds a pair."""
    pair_limit = PAIR_LIMIT_S * checks.slowness
    for model in presets:
        if checks.remaining() < pair_limit:
            return checks.skipped("train", "budget", model=model)
        runs, started = {}, time.monotonic()
        for mode in ("fft", "molf"):
            command = [
                sys.executable,
                "-m",
                "bench.train_loop",
                f"model={model}",
                f"mode={mode}",
                f"max_steps={steps[model]}",
                f"micro_batch_size={micro}",
            ]
            left = pair_limit - (time.monotonic() - started)
            done = checks.run(command, max(left / checks.slowness, 1.0))
            if done["rc"] != 0 or not done["lines"]:
                return checks.failed("train", done, model=model, mode=mode)
            runs[mode] = done["lines"][0]
        pair_s = round(time.monotonic() - started, 1)
        tokens = {mode: round(r["tokens_per_s"], 1) for mode, r in runs.items()}
        checks.emit(
            {
                "check": "train",
                "ok": True,
                "model": model,
                "trainable_params": runs["fft"]["trainable_params"],
                "bf16": runs["fft"]["bf16"],
                "tokens_per_s": tokens,
                "molf_over_fft": round(tokens["molf"] / tokens["fft"], 3),
                "optimizer": {mode: r["optimizer"] for mode, r in runs.items()},
                "peak_gpu_bytes": {mode: r["peak_gpu_bytes"] for mode, r in runs.items()},
                "steps": steps[model],
                "micro_batch_size": micro,
                "pair_s": pair_s,
                "fits_2_min": pair_s <= PAIR_LIMIT_S,
            }
        )
        if pair_s > pair_limit:
            return


def molf_train(checks: Checks, out: Path, steps: int, micro: int) -> None:
    run_dir = out / "molf_train"
    command = [
        sys.executable,
        "-m",
        "molf_ds.train",
        f"output_dir={run_dir}",
        f"max_steps={steps}",
        f"micro_batch_size={micro}",
        "eval_examples=2",
        f"log_every={steps}",
    ]
    done = checks.run(command, 120)
    outputs = run_dir / "outputs.json"
    if done["rc"] != 0 or not outputs.is_file():
        return checks.failed("molf_train", done)
    written = json.loads(outputs.read_text())
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    checks.emit(
        {
            "check": "molf_train",
            "ok": all(Path(written[k]).exists() for k in ("checkpoint", "merged_model")),
            "seconds": done["seconds"],
            "optimizer": written.get("optimizer"),
            "eval_loss": written.get("eval_eval_loss", written.get("eval_loss")),
            "final_metrics": metrics[-1],
        }
    )


FSDP2_CASES = "molf,pfn_top2,efficient,foreach,offload"
FSDP2_RTOL = 1e-5  # of each tensor's largest value: GPU and CPU sum in other orders
BF16_AGREE, BF16_ATOL = 0.75, 3e-2  # tests/test_fsdp2.py's bf16 criteria
TRAINER_ATOL, TRAINER_BF16_ATOL = 1e-5, 5e-2


def torchrun(ranks: int = 1) -> list[str]:
    from molf_ds.train.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
            "--master_port", str(free_port())]  # fmt: skip


def fsdp2(checks: Checks, out: Path) -> None:
    """fsdp2_train.py on one rank of ``checks.device`` (NCCL on a GPU) against one plain CPU
    process; its bf16 case against one CPU rank (gloo) under the same policy."""
    worker = str(REPO / "tests" / "workers" / "fsdp2_train.py")
    cpu = {"CUDA_VISIBLE_DEVICES": ""}
    steps = [
        ("reference", [sys.executable, worker, "--reference", "--out", str(out / "fsdp2_ref"),
                       "--cases", FSDP2_CASES], 60, cpu),
        ("bf16_reference", [*torchrun(), worker, "--out", str(out / "fsdp2_ref_bf16"),
                            "--cases", "bf16"], 60, cpu),
        ("device", [*torchrun(), worker, "--device", checks.device, "--out", str(out / "fsdp2"),
                    "--cases", f"{FSDP2_CASES},bf16"], 120, {}),
    ]  # fmt: skip
    seconds = checks.run_steps("fsdp2", steps)
    if seconds is None:
        return
    reports = {}
    for reference, cases in (("fsdp2_ref", FSDP2_CASES), ("fsdp2_ref_bf16", "bf16")):
        compared = checks.run([sys.executable, worker, "--compare", str(out / reference),
                               "--out", str(out / "fsdp2"), "--cases", cases,
                               "--rtol", str(FSDP2_RTOL)], 30)  # fmt: skip
        if compared["rc"] != 0 or not compared["lines"]:
            return checks.failed("fsdp2", compared, step="compare")
        reports.update(compared["lines"][0])
    bf16 = reports["bf16"]
    bf16["ok"] = (
        bf16["winner_agreement"] >= BF16_AGREE
        and bf16["max_param_abs_difference"] <= BF16_ATOL
        and bf16["float32_params"]
    )
    checks.emit(
        {
            "check": "fsdp2",
            "ok": all(r["ok"] for r in reports.values()),
            "device": checks.device,
            "backend": "nccl" if checks.device == "cuda" else "gloo",
            "seconds": round(seconds, 1),
            "cases": reports,
        }
    )


def fsdp2_trainer(checks: Checks, out: Path) -> None:
    """The Trainer's FSDP2 on one rank of ``checks.device`` against one plain CPU Trainer."""
    worker = str(REPO / "tests" / "workers" / "hf_trainer.py")
    cpu = {"CUDA_VISIBLE_DEVICES": ""}
    base = ["--base", str(out / "hf_base"), "--micro", "4"]
    resumed = out / "hf_fsdp2_resumed"
    steps = [
        ("base", [sys.executable, worker, "base", str(out / "hf_base")], 60, cpu),
        ("plain", [sys.executable, worker, "train", *base, "--out", str(out / "hf_plain")],
         90, cpu),
        ("fsdp2", [*torchrun(), worker, "train", *base, "--fsdp", "--out", str(out / "hf_fsdp2"),
                   "--save-steps", "2", "--and-resume", str(resumed)], 150, {}),
        ("fsdp2_bf16", [*torchrun(), worker, "train", *base, "--fsdp", "--bf16",
                        "--out", str(out / "hf_fsdp2_bf16")], 90, {}),
    ]  # fmt: skip
    seconds = checks.run_steps("fsdp2_trainer", steps)
    if seconds is None:
        return
    import torch

    def load(name: str | Path) -> dict:
        return torch.load(out / name / "result.pt", weights_only=False)

    def max_difference(run: dict, reference: dict) -> float:
        return max(
            (run["params"][n].float() - p).abs().max().item()
            for n, p in reference["params"].items()
        )

    def routing(run: dict) -> list:
        return [
            {k: v for k, v in e.items() if k.startswith("molf/")}
            for e in run["log_history"]
            if "loss" in e
        ]

    plain, run, again, bf16 = (load(n) for n in ("hf_plain", "hf_fsdp2", resumed, "hf_fsdp2_bf16"))
    line = {
        "check": "fsdp2_trainer",
        "device": checks.device,
        "seconds": round(seconds, 1),
        # on a GPU, accelerate's own FSDP2 path (not the CPU tests' switch)
        "accelerate_fsdp2": run["accelerate_fsdp2"],
        "switched_on_by_hand": run["fsdp_switched_on_by_hand"],
        "max_param_difference": max_difference(run, plain),
        "same_routing": routing(run) == routing(plain),
        "resumed_max_param_difference": max_difference(again, run),
        "bf16_max_param_difference": max_difference(bf16, plain),
        "bf16_float32_params": all(p.dtype == torch.float32 for p in bf16["params"].values()),
        "bf16_param_dtype": bf16["fsdp_param_dtype"],  # MixedPrecisionPolicy's compute dtype
        "bf16_losses": [e["loss"] for e in bf16["log_history"] if "loss" in e],
    }
    line["ok"] = (
        run["accelerate_fsdp2"]
        and run["fsdp_switched_on_by_hand"] == (checks.device == "cpu")
        and line["max_param_difference"] <= TRAINER_ATOL
        and line["same_routing"]
        and line["resumed_max_param_difference"] <= TRAINER_ATOL
        and line["bf16_max_param_difference"] <= TRAINER_BF16_ATOL
        and line["bf16_float32_params"]
        and line["bf16_param_dtype"] == "torch.bfloat16"
    )
    checks.emit(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, small sizes")
    parser.add_argument("--budget-s", type=float, help="default: 450 (GPU), 1800 (dry run)")
    parser.add_argument("--setup-s", type=float, help="(gpu_check.sh) the wheels' install time")
    parser.add_argument("--only", choices=["fsdp2"], help="the environment line and these checks")
    args = parser.parse_args()
    device = "cpu" if args.dry_run or os.environ.get("DEVICE") == "cpu" else "cuda"
    dry_run = device == "cpu"
    budget = args.budget_s or (1800.0 if dry_run else 450.0)
    checks = Checks(budget, device, dry_run)
    started = time.monotonic()
    env = environment(args.setup_s)
    checks.emit(env)
    if device == "cuda" and not env["gpu"]:
        checks.emit({"check": "summary", "ok": False, "error": "no CUDA GPU: use --dry-run"})
        sys.exit(1)
    out = Path(tempfile.mkdtemp(prefix="molf-gpu-check-"))
    if args.only == "fsdp2":
        fsdp2(checks, out)
        fsdp2_trainer(checks, out)
        return finish(checks, out, device, started)
    ops = subprocess.Popen(  # compiles on the CPU cores while exactness runs on the GPU
        [sys.executable, "-c", DS_OP_SCRIPT],
        cwd=REPO,
        env=checks.env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    exactness(checks)
    ds_ops(checks, ops, limit_s=180 * checks.slowness)
    zero(checks, out)
    optimizer_step(checks)
    offload_step(checks)
    if dry_run:
        train(checks, ["tiny-qwen2"], {"tiny-qwen2": 4}, micro=2)
        molf_train(checks, out, steps=2, micro=2)
    else:
        steps = {"tiny-qwen2": 40, "random-qwen2.5-0.5b": 30, "random-qwen2.5-3b": 20}
        train(checks, GPU_PRESETS[:1], steps, micro=8)
        molf_train(checks, out, steps=10, micro=8)
    fsdp2(checks, out)
    fsdp2_trainer(checks, out)
    if not dry_run:
        train(checks, GPU_PRESETS[1:], steps, micro=8)
    if ops.returncode is None:  # (never killed, see ds_op above)
        ds_ops(checks, ops, limit_s=checks.remaining())
    finish(checks, out, device, started)


def finish(checks: Checks, out: Path, device: str, started: float) -> None:
    """The summary line; exits 0 when every check passed."""
    shutil.rmtree(out, ignore_errors=True)
    checks.emit(
        {
            "check": "summary",
            "ok": checks.all_ok,
            "device": device,
            "seconds": round(time.monotonic() - started, 1),
        }
    )
    sys.exit(0 if checks.all_ok else 1)


if __name__ == "__main__":
    main()
