"""molf-train on one rank of a real job, with one step made non-finite or left out.

    nonfinite_train.py inject-loss RANK STEP -- molf-train options
    nonfinite_train.py inject-grad RANK STEP -- molf-train options
    nonfinite_train.py drop STEP -- molf-train options

``inject-loss``: on rank RANK, the loss of micro-step STEP gets a NaN added that has no
gradient (the gradient stays finite: the job must skip the step for its loss alone).
``inject-grad``: on rank RANK, the gradient of micro-step STEP's logits turns NaN (the loss
stays finite). Both through a global forward hook of torch, not a change to the job.
``drop``: the reference, a run that never sees step STEP: its micro-batches are left out of the
stream, so step STEP trains on what the injected run's step STEP + 1 sees, and so on (run it
with one step fewer). Without gradient accumulation a step is one micro-step.
"""

from __future__ import annotations

import os
import sys
import traceback

import torch
from transformers import PreTrainedModel

from molf_ds.errors import EveryRankError, MoLFError
from molf_ds.runtime import is_main_rank, shutdown
from molf_ds.train import recipe
from molf_ds.train.config import parse_args


def inject(kind: str, rank: int, step: int) -> None:
    if int(os.environ.get("RANK", "0")) != rank:
        return
    seen = {"micro_steps": 0}

    def hook(module, args, output):
        loss = getattr(output, "loss", None)
        # the language model itself (not the DeepSpeed engine around it), with labels
        if not isinstance(module, PreTrainedModel) or loss is None:
            return None
        micro_step = seen["micro_steps"]
        seen["micro_steps"] += 1
        if micro_step != step:
            return None
        if kind == "inject-loss":
            output.loss = loss + torch.tensor(float("nan"))
        else:
            output.logits.register_hook(lambda grad: torch.full_like(grad, float("nan")))
        return output

    torch.nn.modules.module.register_module_forward_hook(hook)


class DroppingRecipe(recipe.Recipe):
    """The job with step ``drop``'s micro-batches left out of the stream (start at 0 only)."""

    def __init__(self, config, drop: int) -> None:
        super().__init__(config)
        self.drop = drop

    def micro_batches(self, start: int):
        per_step = self.derived.gradient_accumulation_steps
        for index, batch in enumerate(super().micro_batches(start)):
            if index // per_step != self.drop:
                yield batch


def main() -> None:
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the launcher's
    split = argv.index("--")
    mode, *numbers = argv[:split]
    config = parse_args(argv[split + 1 :])
    if mode == "drop":
        job = DroppingRecipe(config, drop=int(numbers[0]))
    else:
        inject(mode, int(numbers[0]), int(numbers[1]))
        job = recipe.Recipe(config)
    code = 0
    try:  # as recipe.main
        job.setup()
        job.finish(job.train())
    except MoLFError as err:
        if not isinstance(err, EveryRankError) or is_main_rank():
            print(f"molf-train: error: {err}", file=sys.stderr)
        code = 1
    except Exception:
        traceback.print_exc()
        code = 1
    finally:
        job.cleanup()
        shutdown(code)


if __name__ == "__main__":
    main()
