"""MoLF in your own training loop under 🤗 Accelerate with its DeepSpeed or FSDP2 plugin.

    accelerate launch --config_file examples/accelerate_deepspeed.yaml \\
        examples/accelerate_molf.py --model Qwen/Qwen2.5-0.5B --data train.jsonl --out out/molf

``--data`` is a JSON-lines file of ``{"text": ...}`` records. The DeepSpeed config is the one the
accelerate config names (``deepspeed_config_file``; any ZeRO stage, with or without offload).
With ``--config_file examples/accelerate_fsdp2.yaml`` the same loop runs under PyTorch FSDP2
(GPU ranks: accelerate runs FSDP nowhere else). At the end ``--out`` holds the merged model, a
plain Hugging Face model.
"""

from __future__ import annotations

import argparse
import json
import random

import torch
from accelerate import Accelerator, PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

import molf_ds
from molf_ds.hf import connect_accelerator, prepare_accelerator, save_merged
from molf_ds.runtime import run_then_exit


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local model directory or hub id")
    parser.add_argument("--data", required=True, help='JSON lines of {"text": ...}')
    parser.add_argument("--out", required=True, help="where the merged model goes")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--lora-lr", type=float, default=1e-4)
    parser.add_argument("--lora-ranks", type=int, nargs="+", default=[8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu", action="store_true", help="CPU ranks (gloo)")
    return parser.parse_args(argv)


def load_texts(path: str, seed: int) -> list[str]:
    """The records' texts, shuffled once with ``seed``."""
    with open(path) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    random.Random(seed).shuffle(texts)
    return texts


def collate(tokenizer, max_length: int):
    """Texts → a padded batch whose loss covers every non-padding token."""

    def batch(texts: list[str]) -> dict:
        enc = tokenizer(
            texts, max_length=max_length, truncation=True, padding=True, return_tensors="pt"
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {**enc, "labels": labels}

    return batch


def main(argv: list[str] | None = None) -> torch.nn.Module:
    """Trains, writes the merged model; returns the model as accelerate prepared it."""
    args = parse_args(argv)
    molf_ds.init_distributed()  # before Accelerator: gloo on CPU ranks, DeepSpeed's comm
    if args.cpu:
        # Ranks without accelerators: the process state counts them on CPU (as the Trainer's
        # `use_cpu=True` does); `Accelerator(cpu=True)` would turn the DeepSpeed plugin off.
        PartialState(cpu=True)
    accelerator = Accelerator()
    if accelerator.state.deepspeed_plugin is None and not accelerator.is_fsdp2:
        # (on CPU ranks accelerate drops an FSDP plugin and would train plain DDP)
        raise SystemExit(
            "launch with `accelerate launch --config_file examples/accelerate_deepspeed.yaml` "
            "(DeepSpeed) or `examples/accelerate_fsdp2.yaml` (FSDP2, on GPU ranks)"
        )
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(args.seed)  # the LoRA factors' initialisation
    molf_ds.wrap(model, molf_ds.MoLFConfig(lora_ranks=tuple(args.lora_ranks)))
    optimizer = molf_ds.MoLFAdamW(model, lr=args.lr, lora_lr=args.lora_lr, weight_decay=0.01)
    # Accelerate steps a scheduler once per process at each `schedule.step()` (its schedules
    # count per-process batches): linear decay to 0 over `args.steps` optimizer steps.
    total = args.steps * accelerator.num_processes
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1.0 - s / total))
    loader = torch.utils.data.DataLoader(
        load_texts(args.data, args.seed),
        batch_size=args.micro_batch_size,
        collate_fn=collate(tokenizer, args.max_length),
    )  # accelerate gives each rank every world_size-th batch

    prepare_accelerator(accelerator, optimizer)  # the DeepSpeed config MoLF needs
    engine, ds_optimizer, loader, schedule = accelerator.prepare(model, optimizer, loader, schedule)
    connect_accelerator(accelerator, optimizer)  # MoLFAdamW on the engine's partitions
    # (under FSDP2, `prepare` shards the model and hands MoLFAdamW the DTensors: nothing to add)

    step = 0
    while step < args.steps:
        for batch in loader:
            loss = engine(**batch).loss
            accelerator.backward(loss)
            # FSDP2: clips the DTensor gradients; DeepSpeed clips by its config's
            # `gradient_clipping` and this only reads the norm
            accelerator.clip_grad_norm_(engine.parameters(), 1.0)
            ds_optimizer.step()
            schedule.step()
            ds_optimizer.zero_grad()
            step += 1
            if accelerator.is_main_process:
                share, lr = optimizer.last_routing.fft_share(), optimizer.param_groups[0]["lr"]
                print(f"step {step} loss {loss.item():.4f} lr {lr:.3g} fft_share {share:.3f}")
            if step == args.steps:
                break
    # Every rank takes part (ZeRO-3 and FSDP2 gather module by module); the main process writes.
    save_merged(
        accelerator.unwrap_model(engine),
        args.out,
        write=accelerator.is_main_process,
        tokenizer=tokenizer,
    )
    return engine


if __name__ == "__main__":
    # Barrier, destroy the process group, then exit: gloo would abort at interpreter exit.
    run_then_exit(main)
