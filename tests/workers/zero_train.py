"""Train a tiny MoLF model under DeepSpeed (or in one plain process) and save what happened.

Multi-rank (real processes, gloo on CPU):
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/workers/zero_train.py --out OUT --cases z2,z3
One plain process, no DeepSpeed (the reference the ranks must match):
    python tests/workers/zero_train.py --reference --out OUT --cases z2,z3

Every rank trains on its slice of the same global batches, so the parameters after each step
must equal those of one process training on the whole global batch. Rank 0 saves, per case, the
full fp32 parameters and every rank's winners of every step to OUT/<case>.pt.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

import torch
from torch import nn

import molf_ds
from molf_ds import ds_partitions
from molf_ds.runtime import run_then_exit
from molf_ds.testing import CopiedBytes
from molf_ds.zero import SHIPPED_CONFIGS, fill_auto

CONFIG_DIR = SHIPPED_CONFIGS

VOCAB, DIM, MLP = 17, 24, 40
MICRO_BATCH, SEQ = 2, 5
GRAD_ACCUM = 2
CLIP = 0.05
LR, LORA_LR, WD, LORA_WD = 2e-2, 2e-2, 0.1, 0.01
# Adam's update g / (|g| + eps) is most sensitive to the summation order of the reduced gradient
# where |g| ~ eps; with eps above every such gradient, fp32 order effects stay ~1e-7.
EPS = 1e-3

CASES: dict[str, dict] = {
    "z0": {"zero": {"stage": 0}},
    "z1": {"zero": {"stage": 1}},
    "z2": {"zero": {"stage": 2}},
    "z3": {"zero": {"stage": 3}},
    "z1_offload": {"zero": {"stage": 1, "offload_optimizer": {"device": "cpu"}}},
    "z2_offload": {"zero": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
    "z3_offload": {"zero": {"stage": 3, "offload_optimizer": {"device": "cpu"}}},
    "z3_offload_param": {
        "zero": {
            "stage": 3,
            "offload_optimizer": {"device": "cpu"},
            "offload_param": {"device": "cpu"},
        }
    },
    # The shipped ds_configs/ files, "auto" fields filled the way molf-train fills them.
    "file_zero2_offload": {"file": "zero2_offload.json"},
    "file_zero3_offload_all": {"file": "zero3_offload_all.json"},
    "z0_efficient": {"zero": {"stage": 0}, "efficient": True},
    "z1_efficient": {"zero": {"stage": 1}, "efficient": True},
    "z2_efficient": {"zero": {"stage": 2}, "efficient": True},
    "z3_efficient": {"zero": {"stage": 3}, "efficient": True},
    # The multi-tensor path (the default off the CPU kernel, e.g. on GPUs) forced on.
    "z1_foreach": {"zero": {"stage": 1}, "foreach": True},
    "z2_foreach": {"zero": {"stage": 2}, "foreach": True},
    "z3_offload_foreach": {
        "zero": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
        "foreach": True,
    },
    # fp32 gradient accumulation sends bf16 + ZeRO-1 through DeepSpeed's BF16_Optimizer.
    "bf16_z1": {"zero": {"stage": 1}, "bf16": True, "grad_accum_dtype": "fp32"},
    "bf16_z2": {"zero": {"stage": 2}, "bf16": True},
    "bf16_z3": {"zero": {"stage": 3}, "bf16": True},
    # molf-train's baselines (`METHODS["fft"]`, `METHODS["lora"]`): DeepSpeed's own Adam from an
    # `optimizer` section, against torch's AdamW in one plain process.
    "fft_z2": {"zero": {"stage": 2}, "baseline": "fft"},
    "fft_z2_offload": {
        "zero": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
        "baseline": "fft",
    },
    "fft_z3_offload": {
        "zero": {"stage": 3, "offload_optimizer": {"device": "cpu"}},
        "baseline": "fft",
    },
    "lora_z2": {"zero": {"stage": 2}, "baseline": "lora"},
}
# A module the forward pass skips on some steps: under offload DeepSpeed leaves its slot of the
# gradient buffer as the last step left it, and multiplies it by the clip factor again.
for _name in ("z2_offload", "z3_offload"):
    CASES[f"{_name}_idle"] = {**CASES[_name], "idle_module": True}
# The offload cases again with DeepSpeed's own step (MOLF_DS_COPY_BACK=full): molf_ds's
# offloaded step must leave the model's parameters bitwise where these leave them.
OFFLOAD_CASES = (
    "z1_offload",
    "z2_offload",
    "z3_offload",
    "z3_offload_param",
    "z2_offload_idle",
    "z3_offload_idle",
)
for _name in OFFLOAD_CASES:
    CASES[f"{_name}_full"] = {**CASES[_name], "copy_back": "full"}
# A DeepSpeed that is not the one the selective copy-back was checked against (here: one of
# the methods it relies on reads differently): the start-up check must fall back to the full copy.
CASES["z2_offload_unknown_deepspeed"] = {**CASES["z2_offload"], "unknown_deepspeed": True}


class TinyDecoder(nn.Module):
    """Odd sizes on purpose: flat partitions split parameters across ranks and get padded."""

    def __init__(self, idle_module: bool = False) -> None:
        super().__init__()
        # used only while `use_idle` is set (the worker sets it on the first step alone)
        self.idle = nn.Linear(DIM, DIM, bias=False) if idle_module else None
        self.use_idle = False
        self.embed = nn.Embedding(VOCAB, DIM)
        self.q_proj = nn.Linear(DIM, DIM, bias=True)
        self.up_proj = nn.Linear(DIM, MLP, bias=False)
        self.down_proj = nn.Linear(MLP, DIM, bias=False)
        self.norm = nn.LayerNorm(DIM)
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        if self.idle is not None and self.use_idle:
            h = h + torch.tanh(self.idle(h))
        h = h + torch.tanh(self.q_proj(h))
        h = h + self.down_proj(torch.tanh(self.up_proj(h)))
        return self.lm_head(self.norm(h))


def build(case: dict) -> tuple[nn.Module, molf_ds.MoLFAdamW]:
    torch.manual_seed(1234)
    model = TinyDecoder(idle_module=case.get("idle_module", False))
    efficient = case.get("efficient", False)
    config = molf_ds.MoLFConfig(
        lora_ranks=(2, 6) if efficient else (3,), lora_alpha=4.0, train_base=not efficient
    )
    molf_ds.wrap(model, config)
    with torch.no_grad():  # non-zero B so LoRA experts matter from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    optimizer = molf_ds.MoLFAdamW(
        model,
        lr=LR,
        lora_lr=LORA_LR,
        eps=EPS,
        weight_decay=WD,
        lora_weight_decay=LORA_WD,
        foreach=case.get("foreach"),
    )
    return model, optimizer


def build_baseline(mode: str) -> tuple[nn.Module, object]:
    """The model as molf-train's ``mode`` (fft or lora) builds it, and its options (constant lr,
    so that the plain reference needs no schedule; LoRA's own rate and decay differ from the
    FFT ones, so a baseline that took the wrong ones would end elsewhere)."""
    from molf_ds.train.config import TrainConfig
    from molf_ds.train.methods import METHODS

    config = TrainConfig(
        mode=mode,
        lr=LR,
        lora_lr=LORA_LR / 2,
        weight_decay=WD,
        lora_weight_decay=LORA_WD,
        lora_ranks=[3],
        schedule="constant",
        warmup_steps=0,
    )
    torch.manual_seed(1234)
    return METHODS[mode].build_model(config, TinyDecoder()), config


def global_batch(step: int, micro: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1000 * step + micro)
    tokens = torch.randint(0, VOCAB, (MICRO_BATCH * world, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def loss_fn(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = model(inputs)
    return nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), targets.reshape(-1))


def ds_config(case: dict, micro_batch: int, world: int) -> dict:
    if "file" in case:
        return fill_auto(
            CONFIG_DIR / case["file"],
            micro_batch_size=micro_batch,
            gradient_accumulation_steps=GRAD_ACCUM,
            world_size=world,
            gradient_clipping=CLIP,
            bf16=False,
        )
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": GRAD_ACCUM,
        "train_batch_size": micro_batch * GRAD_ACCUM * world,
        "gradient_clipping": CLIP,
        "zero_optimization": copy.deepcopy(case["zero"]),
        "steps_per_print": 10_000,
    }
    if case.get("bf16"):
        config["bf16"] = {"enabled": True}
    if "grad_accum_dtype" in case:
        config["data_types"] = {"grad_accum_dtype": case["grad_accum_dtype"]}
    return config


def run_deepspeed(name: str, steps: int, world_of_data: int) -> dict:
    import deepspeed.comm as dist

    case = CASES[name]
    rank, world = dist.get_rank(), dist.get_world_size()
    micro_batch = MICRO_BATCH * world_of_data // world  # same global batch on any world size
    config = ds_config(case, micro_batch, world)
    if "baseline" in case:
        from molf_ds.train.methods import METHODS

        model, train_config = build_baseline(case["baseline"])
        stage = case["zero"]["stage"]
        method = METHODS[case["baseline"]]
        engine, optimizer = method.build_engine(train_config, model, config, stage)
    else:
        model, optimizer = build(case)
        os.environ[ds_partitions.COPY_BACK_ENV] = case.get("copy_back", "selective")
        relied_on = dict(ds_partitions.RELIED_ON_SOURCES)
        if case.get("unknown_deepspeed"):
            method = next(m for m in relied_on if m.startswith("zero.stage_1_and_2"))
            ds_partitions.RELIED_ON_SOURCES[method] = "0" * 64
        engine, _, _, _ = molf_ds.initialize(model=model, optimizer=optimizer, config=config)
        ds_partitions.RELIED_ON_SOURCES.update(relied_on)
    winners, residency, after_steps = [], [], []
    # the offload cases: how each step's result reaches the model's parameters
    tracked = name in OFFLOAD_CASES or "copy_back" in case or case.get("unknown_deepspeed", False)
    for step in range(steps):
        engine.module.use_idle = step == 0
        for micro in range(GRAD_ACCUM):
            inputs, targets = global_batch(step, micro, world_of_data)
            mine = slice(rank * micro_batch, (rank + 1) * micro_batch)
            device = engine.device
            loss = loss_fn(engine, inputs[mine].to(device), targets[mine].to(device))
            residency.append(zero3_residency(engine.module))
            engine.backward(loss)
            # what the step copies into the model's parameter partitions, measured
            partitions = ds_partitions.model_partitions(engine) if tracked else []
            before = gathered_persistent(engine) if tracked else {}
            with CopiedBytes([lp for lp, _ in partitions]) as copied:
                engine.step()
            residency.append(zero3_residency(engine.module))
        routing = getattr(optimizer, "last_routing", None)  # (MoLFAdamW's)
        winners.append(routing.winners.tolist() if routing is not None else [])
        if tracked:
            after_steps.append(after_step(engine, optimizer, copied.bytes, before))
    params = {name: full_param(param) for name, param in engine.module.named_parameters()}
    every_rank, every_state = [None] * world, [None] * world
    dist.all_gather_object(every_rank, winners)
    dist.all_gather_object(every_state, state_bytes(engine))
    return {
        "params": params,
        "winners": every_rank,
        "world": world,
        "residency": residency,
        "ds_optimizer": type(engine.optimizer).__name__,
        "basic_optimizer": type(optimizer).__name__,
        "implementation": routing.implementation if routing is not None else None,
        "state_bytes": every_state,
        "trainable_numel": sum(getattr(p, "ds_numel", p.numel()) for p in trainable(model)),
        "after_steps": after_steps,
    }


def gathered_persistent(engine) -> dict[str, torch.Tensor]:
    """ZeRO-3's persistent parameters that are gathered now, by name (copies)."""
    return {
        n: p.detach().clone()
        for n, p in engine.module.named_parameters()
        if getattr(p, "ds_persist", False) and ds_partitions.zero3_residency(p) == "whole"
    }


