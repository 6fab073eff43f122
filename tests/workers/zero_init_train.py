"""molf-train's model set-up under ZeRO-2/3, built whole or partitioned (``deepspeed.zero.Init``),
with and without activation checkpointing: train a few steps, save what happened.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/workers/zero_init_train.py \
        --model MODEL_DIR --out OUT --cases z3,z3_init

``MODEL_DIR``: a model saved with ``save_pretrained`` (and its tokenizer), e.g. the tiny-qwen2
preset of molf-train (tests/test_zero_init.py saves it).

Each case is what molf-train sets up for its options (`models.build_model`, then the mode's
``build_engine`` from `methods.METHODS`) on a model loaded with ``from_pretrained``, so that every
case starts from the same weights, then `STEPS` optimizer steps on fixed batches (the same global
batch on any number of ranks). Rank 0 saves ``OUT/<case>.pt``: the full fp32 parameters after
training and before it, how many elements of each base weight the rank held right after the
model was built (and molf-train's checkpoint-size estimate then), the winners of every step,
and how often the first decoder layer's attention was called per step.
"""

from __future__ import annotations

import argparse
import os

import torch

STEPS = 3
GLOBAL_BATCH, SEQ = 6, 16  # 6 sequences divide evenly over 1, 2 and 3 ranks

# case -> (ds_configs/ name, TrainConfig options)
CASES: dict[str, tuple[str, dict]] = {
    "z2": ("zero2", {}),
    "z2_checkpointed": ("zero2", {"gradient_checkpointing": True}),
    "z3": ("zero3", {"zero_init": False}),
    "z3_init": ("zero3", {}),
    "z3_init_checkpointed": ("zero3", {"gradient_checkpointing": True}),
    "z3_offload_all": ("zero3_offload_all", {"zero_init": False}),
    "z3_offload_all_init": ("zero3_offload_all", {}),
}


def batch(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(3, 256, (GLOBAL_BATCH, SEQ), generator=generator)
    mine = ids.chunk(world)[rank]
    return {"input_ids": mine, "attention_mask": torch.ones_like(mine), "labels": mine.clone()}


def train_case(name: str, model_dir: str) -> dict:
    import deepspeed.comm as dist

    from molf_ds.train import storage
    from molf_ds.train.config import TrainConfig
    from molf_ds.train.methods import METHODS
    from molf_ds.train.models import build_model
    from molf_ds.zero import ds_config_path, fill_auto

    ds_name, options = CASES[name]
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig(
        model=model_dir,
        mode="molf",
        lora_ranks=(4,),
        lr=3e-3,
        lora_lr=2e-3,
        schedule="constant",
        warmup_steps=0,
        bf16=False,
        **options,
    )
    ds_config = fill_auto(
        ds_config_path(ds_name),
        micro_batch_size=GLOBAL_BATCH // world,
        gradient_accumulation_steps=1,
        world_size=world,
        gradient_clipping=1.0,
        bf16=False,
    )
    stage = ds_config["zero_optimization"]["stage"]
    _, model = build_model(cfg, ds_config, METHODS[cfg.mode].build_model)
    held = {n: p.numel() for n, p in model.named_parameters() if n.endswith("base.weight")}
    disk = storage.checkpoint_estimate(model)  # molf-train's disk check, from the full sizes
    engine, optimizer = METHODS[cfg.mode].build_engine(cfg, model, ds_config, stage)
    initial = full_params(engine.module)
    # calls of the first layer's attention: twice per step when activations are recomputed
    # (transformers checkpoints a decoder layer's `forward`, inside the layer's own hooks; the
    # recomputation stops early, before the layer's last module returns)
    forwards = []
    attention = engine.module.model.layers[0].self_attn
    attention.register_forward_pre_hook(lambda *args: forwards.append(1))
    winners = []
    engine.train()  # (as molf-train's loop: from_pretrained leaves the model in eval mode)
    for step in range(STEPS):
        inputs = {k: v.to(engine.device) for k, v in batch(step, rank, world).items()}
        loss = engine(**inputs).loss
        engine.backward(loss)
        engine.step()
        winners.append(optimizer.last_routing.winners.tolist())
    return {
        "params": full_params(engine.module),
        "initial": initial,
        "held_when_built": held,
        "checkpoint_estimate": disk,
        "winners": winners,
        "layer_forwards_per_step": len(forwards) / STEPS,
        "world": world,
    }


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter whole, in fp32: the optimizer's master copy where it has one."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, param in model.named_parameters():
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([param]):
                full = param.detach()
        out[name] = full.float().cpu().clone()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    import deepspeed.comm as dist

    import molf_ds
    from molf_ds.runtime import run_then_exit

    molf_ds.init_distributed()
    os.makedirs(args.out, exist_ok=True)

    def work() -> None:
        for name in args.cases.split(","):
            result = train_case(name, args.model)
            if dist.get_rank() == 0:
                torch.save(result, os.path.join(args.out, f"{name}.pt"))

    run_then_exit(work)


if __name__ == "__main__":
    main()
