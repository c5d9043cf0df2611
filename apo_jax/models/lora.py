"""LoRA adapters on the decoder's projections: W x + (alpha / r) · B(A x) (Hu et al., 2021).

The adapters are parameters of the projections' own modules (`Attention`, `MLP` in
models/decoder.py), typed `nnx.LoRAParam` so that one filter separates them from the frozen base
(`nnx.Param`): the train state, gradients and optimizer moments hold the adapters alone, and the
base is a separate argument shared by the train step, the scorer and the sampler.

For a base weight of shape [*I, *O] (its input dims first; o_proj has two, [N, H, D]):
  A: [*I, r]  logical axes (*the base's input axes, "lora_rank")   uniform(±1/sqrt(prod I))
  B: [r, *O]  logical axes ("lora_rank", *the base's output axes)  zeros
so the adapters are split over the mesh as their base is (R is never split), and a fresh adapter
changes nothing: B = 0 makes the delta exactly zero, hence the base's logits and samples.
Shapes: r the LoRA rank, I / O a projection's flattened input / output size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array

# model.lora.targets names -> (module attribute holding the projection, projection name).
TARGETS = {
    "q": ("attn", "q_proj"),
    "k": ("attn", "k_proj"),
    "v": ("attn", "v_proj"),
    "o": ("attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}
# Input dims of each projection's stored weight (the rest are output dims).
IN_DIMS = {proj: 2 if proj == "o_proj" else 1 for _, proj in TARGETS.values()}
BASE_DTYPES = ("bfloat16", "float32")  # model.lora.base_dtype
RANK_AXIS = "lora_rank"  # logical axis of r (unsharded: infra/sharding.py)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """model.lora.*: rank r > 0, alpha, the target projections, the adapters' dtype."""

    rank: int
    alpha: float
    targets: tuple[str, ...]  # keys of TARGETS
    param_dtype: Any = jnp.float32  # the adapters' dtype (model.param_dtype)
    seed: int = 0  # the adapters' own init stream: the base's init does not move with LoRA

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def projections(self, module: str) -> tuple[str, ...]:
        """The targeted projections of `module` ("attn" or "mlp"), in TARGETS order."""
        return tuple(p for t, (m, p) in TARGETS.items() if m == module and t in self.targets)


