"""The loop of ``examples/accelerate_molf.py`` without accelerate: `molf_ds.initialize`, started by
the deepspeed launcher, with the example's data, batches, schedule and arguments.

    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/workers/hf_custom_loop.py \
        --deepspeed ds_configs/zero2.json --model M --data D.jsonl --out OUT [example options]

Rank ``r`` takes micro-batches ``r, r + world, ...`` of the example's loader: the ones accelerate
gives it. The merged model goes to ``OUT`` like the example's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from accelerate_molf import collate, load_texts, parse_args  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import molf_ds  # noqa: E402
from molf_ds.hf import save_merged  # noqa: E402
from molf_ds.runtime import run_then_exit  # noqa: E402
from molf_ds.zero import fill_auto  # noqa: E402


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    ds_path = argv[argv.index("--deepspeed") + 1]
    args = parse_args([a for a in argv if a not in ("--deepspeed", ds_path)])
    molf_ds.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(args.seed)
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=tuple(args.lora_ranks)))
    optimizer = molf_ds.MoLFAdamW(model, lr=args.lr, lora_lr=args.lora_lr, weight_decay=0.01)
    config = fill_auto(
        ds_path,
        micro_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=1,
        world_size=world,
        gradient_clipping=1.0,
        bf16=False,
    )
    engine, _, _, _ = molf_ds.initialize(
        model=model,
        optimizer=optimizer,
        config=config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: max(0.0, 1.0 - step / args.steps)
        ),
    )
    loader = torch.utils.data.DataLoader(
        load_texts(args.data, args.seed),
        batch_size=args.micro_batch_size,
        collate_fn=collate(tokenizer, args.max_length),
    )
    mine = [batch for i, batch in enumerate(loader) if i % world == rank]
    for step in range(args.steps):
        batch = mine[step % len(mine)]
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        if rank == 0:
            share, lr = optimizer.last_routing.fft_share(), optimizer.param_groups[0]["lr"]
            print(f"step {step + 1} loss {loss.item():.4f} lr {lr:.3g} fft_share {share:.3f}")
    save_merged(engine.module, args.out, write=rank == 0, tokenizer=tokenizer)


if __name__ == "__main__":
    run_then_exit(main)
