"""MoLF's engine step under ZeRO-Offload against FFT with DeepSpeed's CPU Adam; one JSON line per
case.

    DS_ACCELERATOR=cpu .venv/bin/python -m bench.offload_step          # every case, 1 CPU rank
    DS_ACCELERATOR=cpu .venv/bin/python -m bench.offload_step --cases zero2:16:lora --profile
    python3 -m bench.offload_step --layers 16 --hidden 2048 --mlp 5632   # on a GPU (gpu_check)

Each case (``config:rank:winner``) builds, in one process per rank, three engines on the same
Qwen2-like model (``--layers`` decoder layers, hidden ``--hidden``, MLP ``--mlp``, vocabulary
``--vocab``; `bench.zero_worker.qwen2_like`) with the shipped DeepSpeed config ``config``
(``zero2`` = ``zero2_offload``, ``zero3`` = ``zero3_offload``, ``zero3_all`` =
``zero3_offload_all``, which also offloads the parameters):

- ``molf``: `molf_ds.initialize` with `MoLFAdamW` (LoRA rank ``rank`` on all seven projections),
  molf_ds's offloaded step on (`molf_ds.ds_partitions.install_copy_back`: the selective
  copy-back, the clip factor in pass 1, ZeRO-3's persistent parameters kept gathered);
- ``molf_full_copy``: the same with ``MOLF_DS_COPY_BACK=full``, DeepSpeed's own offloaded step
  (full copy-back, clip pass, ZeRO-3's release and re-gather of persistent parameters);
- ``fft``: the plain model, DeepSpeed's ``optimizer`` section (``AdamW``), so DeepSpeed builds
  ``DeepSpeedCPUAdam``: what a DeepSpeed user gets.

The routing is forced by the learning rates (EPD scores scale with them): ``lora`` wins with
lr 1e-7 and lora_lr 1e-3, ``fft`` with lr 1e-3 and lora_lr 1e-7; the measured FFT share is
reported, so the case is checked, not assumed. The engines take turns, step by step, on the same
batches (forward and backward untimed, then ``engine.step()`` timed), so the machine's load
falls on all three alike; the medians and their ratios are reported. ``copy_back_bytes_per_step``
is measured (`molf_ds.testing.CopiedBytes`: what ``copy_`` writes into the model's parameter
partitions during one more step of each engine). ``--profile`` adds where each engine's step
goes (wall time of DeepSpeed's and MoLF's parts, medians of the timed steps: it wraps them, so
its steps are timed apart from the ratios'). The byte bound of each case is computed from the
parameter counts (docs/performance.md, "ZeRO-Offload").

Without ``LOCAL_RANK`` in the environment it starts itself through the deepspeed launcher
(``--ranks`` ranks; CPU ranks split the cores as threads) and prints what rank 0 writes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

CASES = (
    "zero2:16:lora",
    "zero2:64:lora",
    "zero3:16:lora",
    "zero3:64:lora",
    "zero3_all:16:lora",
    "zero3_all:64:lora",
    "zero2:16:fft",
    "zero3:16:fft",
)
CONFIGS = {"zero2": "zero2_offload", "zero3": "zero3_offload", "zero3_all": "zero3_offload_all"}
TARGETS = {("lora", 16): 0.85, ("lora", 64): 1.0, ("fft", 16): 1.25, ("fft", 64): 1.25}
LEARNING_RATES = {"lora": (1e-7, 1e-3), "fft": (1e-3, 1e-7)}  # (lr, lora_lr)
ENGINES = ("molf", "molf_full_copy", "fft")


def build_engine(args: argparse.Namespace, name: str, config: str, rank: int, winner: str):
    import deepspeed
    import torch.distributed as tdist

    import molf_ds
    from bench.zero_worker import qwen2_like
    from molf_ds import ds_partitions
    from molf_ds.zero import fill_auto

    ds_config = fill_auto(
        config,
        micro_batch_size=args.micro,
        gradient_accumulation_steps=1,
        world_size=tdist.get_world_size(),
        gradient_clipping=1.0,
        bf16=False,
    )
    model = qwen2_like(args)
    if name == "fft":
        ds_config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
        ds_config["zero_allow_untested_optimizer"] = True
        params = list(model.parameters())
        engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=params)
        return engine, None
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=(rank,)))
    lr, lora_lr = LEARNING_RATES[winner]
    optimizer = molf_ds.MoLFAdamW(model, lr=lr, lora_lr=lora_lr)
    os.environ[ds_partitions.COPY_BACK_ENV] = "full" if name == "molf_full_copy" else "selective"
    try:
        engine, *_ = molf_ds.initialize(model=model, optimizer=optimizer, config=ds_config)
    finally:
        os.environ.pop(ds_partitions.COPY_BACK_ENV)
    return engine, optimizer


def train_step(engine: Any, tokens: Any) -> float:
    """Forward and backward (untimed), then ``engine.step()``; returns the step's seconds."""
    loss = engine(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
    engine.backward(loss)
    synchronize()
    start = time.perf_counter()
    engine.step()
    synchronize()
    return time.perf_counter() - start


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Profile:
    """Wall time of the named parts of an engine's step, by wrapping them on the instances and
    modules that call them (bench-only instrumentation; the library is unchanged)."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attribute: str, part: str) -> None:
        original = getattr(owner, attribute, None)
        if original is None:
            return
        had_own = attribute in getattr(owner, "__dict__", {})

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[part].append(time.perf_counter() - start)

        setattr(owner, attribute, timed)
        if had_own:
            self.undo.append(lambda: setattr(owner, attribute, original))
        else:
            self.undo.append(lambda: delattr(owner, attribute))

    def engine(self, engine: Any, optimizer: Any) -> None:
        """DeepSpeed's parts (norm, clip, the client step, the copy-back, bookkeeping) and, for
        MoLF, the routed step's (segments, pass 1, routing with its all-reduce, pass 2)."""
        from molf_ds import cpu_kernel, ds_partitions, routed_step

        zero = engine.optimizer
        parts = {
            "step": "engine_step",
            "_optimizer_step": "client_step",
            "scaled_global_norm": "deepspeed_grad_norm",
            "_get_norm_groups": "deepspeed_grad_norm",
            "unscale_and_clip_grads": "deepspeed_unscale_clip",
            "_update_model_bit16_weights": "deepspeed_relink_params",
            "_reassign_or_swap_out_partitioned_parameters": "copy_back",
            "_post_step": "deepspeed_post_step",
            "_pre_step": "deepspeed_pre_step",
            "_partition_all_parameters": "deepspeed_partition_params",
        }
        for attribute, part in parts.items():
            self.wrap(zero, attribute, part)
        if optimizer is None:
            return
        # on the source's class: the copy-back reads attributes of the source instance itself
        self.wrap(type(optimizer.segment_source), "__call__", "molf_segments")
        self.wrap(optimizer, "reduce_scores", "molf_score_all_reduce")
        self.wrap(cpu_kernel.Batch, "moments_and_partials", "molf_pass1")
        self.wrap(cpu_kernel.Batch, "apply_update", "molf_pass2")
        self.wrap(routed_step, "_route", "molf_route")
        self.wrap(ds_partitions, "_copy_spans", "molf_copy_spans")  # inside ZeRO-3's copy_back

    def medians_ms(self, skip: int) -> dict[str, float]:
        out = {}
        for part, values in self.seconds.items():
            # parts called more than once a step (two norm helpers) add up per step
            per_step = len(values) // max(1, len(self.seconds["engine_step"]))
            totals = [sum(values[i : i + per_step]) for i in range(0, len(values), per_step)]
            out[part] = round(statistics.median(totals[skip:] or totals) * 1e3, 3)
        return out

    def remove(self) -> None:
        while self.undo:
            self.undo.pop()()


def measured_copy_bytes(engine: Any, tokens: Any) -> int:
    """What ``copy_`` writes into the model's parameter partitions during one step."""
    from molf_ds import ds_partitions
    from molf_ds.testing import CopiedBytes

    with CopiedBytes([lp for lp, _ in ds_partitions.model_partitions(engine)]) as copied:
        train_step(engine, tokens)
    return copied.bytes


def byte_bound(plan: Any, base_numel: int, lora_numel: int, winner: str) -> dict:
    """The step's bytes per the model's counts, MoLF over CPU Adam, with DeepSpeed's gradient
    norm (4 bytes a parameter, both pay it) and its clip (8 bytes: a pass over the gradients;
    MoLF's pass 1 applies the factor as it reads them, `MoLFAdamW.grad_factor`, so only FFT
    pays it) and without (``optimizer_only``); the copy-back writes 4 and reads 4 bytes per
    copied parameter (fp32 model on the CPU; on a GPU it is host-to-device traffic)."""
    total = base_numel + lora_numel
    routed_fft = sum(row[0] for row in plan.expert_numel)
    unrouted = base_numel - routed_fft  # embeddings, norms: updated every step
    changed = (lora_numel if winner == "lora" else routed_fft) + unrouted
    fft_bytes = {"adam": 28 * base_numel, "copy": 8 * base_numel, "norm_clip": 12 * base_numel}
    molf_bytes = {
        "pass1": 20 * total + 8 * unrouted,  # unrouted take their update in pass 1
        "pass2": 16 * (changed - unrouted),
        "copy": 8 * changed,
        "norm": 4 * total,
    }
    full_copy = {**molf_bytes, "copy": 8 * total, "clip": 8 * total}  # DeepSpeed's own path
    return {
        "molf_over_fft": round(sum(molf_bytes.values()) / sum(fft_bytes.values()), 3),
        "molf_full_copy_over_fft": round(sum(full_copy.values()) / sum(fft_bytes.values()), 3),
        "optimizer_only_molf_over_cpu_adam": round(
            (molf_bytes["pass1"] + molf_bytes["pass2"]) / fft_bytes["adam"], 3
        ),
    }


def run_case(args: argparse.Namespace, case: str) -> dict:
    import torch
    import torch.distributed as tdist

    from molf_ds import ds_partitions

    config_key, rank_text, winner = case.split(":")
    rank = int(rank_text)
    engines = {
        name: build_engine(args, name, CONFIGS[config_key], rank, winner) for name in ENGINES
    }
    molf, optimizer = engines["molf"]
    generator = torch.Generator().manual_seed(tdist.get_rank())
    device = molf.device

    def batch():
        tokens = torch.randint(0, 256, (args.micro, args.seq + 1), generator=generator)
        return tokens.to(device)

    times: dict[str, list[float]] = {name: [] for name in ENGINES}
    for round_ in range(args.burn_in + args.repeats):
        tokens = batch()
        # each round in another order, so no engine always runs right after the same one
        order = ENGINES[round_ % 3 :] + ENGINES[: round_ % 3]
        for name in order:
            elapsed = train_step(engines[name][0], tokens)
            if round_ >= args.burn_in:
                times[name].append(elapsed)
    medians = {name: statistics.median(t) for name, t in times.items()}
    copy_back = ds_partitions.copy_back_of(optimizer)
    tokens = batch()
    copied = {name: measured_copy_bytes(engines[name][0], tokens) for name in ENGINES}
    plan = optimizer.plan
    numel = [getattr(p, "ds_numel", p.numel()) for p in plan.params]  # ZeRO-3: partitioned
    lora_numel = sum(n for n, r in zip(numel, plan.roles, strict=True) if r.is_lora)
    base_numel = sum(numel) - lora_numel
    record = {
        "benchmark": "offload_step",
        "case": case,
        "config": CONFIGS[config_key],
        "lora_rank": rank,
        "winner": winner,
        "ranks": tdist.get_world_size(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "fft_params": base_numel,
        "lora_params": lora_numel,
        "fft_share": optimizer.last_routing.fft_share(),
        "implementation": optimizer.last_routing.implementation,
        "fft_optimizer": type(ds_partitions.client_optimizer(engines["fft"][0])).__name__,
        "copy_back": {"mode": copy_back.mode, "reason": copy_back.reason},
        "median_engine_step_ms": {name: round(t * 1e3, 3) for name, t in medians.items()},
        "molf_over_fft": round(medians["molf"] / medians["fft"], 3),
        "molf_full_copy_over_fft": round(medians["molf_full_copy"] / medians["fft"], 3),
        "target_molf_over_fft": TARGETS[(winner, rank)],
        "copy_back_bytes_per_step": copied,
        "copy_back_share": round(copied["molf"] / max(1, copied["molf_full_copy"]), 4),
        "byte_bound": byte_bound(plan, base_numel, lora_numel, winner),
    }
    record["meets_target"] = record["molf_over_fft"] <= record["target_molf_over_fft"]
    if args.profile:
        record["profile_ms"] = {}
        for name in ENGINES:
            engine, client = engines[name]
            profile = Profile()
            profile.engine(engine, client)
            try:
                for _ in range(args.repeats):
                    train_step(engine, batch())
            finally:
                profile.remove()
            record["profile_ms"][name] = profile.medians_ms(skip=2)
    per_rank = [None] * tdist.get_world_size()
    tdist.all_gather_object(per_rank, record["median_engine_step_ms"])
    record["median_engine_step_ms_per_rank"] = per_rank
    del engines, molf, optimizer
    return record


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as tdist

    import molf_ds
    from molf_ds.runtime import run_then_exit

    molf_ds.init_distributed()

    def work() -> None:
        for case in args.cases.split(","):
            record = run_case(args, case)
            if tdist.get_rank() == 0:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")

    run_then_exit(work)


def launch(args: argparse.Namespace, argv: list[str]) -> None:
    from molf_ds.train.distributed import free_port

    env = dict(os.environ)
    if shutil.which("nvidia-smi") is None:  # as scripts/env.sh: DeepSpeed's CPU accelerator
        env.setdefault("DS_ACCELERATOR", "cpu")
    if env.get("DS_ACCELERATOR") == "cpu":  # CPU ranks on one host split its cores as threads
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.ranks)))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "records.jsonl"
        command = [sys.executable, "-m", "deepspeed.launcher.runner"]
        command += ["--num_gpus", str(args.ranks), "--master_port", str(free_port())]
        command += ["--module", "bench.offload_step", *argv, "--out", str(out)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            sys.exit(f"benchmark job failed ({' '.join(command)}):\n{done.stderr[-4000:]}")
        sys.stdout.write(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES), help="config:lora_rank:winner,...")
    parser.add_argument("--ranks", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mlp", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--seq", type=int, default=16)
    parser.add_argument("--micro", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--burn-in", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="where each engine's step goes")
    parser.add_argument("--out", help=argparse.SUPPRESS)  # set by launch() for the ranks
    parser.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if "LOCAL_RANK" in os.environ:
        worker(args)
    else:
        launch(args, sys.argv[1:])


if __name__ == "__main__":
    main()
