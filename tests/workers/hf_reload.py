"""Reload what `molf_ds.hf` saved, in a process that never imports molf_ds; save the logits.

    python tests/workers/hf_reload.py MERGED_DIR PROBE.pt OUT.pt [--adapter ADAPTER_DIR]

``MERGED_DIR`` is loaded with ``AutoModelForCausalLM``; with ``--adapter``, the adapter is
loaded with ``PeftModel.from_pretrained`` on the base model its config names. ``PROBE.pt`` holds
``{"probe": input_ids}``; ``OUT.pt`` gets the logits of each and the molf_ds modules loaded.
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM


@torch.no_grad()
def logits(model, inputs: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=inputs).logits


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("merged")
    parser.add_argument("probe")
    parser.add_argument("out")
    parser.add_argument("--adapter")
    a = parser.parse_args()
    inputs = torch.load(a.probe)["probe"]
    merged, info = AutoModelForCausalLM.from_pretrained(
        a.merged, dtype=torch.float32, output_loading_info=True
    )
    result = {
        "merged": logits(merged, inputs),
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
    }
    if a.adapter:
        from peft import PeftConfig, PeftModel

        base_name = PeftConfig.from_pretrained(a.adapter).base_model_name_or_path
        base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
        result["adapter"] = logits(PeftModel.from_pretrained(base, a.adapter), inputs)
    result["molf_ds_imported"] = sorted(m for m in sys.modules if m.split(".")[0] == "molf_ds")
    torch.save(result, a.out)


if __name__ == "__main__":
    main()
