"""Median `MoLFAdamW.step()` time against torch's fused and foreach AdamW; prints one JSON line.

    .venv/bin/python -m bench.optimizer_step            # the default model (~46M routed params)
    .venv/bin/python -m bench.optimizer_step --layers 2 --repeats 5   # a quick look
    python3 -m bench.optimizer_step --device cuda --layers 20 --hidden 2048 --mlp 5632 \
        --kernels --targets 1.5,1.0                     # ~1.1B parameters on a GPU (gpu_check.sh)

Model (the defaults): a Qwen2ForCausalLM of 12 decoder layers (hidden 512, MLP 1408, 8 heads,
full multi-head attention, vocabulary 256, tied embeddings) with one LoRA expert of rank 64 on all
seven projections of each layer; every parameter trainable. ``--vocab 32000`` makes the
(unrouted) embeddings about a quarter of the parameters, as in Qwen2.5-0.5B.
Gradients are random and fixed, so only the optimizer step is timed. The three optimizers hold
their own states over the same parameters and are timed alternately in one process, after a
burn-in. Two routing cases are forced through the learning rates (EPD scores scale with lr_e):
``fft_wins`` (lora_lr = lr / 1000) and ``lora_wins`` (lora_lr = lr * 1000); the JSON reports the
measured share of modules the FFT expert won, so the case is checked, not assumed. Host reads
per step are counted by `molf_ds.testing.HostReadCounter`, transient memory and dispatched
ops by `molf_ds.testing`, each on one extra step. ``--impl`` picks MoLFAdamW's path (default:
the fused kernel on CPU float32 tensors, the multi-tensor path elsewhere). ``--kernels`` adds,
per case, what torch.profiler records of one step of each optimizer: on a GPU the kernels that
ran and the launch calls that started them, on the CPU the top-level aten ops. ``--targets F,L``
adds whether MoLF over torch's fused AdamW is at most F (FFT wins) and L (LoRA wins).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

import molf_ds
from molf_ds.testing import DispatchedOps, HostReadCounter, TransientMemory

LR = 1e-6


def build_model(
    layers: int, hidden: int, mlp: int, rank: int, device: str, vocab: int = 256
) -> torch.nn.Module:
    config = Qwen2Config(
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=vocab,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):  # drawn on the device: seconds for ~1B parameters on a GPU
        model = Qwen2ForCausalLM(config)
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=(rank,)))
    with torch.no_grad():
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
            if p.ndim == 2 and p.shape[1] == rank:  # lora_B starts at zero; give it values
                p.normal_(std=1e-2)
    return model


def transient_peak_bytes(optimizer: torch.optim.Optimizer) -> int:
    optimizer.step()  # the first step allocates the persistent moments: not transient
    with TransientMemory() as tracker:
        optimizer.step()
    return tracker.peak


def dispatched_ops(optimizer: torch.optim.Optimizer) -> int:
    with DispatchedOps() as ops:
        optimizer.step()
    return ops.count


def host_reads(optimizer: torch.optim.Optimizer) -> int:
    with HostReadCounter() as counter:
        optimizer.step()
    return counter.count


def profiled(optimizer: torch.optim.Optimizer, device: str) -> dict:
    """What torch.profiler records of one step: on a GPU, the kernels that ran and the launch
    API calls that started them; on the CPU, the top-level aten ops."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device != "cpu":
        activities.append(ProfilerActivity.CUDA)
    synchronize()
    with profile(activities=activities) as prof:
        optimizer.step()
        synchronize()
    events = prof.events()
    if device == "cpu":
        top = [e for e in events if e.name.startswith("aten::") and not _under_aten(e)]
        return {"cpu_ops": len(top)}
    return {
        "kernels": sum(1 for e in events if e.device_type == DeviceType.CUDA),
        "launch_calls": sum(1 for e in events if e.name in LAUNCH_CALLS),
    }


def _under_aten(event) -> bool:
    parent = event.cpu_parent
    return parent is not None and (parent.name.startswith("aten::") or _under_aten(parent))


LAUNCH_CALLS = {"cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx"}


def time_step(optimizer: torch.optim.Optimizer) -> float:
    synchronize()
    start = time.perf_counter()
    optimizer.step()
    synchronize()
    return time.perf_counter() - start


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


