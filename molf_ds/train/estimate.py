"""`molf-estimate`: the memory model of `molf_ds.memory` from a shell, as a table (or JSON).

molf-estimate --preset qwen2.5-3b --gpus-per-node 8 --nodes 2
molf-estimate --preset qwen2.5-3b --gpus-per-node 8 --engine fsdp2
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from molf_ds.config import DEFAULT_EXCLUDE_MODULES, DEFAULT_TARGET_MODULES
from molf_ds.errors import MoLFError, OneLineArgumentParser, one_line
from molf_ds.memory import (
    ENGINES,
    MEMORY_METHODS,
    STAGES,
    WEIGHT_BYTES,
    GiB,
    MemoryEstimate,
    estimate_memory,
)
from molf_ds.presets import PUBLISHED


def format_table(estimate: MemoryEstimate) -> str:
    """A readable table: GiB per GPU (with its parts) and GiB per node of CPU memory."""
    fsdp2 = estimate.engine == "fsdp2"
    nodes = f"{estimate.num_nodes} node{'s' if estimate.num_nodes > 1 else ''}"
    gpus = f"{estimate.num_gpus_per_node} GPU{'s' if estimate.num_gpus_per_node > 1 else ''}"
    lines = [
        f"Model states of {estimate.model} ({estimate.architecture}): "
        f"{_count(estimate.base_params)} params ({estimate.base_params:,}), "
        + (
            f"fp32 sharded weights, {estimate.weight_dtype} compute, AdamW, FSDP2"
            if fsdp2
            else f"{estimate.weight_dtype} weights, AdamW"
        ),
        f"Setup: {nodes} x {gpus} per node = {estimate.world_size} data-parallel ranks; "
        f"LoRA ranks {list(estimate.lora_ranks)} on {estimate.lora_modules} linear layers",
        "",
    ]
    header = (
        "method",
        "reshard" if fsdp2 else "ZeRO",
        "offload",
        "trainable",
        "GPU/GPU",
        "weights",
        "grads",
        "optim",
        "gather",
        "CPU/node",
    )
    body = [
        (
            r.method,
            ({3: "yes", 2: "no"}[r.stage] if fsdp2 else str(r.stage)),
            r.offload,
            f"{_count(r.trainable_params)} ({100 * r.trainable_params / r.total_params:.3g}%)",
            _gib(r.gpu_bytes_per_gpu),
            _gib(r.gpu_weight_bytes),
            _gib(r.gpu_grad_bytes),
            _gib(r.gpu_optimizer_bytes),
            _gib(r.gpu_gather_bytes),
            _gib(r.cpu_bytes_per_node),
        )
        for r in estimate.rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(cells: Sequence[str]) -> str:
        left = [cell.ljust(w) for cell, w in zip(cells[:4], widths[:4], strict=True)]
        right = [cell.rjust(w) for cell, w in zip(cells[4:], widths[4:], strict=True)]
        return "  ".join(left + right).rstrip()

    lines.append(fmt(header))
    lines.append(fmt(["-" * w for w in widths]))
    previous = None
    for row, cells in zip(estimate.rows, body, strict=True):
        if previous is not None and row.method != previous:
            lines.append("")
        previous = row.method
        lines.append(fmt(cells))
    if fsdp2:
        lines += [
            "",
            "GiB. GPU/GPU = weights (fp32 shards: the master) + grads (fp32 shards) + optim",
            "(AdamW moments) + gather (the root module, two blocks and one block's gradients",
            "whole; all weights with reshard=no); offload = CPUOffloadPolicy. CPU/node =",
            "offloaded states of one node's GPUs. Activations, buffers and fragmentation",
            "come on top.",
        ]
    else:
        lines += [
            "",
            "GiB. GPU/GPU = weights + grads + optim (fp32 master + AdamW moments) + gather",
            "(ZeRO-3: the largest partitioned layer, gathered); CPU/node = offloaded states of",
            "one node's GPUs. Activations, buffers and fragmentation come on top.",
        ]
    return "\n".join(lines)


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / GiB:.2f}"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _build_parser() -> argparse.ArgumentParser:
    parser = OneLineArgumentParser(
        prog="molf-estimate",
        description="Estimate per-GPU and per-node memory of model states (weights, gradients, "
        "fp32 master, AdamW moments) for FFT, LoRA, MoLF and MoLF-Efficient under DeepSpeed "
        "ZeRO 0-3 or PyTorch FSDP2, with and without CPU offload. Activations are not included.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--preset",
        choices=sorted(PUBLISHED),
        help="a built-in model config (default: none; give --preset or --config)",
    )
    source.add_argument(
        "--config",
        metavar="PATH",
        help="a Hugging Face config.json, or a folder holding one (default: none)",
    )
    parser.add_argument(
        "--gpus-per-node", type=int, default=1, metavar="N", help="GPUs per node (default: 1)"
    )
    parser.add_argument("--nodes", type=int, default=1, metavar="N", help="nodes (default: 1)")
    parser.add_argument(
        "--lora-ranks",
        type=int,
        nargs="+",
        default=[64],
        metavar="R",
        help="LoRA expert ranks; lora uses the first, the MoLF methods all (default: 64)",
    )
    targets = parser.add_mutually_exclusive_group()
    targets.add_argument(
        "--target-modules",
        nargs="+",
        default=list(DEFAULT_TARGET_MODULES),
        metavar="NAME",
        help=f"linear layers that get LoRA experts (default: {' '.join(DEFAULT_TARGET_MODULES)})",
    )
    targets.add_argument(
        "--target-regex",
        metavar="REGEX",
        help="instead of --target-modules: a regex full-matched on dotted names (default: none)",
    )
    parser.add_argument(
        "--exclude-modules",
        nargs="*",
        default=list(DEFAULT_EXCLUDE_MODULES),
        metavar="NAME",
        help=f"linear layers never targeted (default: {' '.join(DEFAULT_EXCLUDE_MODULES)})",
    )
    parser.add_argument(
        "--weight-dtype",
        choices=list(WEIGHT_BYTES),
        default="bf16",
        help="dtype of the model weights and gradients (default: bf16)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(MEMORY_METHODS),
        default=list(MEMORY_METHODS),
        metavar="METHOD",
        help=f"methods to report, among {', '.join(MEMORY_METHODS)} (default: all)",
    )
    parser.add_argument(
        "--engine",
        choices=list(ENGINES),
        default="deepspeed",
        help="deepspeed (ZeRO) or fsdp2 (fully_shard on each block and the root) "
        "(default: deepspeed)",
    )
    parser.add_argument(
        "--stages",
        nargs="+",
        type=int,
        choices=list(STAGES),
        default=None,
        metavar="STAGE",
        help="ZeRO stages to report; under fsdp2 3 is reshard_after_forward=True, 2 False "
        "(default: 0 1 2 3; fsdp2: 2 3)",
    )
    parser.add_argument(
        "--persistence-threshold",
        type=int,
        default=None,
        metavar="NUMEL",
        help="ZeRO-3 stage3_param_persistence_threshold (default: as molf_ds.initialize sets "
        "it for the MoLF methods, max(100000, largest LoRA factor); DeepSpeed's 100000 for fft "
        "and lora)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the estimate as JSON instead of a table (default: off)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``molf-estimate``: print the estimate table (or ``--json``); 0 on success."""
    args = _build_parser().parse_args(argv)
    try:
        estimate = estimate_memory(
            args.preset or args.config,
            num_gpus_per_node=args.gpus_per_node,
            num_nodes=args.nodes,
            lora_ranks=tuple(args.lora_ranks),
            target_modules=args.target_regex or tuple(args.target_modules),
            exclude_modules=tuple(args.exclude_modules),
            weight_dtype=args.weight_dtype,
            methods=tuple(dict.fromkeys(args.methods)),
            stages=None if args.stages is None else tuple(sorted(set(args.stages))),
            persistence_threshold=args.persistence_threshold,
            engine=args.engine,
        )
    except (MoLFError, OSError) as err:
        # one line whatever the message quotes (a path holding a newline, a C++ stack)
        print(f"molf-estimate: error: {one_line(err, 500)}", file=sys.stderr)
        return 1
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else format_table(estimate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