def after_step(engine, optimizer, copied_bytes: int, before: dict[str, torch.Tensor]) -> dict:
    """After an optimizer step, per rank: the model's own parameters as this rank holds them
    (what the forward pass reads: under ZeRO-3 this rank's partition of each, and the whole of
    each resident one; gathering would disturb ZeRO-3's prefetch trace mid-run), how the step's
    result was copied back into them (``copied_bytes``: what ``copy_`` wrote into the model's
    partition during the step, measured), and whether this rank's model partition equals its
    fp32 master converted to the model's dtype (what DeepSpeed's full copy writes). Under
    ZeRO-3: the bytes of the persistent parameters (gathered before the step, ``before``) whose
    values the step changed, measured, and of all of them."""
    import deepspeed.comm as dist

    after = gathered_persistent(engine)
    model_params = {}
    for n, p in engine.module.named_parameters():
        if hasattr(p, "ds_tensor"):
            model_params[f"{n}#partition"] = p.ds_tensor.detach().cpu().clone()
        if ds_partitions.zero3_residency(p) in (None, "whole"):
            model_params[n] = p.detach().cpu().clone()
    copy_back = ds_partitions.copy_back_of(optimizer)
    mine = {
        "model_params": model_params,
        "mode": copy_back.mode,
        "reason": copy_back.reason,
        "last_bytes": copy_back.last_bytes,
        "partition_bytes": copy_back.partition_bytes,
        "copied_bytes": copied_bytes,
        "matches_master": ds_partitions.model_partition_matches_master(engine),
        "clipped": float(engine.get_global_grad_norm()) > CLIP,
        "regathered_bytes": copy_back.regathered_bytes,
        "changed_persistent_bytes": sum(
            value.numel() * value.element_size()
            for n, value in before.items()
            if not torch.equal(value, after[n])
        ),
        "persistent_bytes": sum(v.numel() * v.element_size() for v in before.values()),
    }
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, mine)
    return {"ranks": every_rank}


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def state_bytes(engine) -> int:
    """fp32 master partition(s) + the optimizer's moments that this rank holds."""
    return sum(ds_partitions.optimizer_state_bytes(engine).values())


