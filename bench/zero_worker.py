"""One rank of the ZeRO and FSDP2 benchmarks (started by bench/zero_scale.py and
bench/fsdp2_throughput.py through the deepspeed launcher).

For each requested run (``method:stage[:offload]``, or ``method:fsdp2`` for PyTorch FSDP2) it
builds the same Qwen2-like model, trains a few steps under DeepSpeed (or ``fully_shard``), and
rank 0 writes one JSON record per run with every rank's measurements: optimizer-state bytes (fp32
master + moments) and where they live, the FFT experts' share, collectives per training step,
step times, and under FSDP2 the routed step against torch's AdamW on the same shards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
import timeit

import torch
import torch.distributed as tdist

import molf_ds
from molf_ds import ds_partitions
from molf_ds.fsdp2 import shard_model
from molf_ds.runtime import run_then_exit
from molf_ds.testing import CollectiveCounter
from molf_ds.zero import fill_auto


def qwen2_like(args) -> torch.nn.Module:
    """The benchmarks' Qwen2-like model (``args.layers``, ``args.hidden``, ``args.mlp``,
    ``args.vocab``; 8 heads, tied embeddings), drawn from seed 0; also bench/offload_step.py's."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=args.hidden,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=args.vocab,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config)


def build_model(args, method: str):
    model = qwen2_like(args)
    if method == "fft":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=args.rank, lora_alpha=16, target_modules=list(molf_ds.MoLFConfig().target_modules)
        )
        model = get_peft_model(model, lora)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if method == "ds-cpu-adam":
        return model, None
    efficient = method == "molf-efficient"
    ranks = (args.rank // 2, args.rank) if efficient else (args.rank,)
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=ranks, train_base=not efficient))
    return model, molf_ds.MoLFAdamW(model, lr=1e-4, lora_lr=1e-3)


def state_bytes(engine, optimizer) -> dict:
    """fp32 master + moments this rank holds, by device, and the full-rank part."""
    by_device = ds_partitions.optimizer_state_bytes(engine)
    full_rank = full_rank_partition_elements(engine, optimizer)
    return {
        "optimizer_state_bytes": sum(by_device.values()),
        "by_device": by_device,
        "full_rank_state_bytes": None if full_rank is None else 12 * full_rank,
    }


def full_rank_partition_elements(engine, optimizer) -> int | None:
    """Elements of full-rank parameters (FFT experts, embeddings, norms: everything but LoRA
    factors) in this rank's partition; each holds an fp32 master and two moments."""
    if not isinstance(optimizer, molf_ds.MoLFAdamW):
        return None
    return sum(
        ds_partitions.local_numel(engine, param)
        for param, role in zip(optimizer.plan.params, optimizer.plan.roles, strict=True)
        if not role.is_lora
    )


def segment_source_time(optimizer: molf_ds.MoLFAdamW) -> dict:
    """How long cutting this rank's partition into the step's segments takes (best of 5 x 10
    calls): Python the routed step pays every step, on any device. Run after training: each
    call also advances the step count. Only where the partition and its gradient outlive the
    step: ZeRO-1/2 with optimizer offload, which keeps one gradient buffer (without offload the
    gradient partition is freed after the step; ZeRO-3 hands the partition to the param group
    only during its step)."""
    group = optimizer.param_groups[0]

    def source():
        return optimizer.segment_source(optimizer, group)

    if not group["params"] or not source()[0]:
        return {}
    best = min(timeit.repeat(source, number=10, repeat=5)) / 10
    return {"segments": len(source()[0]), "segment_source_s": best}


def adamw_step_time(optimizer, model) -> dict:
    """The optimizer's step against torch's AdamW (its defaults, as a user builds it, and
    ``foreach=True``) over the same parameters and the same gradients (those of the last
    training step), best of 5 x 3 steps each: what routing costs on top of AdamW's own step on
    these tensors."""

    def best(opt) -> float:
        return min(timeit.repeat(opt.step, number=3, repeat=5)) / 3

    params = [p for p in model.parameters() if p.requires_grad]
    adamw = torch.optim.AdamW(params, lr=1e-4)
    foreach = torch.optim.AdamW(params, lr=1e-4, foreach=True)  # the multi-tensor path
    for opt in (adamw, foreach):
        opt.step()  # their state exists before the timing, as the routed step's does
    routed, plain, multi = best(optimizer), best(adamw), best(foreach)
    return {
        "step_s": routed,
        "torch_adamw_step_s": plain,
        "torch_adamw_foreach_step_s": multi,
        "over_torch_adamw": routed / plain,
        "over_torch_adamw_foreach": routed / multi,
    }


