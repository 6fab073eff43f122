"""`molf_ds.hf` in real Hugging Face Trainer runs; saves what happened.

One plain process, the starting point every run loads (a tiny Qwen2 + byte tokenizer):
    python tests/workers/hf_trainer.py base BASE_DIR
A run (one plain process without DeepSpeed, or ranks started by the deepspeed launcher):
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 tests/workers/hf_trainer.py train \
        --base BASE_DIR --out OUT --deepspeed ds_configs/zero3.json [--steps 4] [--micro 2] \
        [--save-steps 2] [--resume OUT/checkpoint-2] [--efficient] [--trl]
Under FSDP2 (``fsdp=True, fsdp_config={"fsdp_version": 2}``; ranks started by torchrun; on CPU
ranks accelerate's FSDP path is switched on by hand, see accelerate_fsdp_cpu.py):
    torchrun --nproc_per_node 2 tests/workers/hf_trainer.py train --base B --out OUT --fsdp \
        [--save-steps 2 --and-resume OUT2]
``--and-resume OUT2`` then resumes a second Trainer, in the same processes, from
``OUT/checkpoint-<save-steps>`` into OUT2 (a launch fewer than a second job).

The model is loaded with ``from_pretrained`` after the `TrainingArguments` exist, so under
ZeRO-3 it is built partitioned (``zero.Init``). Every sequence has the same length and no padding,
so the loss of a global batch is the same token mean however it is split into micro-batches and
ranks. Rank 0 saves ``OUT/result.pt``: the trained (wrapped) parameters gathered, the logits of the
trained model on fixed inputs, the Trainer's log history; ``trainer.save_model(OUT/final)``
writes the merged model (and, with ``--efficient``, the adapter).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

from trainer_molf import molf_trainer  # noqa: E402  (the README's example)

import molf_ds  # noqa: E402
from molf_ds import ds_partitions  # noqa: E402
from molf_ds.runtime import run_then_exit  # noqa: E402

VOCAB, SEQ, EXAMPLES = 320, 16, 32
LR, WD = 2e-3, 0.01  # MoLF's options (ranks, lora_lr, top_k) are the example's
# The Trainer's FSDP2: each decoder layer, then the root (and accelerate's own units for the
# embeddings and the final norm + head), fully_shard-ed.
FSDP2 = {
    "fsdp": True,
    "fsdp_config": {
        "fsdp_version": 2,
        "transformer_layer_cls_to_wrap": ["Qwen2DecoderLayer"],
        "state_dict_type": "SHARDED_STATE_DICT",  # checkpoints through torch.distributed.checkpoint
    },
}


def save_base(directory: str) -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from molf_ds.train.tokenizer import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def token_rows() -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(3, 256, (EXAMPLES, SEQ), generator=generator).tolist()


def probe_inputs() -> torch.Tensor:
    return torch.randint(3, 256, (2, SEQ), generator=torch.Generator().manual_seed(99))


class Rows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.rows = token_rows()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        ids = torch.tensor(self.rows[i])
        return {"input_ids": ids, "labels": ids.clone()}


def train(a: argparse.Namespace) -> None:
    if "WORLD_SIZE" in os.environ:
        molf_ds.init_distributed()  # before TrainingArguments: they start the process group
    from transformers import AutoModelForCausalLM, AutoTokenizer

    common = {
        "output_dir": a.out,
        "per_device_train_batch_size": a.micro,
        "max_steps": a.steps,
        "learning_rate": LR,
        "weight_decay": WD,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "logging_steps": 1,
        "save_strategy": "steps" if a.save_steps else "no",
        "save_steps": a.save_steps or 500,
        # (the GPU check's machine may lack tensorboard)
        "report_to": ["tensorboard"] if importlib.util.find_spec("tensorboard") else [],
        "deepspeed": a.deepspeed,
        **(FSDP2 if a.fsdp else {}),
        "seed": 0,
        "disable_tqdm": True,
        # CPU ranks: accelerate then counts the ranks (gloo); the GPU check runs --fsdp on a GPU
        "use_cpu": not torch.cuda.is_available(),
        "bf16": a.bf16,  # under FSDP2: MixedPrecisionPolicy(param_dtype=bf16), fp32 shards
    }
    if a.trl:
        from datasets import Dataset
        from trl import SFTConfig

        # SFTConfig defaults to bf16; these runs compare fp32 parameters (`common` sets it).
        args = SFTConfig(**common, max_length=None, packing=False)
        data = Dataset.from_dict({"input_ids": token_rows()})
    else:
        from transformers import TrainingArguments

        args = TrainingArguments(**common)
        data = Rows()
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    zero_init = all(ds_partitions.zero3_residency(p) == "released" for p in model.parameters())
    tokenizer = AutoTokenizer.from_pretrained(a.base)
    trainer = molf_trainer(model, args, data, tokenizer, trl=a.trl, efficient=a.efficient)
    switched_on_by_hand = a.fsdp and not trainer.is_fsdp_enabled
    if switched_on_by_hand:  # CPU ranks (on a GPU accelerate does it)
        from accelerate.utils import FullyShardedDataParallelPlugin

        from tests.workers.accelerate_fsdp_cpu import fsdp_on_cpu_ranks

        plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
        fsdp_on_cpu_ranks(trainer.accelerator, plugin)
        trainer.is_fsdp_enabled = True  # what the Trainer reads off the state it created
    trainer.train(resume_from_checkpoint=a.resume)
    trainer.save_model(str(Path(a.out) / "final"))
    result = {
        "params": gathered_params(trainer.model, keep=args.should_save),
        "probe": probe_inputs(),
        "logits": probe_logits(trainer),
        "log_history": trainer.state.log_history,
        "world_size": args.world_size,
        "accelerate_fsdp2": trainer.accelerator.is_fsdp2,
        "fsdp_param_dtype": str(getattr(fsdp_policy(trainer), "param_dtype", None)),
        "fsdp_switched_on_by_hand": switched_on_by_hand,
        "zero_init": zero_init,  # built partitioned by from_pretrained (ZeRO-3's zero.Init)
        "lora_residency": sorted(
            {
                str(ds_partitions.zero3_residency(p))
                for n, p in model.named_parameters()
                if "lora" in n
            }
        ),
    }
    if args.should_save:
        torch.save(result, Path(a.out) / "result.pt")


def fsdp_policy(trainer):
    """The MixedPrecisionPolicy accelerate shards with (None without FSDP)."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    return plugin.mixed_precision_policy if plugin is not None else None


