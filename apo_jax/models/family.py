"""What the rest of the package needs from a model family, written down once.

The sampler, the KV cache, the train step and the HF checkpoint I/O only ever use a model
through `CausalLM` and its config through `ModelConfig`; a family (models/qwen3.py,
models/qwen2.py) is a `Family` record: its config class (presets, `from_hf` / `to_hf`), its HF
key map and its constructor. models/registry.py lists the families, one line each.

Logical axes: every `nnx.Param` a family creates carries `axes` metadata (names from
infra/sharding.py's table: vocab, embed, heads, kv_heads, head_dim, mlp, norm), which is all the
sharding code reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from jaxtyping import Array, Bool, Float, Int

RopeTables = tuple[Array, Array]  # (cos, sin), each [B, T, 1, H/2] float32
KVLayer = tuple[Array, Array]  # (k, v) of one layer's cache, each [B, K, S, H]


class ModelConfig(Protocol):
    """A family's architecture record (a frozen dataclass)."""

    # cache geometry (rollout/kv_cache.py)
    num_layers: int  # L
    num_kv_heads: int  # K
    head_dim: int  # H
    # the rest of the package
    vocab_size: int  # V
    max_position_embeddings: int
    tie_word_embeddings: bool

    @property
    def num_params(self) -> int: ...

    def to_hf(self) -> dict:
        """The `config.json` dict transformers reads back as the same architecture."""
        ...


class CausalLM(Protocol):
    """A model as the sampler, train step and HF I/O use it."""

    cfg: ModelConfig
    dtype: Any  # compute dtype
    attention: str  # model.attention: "naive" takes dense masks, the rest attention.Mask

    def hidden_states(
        self,
        input_ids: Int[Array, "B T"],
        positions: Int[Array, "B T"] | None,
        mask: Bool[Array, "B T S"],
        cache: Sequence[KVLayer] | None = None,
        cache_index: Int[Array, ""] | None = None,
        *,
        rope_cs: RopeTables | None = None,
    ) -> tuple[Float[Array, "B T D"], list[KVLayer] | None]:
        """Final-norm hidden states, plus the updated per-layer cache when one is given."""
        ...

    def rope_tables(self, positions: Int[Array, "B T"]) -> RopeTables:
        """Position tables a decode loop builds once and slices per step (`rope_cs`)."""
        ...

    def unembed(self) -> Float[Array, "V D"]:
        """The LM head matrix, rows indexed by vocabulary (fused log-prob code reads it)."""
        ...

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]: ...


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family: how to recognise, configure, build and (de)serialise it."""

    name: str  # e.g. "qwen3"
    config: type  # ModelConfig class with `from_hf(dict | path, where=)` and `to_hf()`
    model_types: tuple[str, ...]  # config.json "model_type" values
    architectures: tuple[str, ...]  # config.json "architectures" values
    presets: Mapping[str, Callable[[], ModelConfig]]  # preset name -> config
    key_map: Callable[[ModelConfig], dict]  # our param path -> hf_keys.Entry
    build: Callable[..., CausalLM]  # build(cfg, *, rngs, param_dtype, dtype, remat, attention)

    def describe(self) -> str:
        types, archs = "/".join(self.model_types), ", ".join(self.architectures)
        return f"{self.name} (model_type {types}: {archs})"


# --- helpers shared by the families' config.json readers ----------------------------------------


def read_config(source: str | os.PathLike | Mapping, where: str | None = None) -> tuple[dict, str]:
    """(config.json dict, name for error messages) from a path or an already-read dict."""
    if isinstance(source, Mapping):
        return dict(source), where or "config.json"
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (expected a Hugging Face config.json)")
    with open(path) as f:
        try:
            hf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise ValueError(
            f"{path}: expected a JSON object of model config keys, got a {type(hf).__name__}"
        )
    return hf, where or path


def config_error(where: str, key: str, why: str) -> ValueError:
    return ValueError(f"{where}: key {key!r} {why}")


# config.json keys every dense decoder family reads without a default
DENSE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def require(hf: dict, where: str, *keys: str) -> None:
    for key in keys:
        if key not in hf:
            raise config_error(where, key, "is missing")


def rope_theta(hf: dict, where: str) -> float:
    """The RoPE base from the old top-level `rope_theta` or the newer `rope_parameters` form;
    only plain RoPE (rope_type 'default') is implemented."""
    theta = hf.get("rope_theta")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling")
    if isinstance(rope, dict):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise config_error(
                where, "rope_parameters", f"has rope_type {rope_type!r}; only 'default'"
            )
        theta = rope.get("rope_theta", theta)
    if theta is None:
        # transformers would silently fall back to 10,000 here, whatever the model was trained at.
        raise config_error(
            where, "rope_theta", "is missing (neither top-level nor in rope_parameters)"
        )
    return float(theta)


def dense_config(cls, hf: dict, where: str, *, head_dim: int, max_positions: int, tied: bool):
    """`cls(...)` from the config.json fields every dense decoder family shares (the family has
    already checked what is specific to it); a value the dataclass refuses names the file.
    `max_positions` and `tied` are transformers' defaults for this family when the key is absent.
    """
    heads = hf["num_attention_heads"]
    try:
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rope_theta=rope_theta(hf, where),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", tied)),
            max_position_embeddings=hf.get("max_position_embeddings", max_positions),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def dense_hf(cfg, architecture: str, model_type: str) -> dict:
    """The config.json fields every dense decoder family writes (the family adds its own)."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        # Old readers look at the top level, transformers 5.x at rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "max_position_embeddings": cfg.max_position_embeddings,
        "use_sliding_window": False,
    }
