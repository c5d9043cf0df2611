"""Qwen3 (dense): the shared decoder with q/k RMSNorm and no biases; presets, config.json in and
out, and the family record the registry lists."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import ClassVar

from apo_jax.models import family, hf_keys
from apo_jax.models.decoder import Decoder, DecoderConfig, init_model

Qwen3 = Decoder  # public name (apo_jax.Qwen3): the model class of every family
__all__ = ["FAMILY", "Qwen3", "Qwen3Config", "init_model"]


@dataclasses.dataclass(frozen=True)
class Qwen3Config(DecoderConfig):
    """Architecture of a dense Qwen3 model (what `config.json` describes)."""

    qk_norm: ClassVar[bool] = True
    qkv_bias: ClassVar[bool] = False

    # --- presets -------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> Qwen3Config:
        """A few-hundred-kB model for tests and the CPU default run."""
        base = dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            head_dim=16,
            rope_theta=10_000.0,
            max_position_embeddings=512,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def bench_50m(cls, **overrides) -> Qwen3Config:
        """The ~42M-parameter config used by the CPU benchmarks."""
        base = dict(
            vocab_size=32000,
            hidden_size=512,
            intermediate_size=1536,
            num_layers=8,
            num_heads=8,
            num_kv_heads=4,
            head_dim=64,
            max_position_embeddings=4096,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def qwen3_0p6b(cls) -> Qwen3Config:
        return cls(151936, 1024, 3072, 28, 16, 8, 128)

    @classmethod
    def preset(cls, name: str) -> Qwen3Config:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}")
        return PRESETS[name]()

    # --- Hugging Face config.json --------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | Mapping, where: str | None = None) -> Qwen3Config:
        """Reads a Hugging Face Qwen3 `config.json` (path or dict; old top-level `rope_theta` or
        the newer `rope_parameters` form). Raises ValueError naming the file and key on anything
        that is not a dense Qwen3 this port implements exactly."""
        hf, where = family.read_config(source, where)
        bad = lambda key, why: family.config_error(where, key, why)
        arch = hf.get("architectures") or []
        if hf.get("model_type") != "qwen3" or (arch and "Qwen3ForCausalLM" not in arch):
            raise bad(
                "model_type",
                f"is {hf.get('model_type')!r} (architectures={arch}); only "
                "dense Qwen3 ('qwen3', Qwen3ForCausalLM) is read by Qwen3Config",
            )
        family.require(hf, where, *family.DENSE_KEYS, "head_dim")
        if hf.get("hidden_act", "silu") != "silu":
            raise bad("hidden_act", f"is {hf['hidden_act']!r}; Qwen3 uses 'silu'")
        if hf.get("attention_bias", False):
            raise bad("attention_bias", "is true; Qwen3 has no attention biases")
        if hf.get("use_sliding_window", False):
            raise bad("use_sliding_window", "is true; sliding-window attention is not supported")
        return family.dense_config(
            cls, hf, where, head_dim=hf["head_dim"], max_positions=40960, tied=False
        )

    def to_hf(self) -> dict:
        """The `config.json` dict that transformers' Qwen3ForCausalLM reads back exactly."""
        return {**family.dense_hf(self, "Qwen3ForCausalLM", "qwen3"), "attention_bias": False}


PRESETS = {
    "tiny": Qwen3Config.tiny,
    "bench_50m": Qwen3Config.bench_50m,
    "qwen3_0p6b": Qwen3Config.qwen3_0p6b,
    # (vocab, hidden, intermediate, layers, heads, kv heads, head_dim), as the Qwen3 config.json
    "qwen3_1p7b": lambda: Qwen3Config(151936, 2048, 6144, 28, 16, 8, 128),
    "qwen3_4b": lambda: Qwen3Config(151936, 2560, 9728, 36, 32, 8, 128),
    "qwen3_8b": lambda: Qwen3Config(151936, 4096, 12288, 36, 32, 8, 128, tie_word_embeddings=False),
}

FAMILY = family.Family(
    name="qwen3",
    config=Qwen3Config,
    model_types=("qwen3",),
    architectures=("Qwen3ForCausalLM",),
    presets=PRESETS,
    key_map=hf_keys.dense_key_map,
    build=Decoder,
)