def gathered_params(model: torch.nn.Module, *, keep: bool) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    params = {}
    for name, param in model.named_parameters():
        with ds_partitions.gathered([param]):
            whole = param.full_tensor() if isinstance(param, DTensor) else param  # FSDP2
            if keep:
                params[name] = whole.detach().cpu().clone()
    return params


@torch.no_grad()
def probe_logits(trainer) -> torch.Tensor:
    model = trainer.model_wrapped  # the engine under DeepSpeed: ZeRO-3 gathers in forward
    model.eval()
    return model(input_ids=probe_inputs().to(trainer.args.device)).logits.detach().float().cpu()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["base", "train"])
    parser.add_argument("directory", nargs="?")
    parser.add_argument("--base")
    parser.add_argument("--out")
    parser.add_argument("--deepspeed")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--resume")
    parser.add_argument("--efficient", action="store_true")
    parser.add_argument("--trl", action="store_true")
    parser.add_argument("--fsdp", action="store_true", help="the Trainer's FSDP2")
    parser.add_argument("--bf16", action="store_true", help="(the GPU check)")
    parser.add_argument("--and-resume", help="then, in the same processes, resume into this")
    parser.add_argument("--local_rank", type=int)  # the deepspeed launcher's
    a = parser.parse_args()
    if a.command == "base":
        save_base(a.directory)
        return

    def runs() -> None:
        train(a)
        if a.and_resume:  # a new Trainer (new model, new TrainingArguments) from checkpoint-N
            checkpoint = str(Path(a.out) / f"checkpoint-{a.save_steps}")
            train(argparse.Namespace(**{**vars(a), "out": a.and_resume, "resume": checkpoint}))

    if "WORLD_SIZE" in os.environ:
        run_then_exit(runs)
    else:
        runs()


if __name__ == "__main__":
    main()
