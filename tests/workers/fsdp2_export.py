"""Train a tiny Qwen2 under FSDP2 (``fully_shard`` on each decoder layer, then the root) and
export it with `molf_ds.export` on every rank.

    torchrun --nproc_per_node 2 tests/workers/fsdp2_export.py --out OUT

(or ``fsdp2_checkpoint.py --export OUT``, which shares its launch). Two models, both trained 3
steps with `MoLFAdamW`, each rank on its slice of the batch:

* ``molf`` (base and experts trained): ``export_merged`` to ``OUT/molf_merged``;
* ``efficient`` (MoLF-Efficient: only the experts): ``export_peft_adapter`` to ``OUT/adapter``
  for the base saved (unwrapped, before training) to ``OUT/base``.

Rank 0 saves ``OUT/probe.pt`` (``{"probe": input_ids}``, as ``hf_reload.py`` reads it) and
``OUT/export.pt``: per model the trained model's logits on the probe (the FSDP2 model's own
forward), the untrained model's, and every rank's bytes of parameters, gradients and optimizer
state; and what each rank's ``export_merged`` said of a model with a NaN in one rank's shard.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import molf_ds
from molf_ds.runtime import run_then_exit

QWEN2 = {  # every dimension even: 2 ranks hold exactly half of each tensor
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "vocab_size": 64,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
RANKS = (2, 4)
STEPS, MICRO_BATCH, SEQ = 3, 2, 8
MODELS = {"molf": True, "efficient": False}  # name -> train_base


def export_run(out: Path, world: int, rank: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from molf_ds.export import export_merged, export_peft_adapter
    from molf_ds.fsdp2 import local_state_bytes

    out.mkdir(parents=True, exist_ok=True)
    mesh = init_device_mesh("cpu", (world,))
    probe = torch.randint(0, QWEN2["vocab_size"], (2, SEQ), generator=_seeded(2))
    result: dict = {}
    for name, train_base in MODELS.items():
        torch.manual_seed(0)  # the same model on every rank
        model = Qwen2ForCausalLM(Qwen2Config(**QWEN2))
        if not train_base and rank == 0:
            model.save_pretrained(out / "base")
        molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=RANKS, train_base=train_base))
        with torch.no_grad():  # non-zero B, so the experts count in the forward from the start
            for param_name, param in model.named_parameters():
                if "lora_B" in param_name:
                    param.normal_(std=0.1)
            untrained = model.eval()(input_ids=probe).logits
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = molf_ds.MoLFAdamW(model, lr=1e-2)
        model.train()
        for step in range(STEPS):
            batch = torch.randint(
                0, QWEN2["vocab_size"], (MICRO_BATCH * world, SEQ), generator=_seeded(step)
            )
            mine = batch[rank * MICRO_BATCH : (rank + 1) * MICRO_BATCH]
            model(input_ids=mine, labels=mine).loss.backward()
            grad_bytes = sum(
                p.grad.to_local().nbytes for p in model.parameters() if p.grad is not None
            )
            optimizer.step()
            optimizer.zero_grad()
        measured = {
            "params": sum(p.to_local().nbytes for p in model.parameters()),
            "grads": grad_bytes,
            "state": sum(local_state_bytes(optimizer).values()),
        }
        # After this forward FSDP2 leaves the root's own parameters gathered (it reshards the
        # root only after backward): the export must take them as they are.
        with torch.no_grad():
            trained = model.eval()(input_ids=probe).logits
        every_rank = [None] * world
        torch.distributed.all_gather_object(every_rank, measured)
        export_merged(model, out / f"{name}_merged")  # every rank: a collective under FSDP2
        if not train_base:
            export_peft_adapter(model, out / "adapter", str(out / "base"))
        result[name] = {"trained": trained, "untrained": untrained, "memory": every_rank}
    result["diverged"] = _export_diverged(model, out / "diverged", rank, world)
    if rank == 0:
        torch.save({"probe": probe}, out / "probe.pt")
        torch.save({**result, "world": world}, out / "export.pt")


def _export_diverged(model, out: Path, rank: int, world: int) -> list:
    """A NaN in the last rank's shard of a norm weight (gathered, never merged: only rank 0's
    check of the whole state sees it): every rank's `export_merged` must raise; each rank's
    error message is returned. (Not the embedding: FSDP2 leaves the root's own parameters
    gathered after an inference forward, plain tensors until the next backward.)"""
    from molf_ds.errors import MoLFError
    from molf_ds.export import export_merged

    norm = model.model.layers[1].input_layernorm.weight
    if rank == world - 1:
        with torch.no_grad():
            norm.to_local()[0] = float("nan")
    message = "exported"
    try:
        export_merged(model, out)
    except MoLFError as err:
        message = str(err)
    every_rank = [None] * world
    torch.distributed.all_gather_object(every_rank, message)
    return every_rank


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    run_then_exit(lambda: export_run(Path(args.out), world, rank))


if __name__ == "__main__":
    main()