IMPLEMENTATIONS = {  # --impl: MoLFAdamW's flags
    "auto": {},
    "fused": {"fused": True},
    "foreach": {"foreach": True},
    "reference": {"fused": False, "foreach": False},
}


def bench_case(
    model: torch.nn.Module,
    lora_lr: float,
    repeats: int,
    burn_in: int,
    impl: str,
    kernels: bool = False,
) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizers = {
        "molf": molf_ds.MoLFAdamW(model, lr=LR, lora_lr=lora_lr, **IMPLEMENTATIONS[impl]),
        "fused_adamw": torch.optim.AdamW(params, lr=LR, fused=True),
        "foreach_adamw": torch.optim.AdamW(params, lr=LR, foreach=True),
    }
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for i in range(burn_in + repeats):
        for name, optimizer in optimizers.items():
            elapsed = time_step(optimizer)
            if i >= burn_in:
                times[name].append(elapsed)
    molf = optimizers["molf"]
    moment_bytes = sum(
        t.numel() * t.element_size()
        for state in molf.state.values()
        for key, t in state.items()
        if key != "step"
    )
    median = {name: statistics.median(t) for name, t in times.items()}
    reference = molf_ds.MoLFAdamW(model, lr=LR, lora_lr=lora_lr, **IMPLEMENTATIONS["reference"])
    fused_adamw = optimizers["fused_adamw"]
    device = next(model.parameters()).device.type
    launches = {name: profiled(opt, device) for name, opt in optimizers.items()} if kernels else {}
    return {
        **({"kernels_per_step": launches} if kernels else {}),
        "median_step_s": {name: round(t, 5) for name, t in median.items()},
        "molf_over_fused": round(median["molf"] / median["fused_adamw"], 3),
        "molf_over_foreach": round(median["molf"] / median["foreach_adamw"], 3),
        "fft_share": molf.last_routing.fft_share(),
        "implementation": molf.last_routing.implementation,
        "moment_bytes_per_param": moment_bytes / sum(p.numel() for p in params),
        "transient_peak_bytes": {
            "molf": transient_peak_bytes(molf),
            "reference_path": transient_peak_bytes(reference),
        },
        "host_reads_per_step": {"molf": host_reads(molf), "reference_path": host_reads(reference)},
        # ops dispatched by one step: what becomes kernel launches on an accelerator
        "ops_per_step": {
            "molf": dispatched_ops(molf),
            "reference_path": dispatched_ops(reference),
            "fused_adamw": dispatched_ops(fused_adamw),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--mlp", type=int, default=1408)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument(
        "--vocab", type=int, default=256, help="32000: embeddings (unrouted) ~1/4 of the model"
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--burn-in", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--kernels", action="store_true", help="profile one step of each")
    parser.add_argument(
        "--targets", help="F,L: MoLF over torch's fused AdamW at most F (FFT wins), L (LoRA wins)"
    )
    parser.add_argument(
        "--impl",
        choices=sorted(IMPLEMENTATIONS),
        default="auto",
        help="MoLFAdamW's path: auto (the kernel on CPU float32, else multi-tensor), fused, "
        "foreach (multi-tensor) or reference",
    )
    args = parser.parse_args()

    model = build_model(args.layers, args.hidden, args.mlp, args.rank, args.device, args.vocab)
    trainable = [p for p in model.parameters() if p.requires_grad]
    routed = molf_ds.MoLFAdamW(model, lr=LR).plan
    routed_numel = sum(n for row in routed.expert_numel for n in row)
    largest_module = max(sum(row) for row in routed.expert_numel) * 4
    result = {
        "benchmark": "optimizer_step",
        "device": args.device,
        "impl": args.impl,
        "threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in trainable),
        "routed_params": routed_numel,
        "routed_modules": len(routed.module_names),
        "largest_routed_module_bytes": largest_module,
        "fft_wins": bench_case(
            model, LR / 1000, args.repeats, args.burn_in, args.impl, args.kernels
        ),
        "lora_wins": bench_case(
            model, LR * 1000, args.repeats, args.burn_in, args.impl, args.kernels
        ),
    }
    if args.targets:
        limits = dict(
            zip(("fft_wins", "lora_wins"), map(float, args.targets.split(",")), strict=True)
        )
        result["targets_molf_over_fused"] = limits
        result["meets_targets"] = all(
            result[case]["molf_over_fused"] <= limit for case, limit in limits.items()
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
