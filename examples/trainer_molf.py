"""MoLF with `transformers.Trainer` or TRL's `SFTTrainer`, with or without DeepSpeed.

    deepspeed --num_gpus 8 examples/trainer_molf.py --model Qwen/Qwen2.5-0.5B \\
        --data train.jsonl --out out/molf --deepspeed ds_configs/zero3.json [--trl] [--efficient]

(``torchrun`` or ``accelerate launch`` start it as well; without ``--deepspeed`` it is plain
data parallel.) ``--data`` is a JSON-lines file of ``{"text": ...}`` records. ``--out`` gets the
Trainer's ``checkpoint-N`` directories (each with the merged model and the DeepSpeed checkpoint)
and ``final/``: the merged model (``AutoModelForCausalLM.from_pretrained``), plus ``final/adapter``
(a PEFT LoRA adapter for the base) with ``--efficient`` (MoLF-Efficient: the base stays frozen).
``--resume out/molf/checkpoint-N`` continues a run.
"""

from __future__ import annotations

import argparse
import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import molf_ds
from molf_ds.hf import MoLFMixin, MoLFOptions, MoLFTrainer


def molf_trainer(model, args, train_dataset, tokenizer, *, trl=False, efficient=False, **extra):
    """A Trainer (or TRL `SFTTrainer`) that trains ``model`` with MoLF: an FFT expert (frozen
    with ``efficient``) and LoRA experts of rank 4 and 8, routed top-1 by MoLFAdamW."""
    if trl:
        from trl import SFTTrainer

        class MoLFSFTTrainer(MoLFMixin, SFTTrainer):  # MoLFMixin first
            pass

        trainer_class = MoLFSFTTrainer
    else:
        trainer_class = MoLFTrainer
    return trainer_class(
        model=model,
        args=args,  # learning_rate, weight_decay, betas, eps, scheduler, deepspeed=...
        train_dataset=train_dataset,
        processing_class=tokenizer,
        molf_config=molf_ds.MoLFConfig(lora_ranks=(4, 8), train_base=not efficient),
        molf_options=MoLFOptions(lora_lr=1e-3, top_k=1, score="epd"),
        **extra,  # any other Trainer argument (data_collator, eval_dataset, callbacks, ...)
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a local model directory or hub id")
    parser.add_argument("--data", required=True, help='JSON lines of {"text": ...}')
    parser.add_argument("--out", required=True)
    parser.add_argument("--deepspeed", help="a DeepSpeed config file (ds_configs/zero3.json)")
    parser.add_argument("--trl", action="store_true", help="TRL's SFTTrainer")
    parser.add_argument("--efficient", action="store_true", help="MoLF-Efficient")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--save-steps", type=int, default=50)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--resume", help="a checkpoint-N directory to continue from")
    parser.add_argument("--cpu", action="store_true", help="CPU ranks (gloo)")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed's
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    cli = parse_args(argv)
    molf_ds.init_distributed()  # before the TrainingArguments, which start the process group
    settings = {
        "output_dir": cli.out,
        "per_device_train_batch_size": cli.micro_batch_size,
        "max_steps": cli.steps,
        "learning_rate": cli.lr,
        "weight_decay": 0.01,
        "lr_scheduler_type": "cosine",
        "warmup_steps": min(10, cli.steps // 10),
        "logging_steps": 1,
        "save_steps": cli.save_steps,
        "deepspeed": cli.deepspeed,
        "use_cpu": cli.cpu,
        "report_to": "tensorboard",  # or "wandb": routing is logged as molf/...
    }
    with open(cli.data) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    tokenizer = AutoTokenizer.from_pretrained(cli.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if cli.trl:
        from datasets import Dataset
        from trl import SFTConfig

        args = SFTConfig(**settings, bf16=torch.cuda.is_available())
        dataset, extra = Dataset.from_dict({"text": texts}), {}
    else:
        from transformers import DataCollatorForLanguageModeling, TrainingArguments

        args = TrainingArguments(**settings)
        dataset = [tokenizer(text, truncation=True, max_length=512) for text in texts]
        extra = {"data_collator": DataCollatorForLanguageModeling(tokenizer, mlm=False)}
    # After the TrainingArguments: under ZeRO-3 the model is built partitioned (zero.Init).
    model = AutoModelForCausalLM.from_pretrained(cli.model, dtype=torch.float32)
    trainer = molf_trainer(
        model, args, dataset, tokenizer, trl=cli.trl, efficient=cli.efficient, **extra
    )
    trainer.train(resume_from_checkpoint=cli.resume)
    trainer.save_model(f"{cli.out}/final")  # every rank: ZeRO-3 gathers module by module


if __name__ == "__main__":
    from molf_ds.runtime import run_then_exit

    # Barrier, destroy the process group, then exit: gloo would abort at interpreter exit.
    run_then_exit(main)