def parse_targets(value: str | Sequence[str], key: str = "model.lora.targets") -> tuple[str, ...]:
    """model.lora.targets as a tuple of TARGETS keys, from "q,k,v" or a sequence; errors name
    the key."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names if str(n).strip()]
    bad = [n for n in names if n not in TARGETS]
    if bad or not names:
        raise ValueError(
            f"config.{key}={value!r}: give a comma-separated subset of {', '.join(TARGETS)}"
            + (f" ({bad[0]!r} is none of them)" if bad else "")
        )
    if len(set(names)) != len(names):
        raise ValueError(f"config.{key}={value!r}: a projection is named twice")
    return tuple(t for t in TARGETS if t in names)


def add_adapters(module: nnx.Module, lora: LoRAConfig, name: str, rngs: nnx.Rngs) -> None:
    """Creates the LoRAParams {proj}_lora_a / _lora_b on `module` ("attn" / "mlp" is `name`)
    next to each targeted projection weight."""
    for proj in lora.projections(name):
        base = getattr(module, proj)
        shape, axes, k = base.get_value().shape, base.get_metadata()["axes"], IN_DIMS[proj]
        fan_in = math.prod(shape[:k])
        bound = 1.0 / math.sqrt(fan_in)  # PEFT's default: kaiming_uniform(a=sqrt(5)) on A
        a = jax.random.uniform(rngs.lora(), (*shape[:k], lora.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((lora.rank, *shape[k:]), jnp.float32)
        a = nnx.LoRAParam(a.astype(lora.param_dtype), axes=(*axes[:k], RANK_AXIS))
        setattr(module, f"{proj}_lora_a", a)
        b = nnx.LoRAParam(b.astype(lora.param_dtype), axes=(RANK_AXIS, *axes[k:]))
        setattr(module, f"{proj}_lora_b", b)


def delta(
    module: nnx.Module, proj: str, x: Array, scale: float, dtype, constrain=lambda y: y
) -> Array | None:
    """(alpha / r) · B(A x) for projection `proj` of `module`, x [B, T, I] (input dims
    flattened), as [B, T, *O] in the compute dtype; None when `proj` has no adapter.

    `constrain` keeps A x and the delta split by rows (decoder.rows_sharded): A and B are split
    like their base, and without it the SPMD partitioner may contract A's split input dim by
    moving the activations instead, with a whole-batch [B, T, O] delta on every device."""
    a = getattr(module, f"{proj}_lora_a", None)
    if a is None:
        return None
    a = a[...]
    b = getattr(module, f"{proj}_lora_b")[...]
    rank = b.shape[0]
    a2 = a.reshape(-1, rank).astype(dtype)  # [I, r]
    b2 = b.reshape(rank, -1).astype(dtype)  # [r, O]
    xa = jnp.einsum("BTI,IR->BTR", x.astype(dtype), a2, preferred_element_type=jnp.float32)
    xa = constrain((xa * scale).astype(dtype))  # [B, T, R]
    out = jnp.einsum("BTR,RO->BTO", xa, b2, preferred_element_type=jnp.float32)
    return constrain(out.astype(dtype)).reshape(*x.shape[:2], *b.shape[1:])  # [B, T, *O]


def merge_pays(module: nnx.Module, proj: str, tokens: int) -> bool:
    """Whether this call should fold the adapter into the weight (W + s·A B, one weight-sized
    temporary) rather than add s·B(A x) to the output (activation-sized temporaries: the
    delta and its float32 accumulator, [B, T, O] each): when the call has at least as many
    tokens as the projection has inputs, as in training, scoring and prefill. Decode steps
    (a few tokens) take the delta, which reads the small A and B instead of writing a weight."""
    a = getattr(module, f"{proj}_lora_a", None)
    return a is not None and tokens >= math.prod(a.get_value().shape[:-1])


def merged_weight(module: nnx.Module, proj: str, scale: float, dtype) -> Array:
    """W + (alpha / r) · A B in the compute dtype, summed in float32 (B = 0 gives W exactly)."""
    w = getattr(module, proj)[...]
    a, b = getattr(module, f"{proj}_lora_a")[...], getattr(module, f"{proj}_lora_b")[...]
    rank = b.shape[0]
    ab = jnp.einsum(
        "IR,RO->IO",
        a.reshape(-1, rank).astype(dtype),
        b.reshape(rank, -1).astype(dtype),
        preferred_element_type=jnp.float32,
    )  # [I, O]
    return (w.astype(jnp.float32) + scale * ab.reshape(w.shape)).astype(dtype)


# --- the two halves of a LoRA model's parameters --------------------------------------------


def split(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(adapters, base) of a LoRA model's parameter state."""
    return nnx.split_state(params, nnx.LoRAParam, ...)


def join(base: nnx.State, adapters: nnx.State) -> nnx.State:
    """The whole parameter state (what `nnx.merge(graphdef, ...)` takes)."""
    return nnx.merge_state(base, adapters)


def switched_off(adapters: nnx.State) -> nnx.State:
    """Adapters that change nothing (B = 0): with them the model is its base exactly. The KL
    reference of a LoRA run is the base scored this way, without a second copy of it."""
    return jax.tree.map(jnp.zeros_like, adapters)


def merged_base(params: nnx.State, lora: LoRAConfig) -> nnx.State:
    """The base state with every adapter folded in, W + (alpha / r) · A B, in float32 then the
    base's dtype (export: a plain model of the same architecture)."""
    flat = dict(nnx.to_flat_state(params))
    out = []
    for path, var in flat.items():
        if isinstance(var, nnx.LoRAParam):
            continue
        a = flat.get((*path[:-1], f"{path[-1]}_lora_a"))
        if a is None:
            out.append((path, var))
            continue
        b = flat[(*path[:-1], f"{path[-1]}_lora_b")].get_value()
        a, w = a.get_value(), var.get_value()
        stacked = w.ndim == a.ndim + b.ndim - 3  # scan_layers: a leading [L] on all three
        eq = "LIR,LRO->LIO" if stacked else "IR,RO->IO"
        lead = w.shape[:1] if stacked else ()
        a2 = a.reshape(*lead, -1, a.shape[-1]).astype(jnp.float32)
        b2 = b.reshape(*lead, b.shape[len(lead)], -1).astype(jnp.float32)
        ab = jnp.einsum(eq, a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
        out.append((path, var.replace((w.astype(jnp.float32) + lora.scale * ab).astype(w.dtype))))
    return nnx.from_flat_state(out)
