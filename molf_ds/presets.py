"""Model shapes by name, the one table both `molf-estimate` (memory of published models,
`molf_ds.memory`) and `molf-train` (models built from a config with random weights,
`molf_ds.train.models`) read. Literal config fields (subsets of the published config.json
files): no downloads.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preset:
    """One model shape: a transformers config's model type and fields, no weights."""

    model_type: str  # transformers' ``model_type`` (its ``CONFIG_MAPPING`` key)
    architecture: str  # the causal-LM class, as config.json's ``architectures`` names it
    fields: Mapping[str, Any]  # the shape; without ``vocab_size``
    # A published model's vocabulary: `molf-estimate` counts it. None: a test model whose
    # vocabulary is the byte tokenizer's (molf-train only).
    vocab_size: int | None = None
    # molf-train builds this published shape with random weights as ``random-<name>``
    # (throughput and memory checks without a download)
    random_in_job: bool = False

    def config_fields(self) -> dict[str, Any]:
        """The fields of a published model's config.json (`molf-estimate` reads them)."""
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            **self.fields,
            "vocab_size": self.vocab_size,
        }


TINY_SHAPE: Mapping[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}

# small-qwen2, the main job's, is twice as wide and half as deep as tiny-qwen2 (0.4M parameters
# against 0.2M): on the SQL task it gets further per second of a 2-core machine (README, Quick
# start).
PRESETS: Mapping[str, Preset] = {
    "qwen2.5-0.5b": Preset(
        "qwen2",
        "Qwen2ForCausalLM",
        {
            "hidden_size": 896,
            "intermediate_size": 4864,
            "num_hidden_layers": 24,
            "num_attention_heads": 14,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
        vocab_size=151936,
        random_in_job=True,
    ),
    "qwen2.5-3b": Preset(
        "qwen2",
        "Qwen2ForCausalLM",
        {
            "hidden_size": 2048,
            "intermediate_size": 11008,
            "num_hidden_layers": 36,
            "num_attention_heads": 16,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
        vocab_size=151936,
        random_in_job=True,
    ),
    "llama-70b": Preset(
        "llama",
        "LlamaForCausalLM",
        {
            "hidden_size": 8192,
            "intermediate_size": 28672,
            "num_hidden_layers": 80,
            "num_attention_heads": 64,
            "num_key_value_heads": 8,
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
        },
        vocab_size=128256,
    ),
    "small-qwen2": Preset(
        "qwen2",
        "Qwen2ForCausalLM",
        {**TINY_SHAPE, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2},
    ),
    "tiny-qwen2": Preset("qwen2", "Qwen2ForCausalLM", TINY_SHAPE),
    "tiny-llama": Preset("llama", "LlamaForCausalLM", TINY_SHAPE),
    "tiny-gemma3": Preset("gemma3_text", "Gemma3ForCausalLM", {**TINY_SHAPE, "head_dim": 16}),
}

# What `molf-estimate --preset` offers: the published shapes.
PUBLISHED: Mapping[str, Preset] = {n: p for n, p in PRESETS.items() if p.vocab_size is not None}