def run_fsdp2(args, method: str) -> dict:
    """``method`` (fft: torch's AdamW; molf: MoLFAdamW) on the model sharded by FSDP2, the
    optimizer built after sharding; the loop a user writes, clipping included."""
    model, _ = build_model(args, method)
    shard_model(model)  # each decoder layer, then the root, as a user shards it
    params = [p for p in model.parameters() if p.requires_grad]
    if method == "fft":
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    else:
        optimizer = molf_ds.MoLFAdamW(model, lr=1e-4, lora_lr=1e-3)
    generator = torch.Generator().manual_seed(tdist.get_rank())
    times, step_times = [], []
    counter = CollectiveCounter()
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, args.vocab, (args.micro, args.seq + 1), generator=generator)
        counting = counter if step == args.warmup else contextlib.nullcontext()
        with counting:
            start = time.perf_counter()
            model(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            before_step = time.perf_counter()
            optimizer.step()
            end = time.perf_counter()
        if step < args.warmup + args.steps - 1:  # the last gradients stay for the step timing
            optimizer.zero_grad()
        if step >= args.warmup:
            times.append(end - start)
            step_times.append(end - before_step)
    record = {
        "trainable_params": sum(p.numel() for p in params),
        "collectives_per_step": dict(counter.calls),
        "median_train_step_s": statistics.median(times),
        "median_engine_step_s": statistics.median(step_times),
        "tokens_per_step": args.micro * args.seq * tdist.get_world_size(),
    }
    if method == "molf":
        record["routing_numbers"] = optimizer.last_routing.scores.numel()
        record["implementation"] = optimizer.last_routing.implementation
        record["step_vs_torch_adamw"] = adamw_step_time(optimizer, model)
    return record


def run(args, spec: str) -> dict:
    method, stage, *rest = spec.split(":")
    offload = bool(rest and rest[0] == "offload")
    world = tdist.get_world_size()
    if stage == "fsdp2":
        per_rank = [None] * world
        tdist.all_gather_object(per_rank, run_fsdp2(args, method))
        return {"run": spec, "method": method, "engine": "fsdp2", "world": world,
                "ranks": per_rank}  # fmt: skip
    name = f"zero{stage}" + ("_offload" if offload else "") + ".json"
    config = fill_auto(
        name,  # a shipped config
        micro_batch_size=args.micro,
        gradient_accumulation_steps=1,
        world_size=world,
        gradient_clipping=1.0,
        bf16=False,
    )
    model, optimizer = build_model(args, method)
    import deepspeed

    if isinstance(optimizer, molf_ds.MoLFAdamW):
        engine, *_ = molf_ds.initialize(model=model, optimizer=optimizer, config=config)
    else:
        config["zero_allow_untested_optimizer"] = True
        if method == "ds-cpu-adam":
            config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=config,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
        )
    generator = torch.Generator().manual_seed(tdist.get_rank())
    times, step_times = [], []
    counter = CollectiveCounter()
    for step in range(args.warmup + args.steps):
        tokens = torch.randint(0, args.vocab, (args.micro, args.seq + 1), generator=generator)
        measured = step >= args.warmup
        # count the collectives of one whole training step
        counting = counter if step == args.warmup else contextlib.nullcontext()
        with counting:
            start = time.perf_counter()
            loss = engine(input_ids=tokens[:, :-1], labels=tokens[:, 1:]).loss
            engine.backward(loss)
            before_step = time.perf_counter()
            engine.step()
            end = time.perf_counter()
        if measured:
            times.append(end - start)
            step_times.append(end - before_step)
    record = {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "collectives_per_step": dict(counter.calls),
        "all_reduce_numels": list(counter.all_reduce_numels),
        "median_train_step_s": statistics.median(times),
        "median_engine_step_s": statistics.median(step_times),
        "tokens_per_step": args.micro * args.seq * world,
        **state_bytes(engine, optimizer),
    }
    if isinstance(optimizer, molf_ds.MoLFAdamW):
        record["routing_numbers"] = optimizer.last_routing.scores.numel()
        record.update(segment_source_time(optimizer))
    per_rank = [None] * world
    tdist.all_gather_object(per_rank, record)
    del engine, model, optimizer
    return {
        "run": spec,
        "method": method,
        "stage": int(stage),
        "offload": offload,
        "world": world,
        "ranks": per_rank,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--runs", required=True, help="comma list of method:stage[:offload] or method:fsdp2"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--mlp", type=int, default=704)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    molf_ds.init_distributed()

    def work() -> None:
        results = [run(args, spec) for spec in args.runs.split(",")]
        if tdist.get_rank() == 0:
            with open(args.out, "w") as f:
                json.dump(results, f)

    run_then_exit(work)


if __name__ == "__main__":
    main()