def zero3_residency(model: nn.Module) -> dict | None:
    """Under ZeRO-3: are all LoRA factors whole and available (never released), while the
    base weights are released to their partitions between forwards?"""
    residency = {name: ds_partitions.zero3_residency(p) for name, p in model.named_parameters()}
    if all(where is None for where in residency.values()):
        return None
    return {
        "lora_resident": all(w == "whole" for n, w in residency.items() if "lora_" in n),
        "base_released": all(w == "released" for n, w in residency.items() if ".base.weight" in n),
    }


def full_param(param: torch.nn.Parameter) -> torch.Tensor:
    """The whole fp32 parameter: the optimizer's master copy when it has one (ZeRO-1/2/3,
    bf16), else the plain or (ZeRO-3) gathered weight of a frozen parameter."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param) if param.requires_grad else None
    if full is None:
        # a no-op for a parameter ZeRO-3 does not partition
        with deepspeed.zero.GatheredParameters([param]):
            return param.detach().float().cpu().clone()
    return full.float().cpu().clone()


def run_reference(name: str, steps: int, world_of_data: int) -> dict:
    case = CASES[name]
    if case.get("bf16"):
        raise SystemExit("the plain reference is fp32; run bf16 cases under deepspeed")
    if "baseline" in case:  # torch's AdamW with the section's betas and eps (torch's defaults)
        model, config = build_baseline(case["baseline"])
        lora = case["baseline"] == "lora"
        params = trainable(model)
        optimizer = torch.optim.AdamW(
            # weight decay on matrices only (embeddings included), as MoLFAdamW decays
            [
                {"params": [p for p in params if p.ndim >= 2]},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=config.lora_lr if lora else config.lr,
            weight_decay=config.lora_weight_decay if lora else config.weight_decay,
        )
    else:
        model, optimizer = build(case)
    initial = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    winners, clipped = [], 0
    for step in range(steps):
        model.use_idle = step == 0
        for micro in range(GRAD_ACCUM):
            inputs, targets = global_batch(step, micro, world_of_data)
            (loss_fn(model, inputs, targets) / GRAD_ACCUM).backward()
        norm = nn.utils.clip_grad_norm_(trainable(model), CLIP)
        clipped += int(norm > CLIP)
        optimizer.step()
        optimizer.zero_grad()
        routing = getattr(optimizer, "last_routing", None)
        winners.append(routing.winners.tolist() if routing is not None else [])
    params = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {
        "params": params,
        "initial": initial,
        "trainable": [n for n, p in model.named_parameters() if p.requires_grad],
        "winners": [winners],
        "world": 1,
        "clipped_steps": clipped,
    }


def compare(reference_dir: str, run_dir: str, cases: list[str]) -> dict:
    """Largest parameter difference and winner agreement of each case against the reference."""
    report = {}
    for case in cases:
        ref = torch.load(os.path.join(reference_dir, f"{case}.pt"), weights_only=False)
        got = torch.load(os.path.join(run_dir, f"{case}.pt"), weights_only=False)
        diff = max((got["params"][n] - p).abs().max().item() for n, p in ref["params"].items())
        same = all(w == ref["winners"][0] for w in got["winners"])
        report[case] = {"max_abs_diff": diff, "same_winners": same, "ok": same and diff < 1e-5}
    return report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--data-world", type=int, default=0, help="ranks the batch is cut for")
    parser.add_argument("--reference", action="store_true")
    parser.add_argument("--compare", help="directory of reference results: compare --out to it")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    if args.compare:
        print(json.dumps(compare(args.compare, args.out, args.cases.split(","))))
        return
    if args.reference:
        for name in args.cases.split(","):
            result = run_reference(name, args.steps, args.data_world)
            torch.save(result, os.path.join(args.out, f"{name}.pt"))
        return

    import deepspeed.comm as dist

    molf_ds.init_distributed()
    data_world = args.data_world or dist.get_world_size()

    def work() -> None:
        for name in args.cases.split(","):
            result = run_deepspeed(name, args.steps, data_world)
            if dist.get_rank() == 0:
                torch.save(result, os.path.join(args.out, f"{name}.pt"))

    run_then_exit(work)


if __name__ == "__main__":
    main()
