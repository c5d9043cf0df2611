"""Qwen2 / Qwen2.5 (incl. Qwen2.5-Math): the shared decoder with q/k/v biases and no q/k norm;
presets, config.json in and out, and the family record the registry lists."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import ClassVar

from apo_jax.models import family, hf_keys
from apo_jax.models.decoder import Decoder, DecoderConfig


@dataclasses.dataclass(frozen=True)
class Qwen2Config(DecoderConfig):
    """Architecture of a Qwen2 / Qwen2.5 model (full attention in every layer)."""

    qk_norm: ClassVar[bool] = False
    qkv_bias: ClassVar[bool] = True

    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping, where: str | None = None) -> Qwen2Config:
        """Reads a Hugging Face Qwen2 `config.json` (path or dict). Sliding-window attention
        (`use_sliding_window`, or any `layer_types` entry other than full attention) is refused."""
        hf, where = family.read_config(source, where)
        bad = lambda key, why: family.config_error(where, key, why)
        arch = hf.get("architectures") or []
        if hf.get("model_type") != "qwen2" or (arch and "Qwen2ForCausalLM" not in arch):
            raise bad(
                "model_type",
                f"is {hf.get('model_type')!r} (architectures={arch}); Qwen2Config reads "
                "'qwen2' / Qwen2ForCausalLM only",
            )
        family.require(hf, where, *family.DENSE_KEYS)
        if hf.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", f"is {hf['hidden_act']!r}; Qwen2 uses 'silu'")
        window_layers = hf.get("max_window_layers", hf["num_hidden_layers"])
        if not isinstance(window_layers, int) or window_layers < 0:
            raise bad("max_window_layers", f"is {window_layers!r}; expected an integer >= 0")
        if hf.get("use_sliding_window", False):
            raise bad(
                "use_sliding_window",
                f"is true (sliding_window={hf.get('sliding_window')}, from layer "
                f"max_window_layers={window_layers} on); sliding-window attention is not "
                "supported: set it to false to run with full attention in every layer",
            )
        layer_types = hf.get("layer_types") or []
        if any(t != "full_attention" for t in layer_types):
            raise bad("layer_types", f"is {layer_types}; only 'full_attention' is supported")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim is None:  # transformers' rule: hidden_size // num_attention_heads
            if not isinstance(heads, int) or heads < 1 or hf["hidden_size"] % heads:
                raise bad("num_attention_heads", f"is {heads!r}; must divide hidden_size")
            head_dim = hf["hidden_size"] // heads
        # transformers' Qwen2Config defaults: untied head, 32,768 positions
        return family.dense_config(
            cls, hf, where, head_dim=head_dim, max_positions=32768, tied=False
        )

    def to_hf(self) -> dict:
        """The `config.json` dict that transformers' Qwen2ForCausalLM reads back exactly."""
        hf = family.dense_hf(self, "Qwen2ForCausalLM", "qwen2")
        return {**hf, "max_window_layers": self.num_layers}


def _qwen2p5(**kw) -> Qwen2Config:
    base = dict(vocab_size=151936, num_kv_heads=2, head_dim=128, rope_theta=1e6)
    return Qwen2Config(**{**base, **kw})


PRESETS = {
    # tests and CPU runs: 2 layers, GQA 2, untied head (exercises lm_head and the biases)
    "qwen2_tiny": lambda: Qwen2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10_000.0,
        tie_word_embeddings=False,
        max_position_embeddings=512,
    ),  # fmt: skip
    "qwen2p5_0p5b": lambda: _qwen2p5(
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        head_dim=64,
        max_position_embeddings=32768,
    ),  # fmt: skip
    "qwen2p5_1p5b": lambda: _qwen2p5(
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        max_position_embeddings=131072,
    ),  # fmt: skip
    # the Math models: RoPE base 10,000 and a 4k context
    "qwen2p5_math_1p5b": lambda: _qwen2p5(
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        rope_theta=10_000.0,
        max_position_embeddings=4096,
    ),  # fmt: skip
    "qwen2p5_7b": lambda: _qwen2p5(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
    ),  # fmt: skip
}

FAMILY = family.Family(
    name="qwen2",
    config=Qwen2Config,
    model_types=("qwen2",),
    architectures=("Qwen2ForCausalLM",),
    presets=PRESETS,
    key_map=hf_keys.dense_key_map,
    build=Decoder,
)
