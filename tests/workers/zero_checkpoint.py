"""Save, resume and convert DeepSpeed checkpoints of MoLF training; save what happened.

Multi-rank (real processes, gloo on CPU), one or more tasks per launch:
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/workers/zero_checkpoint.py --out OUT \
        --data-world 6 --tasks full:z2,save:z2:CKPT,resume:z2:CKPT,universal:z2:CKPT
One plain process (DeepSpeed's zero_to_fp32 into a freshly wrapped model, then merge):
    python tests/workers/zero_checkpoint.py --out OUT --tasks fp32:z3:CKPT,fp32:qwen2:CKPT

A task is ``KIND:CASE[:DIR]``; the checkpoint of CASE lives in ``DIR/CASE/<tag>``. Kinds:

- ``full``: train steps ``0 .. STEPS-1`` without interruption.
- ``save``: train steps ``0 .. SPLIT-1``, then ``engine.save_checkpoint`` (tag ``stepSPLIT``).
- ``resume``: fresh model and `MoLFAdamW` through `molf_ds.initialize`, ``engine.load_checkpoint``
  (tag ``stepSPLIT``), train steps ``SPLIT .. STEPS-1``.
- ``fresh_moments``: as ``resume``, but without the optimizer states (a control: it must differ).
- ``universal``: as ``resume`` from the universal checkpoint (tag ``stepSPLIT_universal``, made
  by ``ds_to_universal``) with ``checkpoint.load_universal``; any world size.
- ``fp32`` (plain process): ``get_fp32_state_dict_from_zero_checkpoint`` loaded strictly into a
  freshly wrapped model; logits before and after `molf_ds.merge`; the qwen2 case also
  ``save_pretrained`` the merged model to ``OUT/merged_qwen2``.

The batches of step ``s`` depend on ``s`` only, so a resumed run sees the data an uninterrupted
run sees. Cases are zero_train's CASES plus ``qwen2``: a tiny transformers Qwen2ForCausalLM under
ZeRO-2. Rank 0 saves each task's result to ``OUT/<kind>_<case>.pt``.
"""

from __future__ import annotations

import argparse
import os

import torch
from zero_train import (  # tests/workers is sys.path[0] when this runs as a script
    CASES,
    GRAD_ACCUM,
    LORA_LR,
    LORA_WD,
    LR,
    MICRO_BATCH,
    SEQ,
    WD,
    build,
    ds_config,
    full_param,
    global_batch,
    loss_fn,
)

import molf_ds
from molf_ds.runtime import run_then_exit

STEPS, SPLIT = 4, 2
TAG = f"step{SPLIT}"
UNIVERSAL_TAG = f"{TAG}_universal"
QWEN2 = {"zero": {"stage": 2}}  # under ZeRO-2, like the tiny model cases
QWEN2_VOCAB = 64


def get_case(name: str) -> dict:
    return QWEN2 if name == "qwen2" else CASES[name]


def qwen2_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=QWEN2_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(1234)
    return Qwen2ForCausalLM(config)


def build_case(name: str) -> tuple[torch.nn.Module, molf_ds.MoLFAdamW]:
    if name != "qwen2":
        return build(CASES[name])
    model = qwen2_model()
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=(4,), lora_alpha=8.0))
    with torch.no_grad():  # non-zero B: the merge must fold something in
        for param_name, p in model.named_parameters():
            if "lora_B" in param_name:
                p.normal_(std=0.05)
    optimizer = molf_ds.MoLFAdamW(
        model, lr=LR, lora_lr=LORA_LR, weight_decay=WD, lora_weight_decay=LORA_WD
    )
    return model, optimizer


