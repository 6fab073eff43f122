"""Save MoLFAdamW under FSDP2 with ``torch.distributed.checkpoint`` on N ranks, resume on M.

    torchrun --nproc_per_node N tests/workers/fsdp2_checkpoint.py --out OUT \
        [--straight] [--save DIR] [--resume DIR ...] [--export DIR]

The tiny model of ``fsdp2_train.py`` (its ``build`` and ``shard``), in a user's loop: backward,
``clip_grad_norm_``, ``step``, ``zero_grad``. Per case (`CASES`), in this order:

* ``--straight``: train `STEPS` steps without a break; saved as ``OUT/<case>_straight.pt``;
* ``--save DIR``: train `SAVE_AT` steps, then ``dcp.save`` of ``get_state_dict(model,
  optimizer)`` to ``DIR/<case>``; the bytes of each rank's optimizer state go to
  ``OUT/<case>_memory<N>.pt``;
* ``--resume DIR``: a fresh model and optimizer, ``dcp.load`` and ``set_state_dict`` from
  ``DIR/<case>`` (written by any number of ranks), then steps `SAVE_AT` to `STEPS`; saved as
  ``OUT/<case>_<DIR's name>_to<N>.pt``.

``--export DIR`` first runs ``fsdp2_export.py``'s work into DIR, sharing this launch.

Every global batch is the same whatever the number of ranks (each rank takes its slice), so the
resumed run must end where the straight run ends.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from torch import nn

import molf_ds
from molf_ds.runtime import run_then_exit
from tests.workers.fsdp2_train import CASES as TRAIN_CASES
from tests.workers.fsdp2_train import CLIP, build, shard
from tests.workers.zero_train import GRAD_ACCUM, global_batch, loss_fn

STEPS, SAVE_AT = 4, 2
DATA_WORLD = 12  # sequences per micro-batch: a slice for each of 2 or 3 ranks
# MoLF (base and experts trained), and MoLF-Efficient whose rank-2 factor leaves the third of 3
# ranks an empty shard to save and to load into.
CASES = ("molf", "efficient")


def setup(name: str, world: int) -> tuple[nn.Module, molf_ds.MoLFAdamW]:
    model, options = build(TRAIN_CASES[name])
    shard(model, TRAIN_CASES[name], world)
    return model, molf_ds.MoLFAdamW(model, **options)


def train(model, optimizer, steps: range, world: int, rank: int) -> dict:
    """The user's loop over ``steps``; every step's winners (this rank's) and scores."""
    per_rank = DATA_WORLD // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    winners, scores = [], []
    for step in steps:
        for micro in range(GRAD_ACCUM):
            inputs, targets = global_batch(step, micro, DATA_WORLD // 2)
            (loss_fn(model, inputs[mine], targets[mine]) / GRAD_ACCUM).backward()
        nn.utils.clip_grad_norm_(trainable, CLIP)
        optimizer.step()
        optimizer.zero_grad()
        winners.append(optimizer.last_routing.winners.tolist())
        scores.append(optimizer.last_routing.scores.cpu().clone())
    return {"winners": winners, "scores": scores}


def snapshot(model, optimizer, run: dict, world: int) -> dict:
    """Whole parameters and moments (gathered), step counts, and every rank's winners."""
    from molf_ds.fsdp2 import full_tensor

    params, moments = {}, {}
    for name, param in model.named_parameters():
        params[name] = full_tensor(param).clone()
        state = optimizer.state.get(param)
        if state:
            moments[name] = {
                "exp_avg": full_tensor(state["exp_avg"]).clone(),
                "exp_avg_sq": full_tensor(state["exp_avg_sq"]).clone(),
                "step": state["step"],
            }
    every_rank = [None] * world
    torch.distributed.all_gather_object(every_rank, run["winners"])
    return {"params": params, "moments": moments, "scores": run["scores"], "winners": every_rank}


def memory(model, optimizer, world: int) -> dict:
    """Every rank's bytes of optimizer state, and the trainable parameters' shapes."""
    from molf_ds.fsdp2 import local_state_bytes

    mine = {"state": sum(local_state_bytes(optimizer).values())}
    every_rank = [None] * world
    torch.distributed.all_gather_object(every_rank, mine)
    return {
        "per_rank": every_rank,
        "trainable_shapes": [tuple(p.shape) for p in model.parameters() if p.requires_grad],
        "world": world,
    }


def save(model, optimizer, directory: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))


def load(model, optimizer, directory: Path) -> None:
    """What a user's resume does: the fresh optimizer's state dict (torch fills it by one step
    at lr 0 on zero gradients) is the template ``dcp.load`` fills in place, resharded."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--straight", action="store_true")
    parser.add_argument("--save")
    parser.add_argument("--resume", action="append", default=[])
    parser.add_argument("--export")
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    out = Path(args.out)
    os.makedirs(out, exist_ok=True)

    def keep(result: dict, name: str) -> None:
        if rank == 0:
            torch.save({**result, "world": world}, out / f"{name}.pt")

    def work() -> None:
        if args.export:
            from tests.workers.fsdp2_export import export_run

            export_run(Path(args.export), world, rank)
        for case in CASES:
            if args.straight:
                model, optimizer = setup(case, world)
                run = train(model, optimizer, range(STEPS), world, rank)
                keep(snapshot(model, optimizer, run, world), f"{case}_straight")
            if args.save:
                model, optimizer = setup(case, world)
                train(model, optimizer, range(SAVE_AT), world, rank)
                keep(memory(model, optimizer, world), f"{case}_memory{world}")
                save(model, optimizer, Path(args.save) / case)
            for directory in map(Path, args.resume):
                model, optimizer = setup(case, world)
                load(model, optimizer, directory / case)
                loaded = {"last_routing": optimizer.last_routing}
                run = train(model, optimizer, range(SAVE_AT, STEPS), world, rank)
                result = {**snapshot(model, optimizer, run, world), **loaded}
                keep(result, f"{case}_{directory.name}_to{world}")

    run_then_exit(work)


if __name__ == "__main__":
    main()
