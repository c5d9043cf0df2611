"""The Hugging Face safetensors key map of the dense decoder (models/decoder.py).

One explicit table maps every parameter path of `decoder.Decoder` to its HF key, HF shape and
the transforms between layouts (torch Linear stores [out, in]; we store [in, ...out dims]).
Families whose checkpoints use the standard `model.layers.{i}.self_attn.*` names (Qwen2, Qwen3)
use `dense_key_map` as is; its entries follow the config's switches (q/k norm, q/k/v bias).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from apo_jax.models.decoder import DecoderConfig


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_key: str
    hf_shape: tuple[int, ...]
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x):
    return x


def _linear(out_dims: tuple[int, ...], in_dim: int, in_first: bool = True) -> tuple:
    """torch [prod(out), in] <-> ours [in, *out] (in_first) or [*in, out] for o_proj/down."""
    if in_first:
        to_jax = lambda w: w.T.reshape(in_dim, *out_dims)
        to_hf = lambda w: w.reshape(in_dim, -1).T
    else:  # ours is [*in_dims, out]; `in_dim` here is the flattened input size
        to_jax = lambda w: w.T.reshape(*out_dims)
        to_hf = lambda w: w.reshape(-1, w.shape[-1]).T
    return to_jax, to_hf


def _bias(out_dims: tuple[int, ...]) -> tuple:
    """torch [prod(out)] <-> ours [*out]."""
    return (lambda b: b.reshape(*out_dims)), (lambda b: b.reshape(-1))


def dense_key_map(cfg: DecoderConfig) -> dict[tuple, Entry]:
    """Our parameter path -> (HF key, HF shape, transforms)."""
    d, f, n, k, h = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
    )
    table = {
        ("embed_tokens",): Entry("model.embed_tokens.weight", (cfg.vocab_size, d), _same, _same),
        ("norm", "scale"): Entry("model.norm.weight", (d,), _same, _same),
    }
    if not cfg.tie_word_embeddings:
        table[("lm_head",)] = Entry("lm_head.weight", (cfg.vocab_size, d), _same, _same)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        linear = {
            ("attn", "q_proj"): (p + "self_attn.q_proj.weight", (n * h, d), _linear((n, h), d)),
            ("attn", "k_proj"): (p + "self_attn.k_proj.weight", (k * h, d), _linear((k, h), d)),
            ("attn", "v_proj"): (p + "self_attn.v_proj.weight", (k * h, d), _linear((k, h), d)),
            ("attn", "o_proj"): (
                p + "self_attn.o_proj.weight",
                (d, n * h),
                _linear((n, h, d), n * h, in_first=False),
            ),
            ("mlp", "gate_proj"): (p + "mlp.gate_proj.weight", (f, d), _linear((f,), d)),
            ("mlp", "up_proj"): (p + "mlp.up_proj.weight", (f, d), _linear((f,), d)),
            ("mlp", "down_proj"): (p + "mlp.down_proj.weight", (d, f), _linear((d,), f)),
        }
        if cfg.qkv_bias:
            for name, heads in (("q", n), ("k", k), ("v", k)):
                key = p + f"self_attn.{name}_proj.bias"
                linear[("attn", f"{name}_bias")] = (key, (heads * h,), _bias((heads, h)))
        for path, (key, shape, (to_jax, to_hf)) in linear.items():
            table[("layers", i, *path)] = Entry(key, shape, to_jax, to_hf)
        norms = {
            ("input_layernorm", "scale"): (p + "input_layernorm.weight", (d,)),
            ("post_attention_layernorm", "scale"): (p + "post_attention_layernorm.weight", (d,)),
        }
        if cfg.qk_norm:
            norms[("attn", "q_norm", "scale")] = (p + "self_attn.q_norm.weight", (h,))
            norms[("attn", "k_norm", "scale")] = (p + "self_attn.k_norm.weight", (h,))
        for path, (key, shape) in norms.items():
            table[("layers", i, *path)] = Entry(key, shape, _same, _same)
    return table