def batch(name: str, step: int, micro: int, data_world: int):
    if name != "qwen2":
        return global_batch(step, micro, data_world)
    generator = torch.Generator().manual_seed(1000 * step + micro)
    tokens = torch.randint(0, QWEN2_VOCAB, (MICRO_BATCH * data_world, SEQ + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def batch_loss(name: str, model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if name != "qwen2":
        return loss_fn(model, inputs, targets)
    # HF shifts labels itself: give it the whole sequence.
    tokens = torch.cat([inputs, targets[:, -1:]], dim=1)
    return model(input_ids=tokens, labels=tokens).loss


def optimizer_steps(optimizer: molf_ds.MoLFAdamW) -> list:
    """The step count of every optimizer state entry, as ``(type name, value)``."""
    return [
        (type(state["step"]).__name__, int(state["step"]))
        for state in optimizer.state.values()
        if "step" in state
    ]


def run_task(kind: str, name: str, directory: str | None, data_world: int) -> dict:
    import deepspeed.comm as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    micro_batch = MICRO_BATCH * data_world // world  # same global batch on any world size
    case = get_case(name)
    config = ds_config(case, micro_batch, world)
    if kind == "universal":
        config["checkpoint"] = {"load_universal": True}
    model, optimizer = build_case(name)
    engine, _, _, _ = molf_ds.initialize(model=model, optimizer=optimizer, config=config)
    ckpt = os.path.join(directory, name) if directory else None

    first, client_state = 0, None
    if kind in ("resume", "fresh_moments", "universal"):
        tag = UNIVERSAL_TAG if kind == "universal" else TAG
        path, client_state = engine.load_checkpoint(
            ckpt, tag=tag, load_optimizer_states=kind != "fresh_moments"
        )
        if path is None:
            raise RuntimeError(f"load_checkpoint found no checkpoint in {ckpt}/{tag}")
        first = SPLIT
    last = SPLIT if kind == "save" else STEPS

    winners = {}
    for step in range(first, last):
        for micro in range(GRAD_ACCUM):
            inputs, targets = batch(name, step, micro, data_world)
            mine = slice(rank * micro_batch, (rank + 1) * micro_batch)
            engine.backward(batch_loss(name, engine, inputs[mine], targets[mine]))
            engine.step()
        winners[step] = optimizer.last_routing.winners.tolist()

    params = {n: full_param(p) for n, p in engine.module.named_parameters()}
    if kind == "save":
        engine.save_checkpoint(ckpt, tag=TAG, client_state={"universal_checkpoint_info": {}})
    every_rank = [None] * world
    dist.all_gather_object(every_rank, {"winners": winners, "steps": optimizer_steps(optimizer)})
    return {
        "params": params,
        "winners": [r["winners"] for r in every_rank],
        "optimizer_steps": [r["steps"] for r in every_rank],
        "client_state_keys": sorted(client_state or {}),
        "global_steps": engine.global_steps,
        "world": world,
        "ds_optimizer": type(engine.optimizer).__name__,
    }


def run_fp32(name: str, directory: str, out: str) -> dict:
    """zero_to_fp32 into a freshly wrapped model (strict), then merge; logits before and after."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state_dict = get_fp32_state_dict_from_zero_checkpoint(os.path.join(directory, name), tag=TAG)
    if name == "qwen2":
        model = qwen2_model()
        molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=(4,), lora_alpha=8.0))
    else:
        model, _ = build(CASES[name])
    with torch.no_grad():  # every value must come from the checkpoint
        for p in model.parameters():
            p.fill_(float("nan"))
    model.load_state_dict(state_dict, strict=True)
    model.eval()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    inputs, targets = batch(name, 100, 0, 2)
    if name == "qwen2":
        inputs = torch.cat([inputs, targets[:, -1:]], dim=1)

    def logits() -> torch.Tensor:
        with torch.no_grad():
            output = model(input_ids=inputs) if name == "qwen2" else model(inputs)
        return (output.logits if name == "qwen2" else output).detach().clone()

    unmerged = logits()
    lora_B = [p for n, p in model.named_parameters() if "lora_B" in n]
    saved_B = [p.detach().clone() for p in lora_B]
    with torch.no_grad():  # a control: what the LoRA experts add
        for p in lora_B:
            p.zero_()
        without_lora = logits()
        for p, b in zip(lora_B, saved_B, strict=True):
            p.copy_(b)
    molf_ds.merge(model)
    merged = logits()
    result = {
        "params": params,
        "state_dict_keys": sorted(state_dict),
        "inputs": inputs,
        "unmerged_logits": unmerged,
        "merged_logits": merged,
        "without_lora_logits": without_lora,
        "merged_module_types": sorted({type(m).__name__ for m in model.modules()}),
    }
    if name == "qwen2":
        model.save_pretrained(os.path.join(out, "merged_qwen2"))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", required=True, help="KIND:CASE[:DIR],...")
    parser.add_argument("--out", required=True)
    parser.add_argument("--data-world", type=int, default=0, help="ranks the batch is cut for")
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    tasks = [(task.split(":") + [None])[:3] for task in args.tasks.split(",")]

    if all(kind == "fp32" for kind, _, _ in tasks):
        for kind, name, directory in tasks:
            torch.save(
                run_fp32(name, directory, args.out), os.path.join(args.out, f"{kind}_{name}.pt")
            )
        return

    import deepspeed.comm as dist

    molf_ds.init_distributed()
    data_world = args.data_world or dist.get_world_size()

    def work() -> None:
        for kind, name, directory in tasks:
            result = run_task(kind, name, directory, data_world)
            if dist.get_rank() == 0:
                torch.save(result, os.path.join(args.out, f"{kind}_{name}.pt"))

    run_then_exit(work)


if __name__ == "__main__":
    main()
