"""The dense pre-norm decoder every model family shares (Qwen3, Qwen2 / Qwen2.5), in Flax NNX.

A family is this decoder plus its config (`DecoderConfig` subclass: presets, HF config.json in
and out, two switches: q/k RMSNorm, q/k/v biases) and its HF key map; see models/family.py.

Shapes in the package alphabet (apo_jax/__init__.py): B rows, T query tokens, S key/value (cache)
slots, D model width, N query heads, K kv heads, R = N // K query heads per kv head, H head dim,
F MLP width, V vocabulary, L layers.

Dtype policy:
  - parameters are stored in `param_dtype` (float32 for the learner, bfloat16 for a rollout copy);
  - matmuls run in the compute `dtype` with float32 accumulation (`preferred_element_type`);
  - RMSNorm statistics, attention logits and softmax, final logits and everything downstream
    (log-probs, losses) are float32.

Every parameter carries logical axis names (`axes` metadata) that `sharding.py` maps to mesh axes.

Layers: `scan_layers=True` stacks them ([L, ...] parameters, logical axis "layers") and runs them
under lax.scan when uncached (one compiled layer; with `remat` the checkpointed body keeps only
each layer's input); cached calls loop over layer slices. `scan_layers=False` keeps per-layer
weights and a Python loop (faster CPU decode); there XLA may undo the per-block checkpoints.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import NamedSharding, PartitionSpec
from jaxtyping import Array, Float, Int

from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import attention as attention_lib
from apo_jax.models import lora as lora_lib
from apo_jax.models import rope
from apo_jax.models.family import KVLayer, RopeTables

_cp = jax.checkpoint_policies
# model.remat: what a block keeps for the backward pass besides its input (the residual stream,
# which `jax.checkpoint` always saves). "none" keeps every activation (no checkpointing).
REMAT_POLICIES = {
    "none": None,
    "block": _cp.nothing_saveable,  # only the block input: ~one residual stream per layer
    "nothing_saveable": _cp.nothing_saveable,
    "dots_saveable": _cp.dots_saveable,  # every matmul output (fast backward, most memory)
    "dots_with_no_batch_dims_saveable": _cp.dots_with_no_batch_dims_saveable,
    "save_attention_out": _cp.save_only_these_names("attention_out"),  # skip attention recompute
}


_ROW_MESH: contextvars.ContextVar = contextvars.ContextVar("row_mesh", default=None)


@contextlib.contextmanager
def rows_split_over(mesh):
    """While tracing inside this context, `rows_sharded` splits activations over `mesh` (and
    attention kernels run under shard_map over it: attention.kernels_split_over)."""
    token = _ROW_MESH.set(mesh)
    try:
        with attention_lib.kernels_split_over(mesh):
            yield
    finally:
        _ROW_MESH.reset(token)


def rows_sharded(x: Array) -> Array:
    """Activations [B, ...] split by rows over the batch mesh axes, when traced inside
    `rows_split_over(mesh)` (trainer/step.py does). Without this the SPMD partitioner may keep the
    FSDP-sharded weights in place and run every matmul on the whole batch with partial sums
    all-reduced: measured, full-batch f32 [B*T, F] buffers and 31 GiB instead of ~3 for the
    paper's scoring pass on 4 devices."""
    mesh = _ROW_MESH.get()
    axes = sharding_lib.TRAIN_RULES["batch"]
    if mesh is None:
        return x
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    if x.shape[0] % size:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(axes)))


_REMAT_BOOLS = {"true": "block", "false": "none"}  # as text: `--config.model.remat=True`


def check_remat(remat: bool | str) -> str:
    """`model.remat` as a policy name; True / False (older configs) mean "block" / "none", also
    as the text a command line gives (the key holds a string, so the flag parses as one)."""
    if isinstance(remat, bool):
        return "block" if remat else "none"
    if isinstance(remat, str) and remat.lower() in _REMAT_BOOLS:
        return _REMAT_BOOLS[remat.lower()]
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
    return remat


def write_kv(kv: KVLayer, k: Array, v: Array, index: Int[Array, ""] | Int[Array, " B"]) -> KVLayer:
    """Writes this step's k, v [B, T, K, H] at slots index .. index + T - 1 of one layer's cache
    ([B, K, S, H]: the attention dots batch over (B, K); see rollout/kv_cache.py). `index` is
    one slot for every row (a prefill) or one per row [B] (decode: rows at their own lengths)."""
    if jnp.ndim(index) == 0:
        put = lambda c, x: jax.lax.dynamic_update_slice(c, x, (0, 0, index, 0))
    else:  # a per-row slot: XLA makes this a scatter of B [K, T, H] windows, in place
        row = lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, i, 0))
        put = lambda c, x: jax.vmap(row)(c, x, index)
    k = put(kv[0], k.transpose(0, 2, 1, 3).astype(kv[0].dtype))
    v = put(kv[1], v.transpose(0, 2, 1, 3).astype(kv[1].dtype))
    return k, v  # [B, K, S, H] each


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Architecture of a dense pre-norm decoder (what a Hugging Face `config.json` describes).

    Each family subclasses this with its presets, `from_hf` / `to_hf` and its two switches
    (class attributes, not fields: they are what makes the family, not a per-model choice)."""

    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H (explicit: not hidden_size // num_heads in general)
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 40960

    qk_norm: ClassVar[bool] = False  # RMSNorm of q and k per head before RoPE (Qwen3)
    qkv_bias: ClassVar[bool] = False  # biases on the q, k, v projections (Qwen2)

    def __post_init__(self):
        name = type(self).__name__
        for field in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}.{field} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"{name}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention needs that)"
            )
        if self.head_dim % 2:
            raise ValueError(f"{name}.head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(
                f"{name}: rope_theta ({self.rope_theta}) and rms_norm_eps "
                f"({self.rms_norm_eps}) must be positive"
            )

    @property
    def num_params(self) -> int:
        d, f, n, k, h = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        layer = d * h * (2 * n + 2 * k) + 3 * d * f + 2 * d
        layer += 2 * h if self.qk_norm else 0
        layer += (n + 2 * k) * h if self.qkv_bias else 0
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * layer + d + head


# --- building blocks -------------------------------------------------------------------------


def _param(rngs: nnx.Rngs, shape, axes, dtype, std=0.02) -> nnx.Param:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), axes=axes)


def _dot(eq: str, x: Array, w: Array, dtype) -> Array:
    """einsum in the compute dtype with float32 accumulation, result in the compute dtype."""
    out = jnp.einsum(eq, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)


class RMSNorm(nnx.Module):
    """x / rms(x) in float32, cast back to the input dtype, then scaled (no 1 + w offset)."""

    def __init__(self, dim: int, eps: float, axis_name: str, param_dtype):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis_name,))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * y.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype,
        dtype,
        attention: str = "naive",
        lora: lora_lib.LoRAConfig | None = None,
        lora_rngs: nnx.Rngs | None = None,
    ):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.cfg, self.dtype = cfg, dtype
        self.lora_scale = lora.scale if lora else 0.0
        self.attention = attention_lib.check_impl(attention)  # model.attention
        self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), param_dtype)
        self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), param_dtype)
        self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), param_dtype)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, cfg.rms_norm_eps, "head_dim", param_dtype)
            self.k_norm = RMSNorm(h, cfg.rms_norm_eps, "head_dim", param_dtype)
        if cfg.qkv_bias:  # zeros, as transformers initialises Linear biases
            self.q_bias = nnx.Param(jnp.zeros((n, h), param_dtype), axes=("heads", "head_dim"))
            self.k_bias = nnx.Param(jnp.zeros((k, h), param_dtype), axes=("kv_heads", "head_dim"))
            self.v_bias = nnx.Param(jnp.zeros((k, h), param_dtype), axes=("kv_heads", "head_dim"))
        if lora:  # model.lora: adapters beside the targeted projections (models/lora.py)
            lora_lib.add_adapters(self, lora, "attn", lora_rngs)

    def __call__(
        self,
        x: Float[Array, "B T D"],
        rope_cs: RopeTables,
        mask: attention_lib.Mask,
        kv: KVLayer | None = None,
        cache_index: Int[Array, ""] | Int[Array, " B"] | None = None,
    ) -> tuple[Array, KVLayer]:
        cfg, dt = self.cfg, self.dtype
        q = _project(self, "q_proj", "BTD,DNH->BTNH", x)  # [B, T, N, H]
        k = _project(self, "k_proj", "BTD,DKH->BTKH", x)  # [B, T, K, H]
        v = _project(self, "v_proj", "BTD,DKH->BTKH", x)  # [B, T, K, H]
        if cfg.qkv_bias:  # added in the compute dtype, like torch's Linear(bias=True)
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:  # Qwen3 normalises q and k per head *before* the rotation
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rope.apply(q, rope_cs), rope.apply(k, rope_cs)
        b, t = q.shape[:2]
        kv_eq = "BSKH"  # uncached: attend to this call's own keys, [B, S=T, K, H]
        if kv is not None:  # the cache is [B, K, S, H]: see rollout/kv_cache.py for why
            k, v = write_kv(kv, k, v, cache_index)
            kv_eq = "BKSH"
        # Every implementation takes the one Mask type; `naive` densifies it inside.
        out = attention_lib.attend(q, k, v, mask, impl=self.attention, kv_layout=kv_eq)
        # [B, T, N, H]; what model.remat=save_attention_out keeps
        out = checkpoint_name(out, "attention_out")
        # Contract over N*H as one dim: with "BTNH,NHD" XLA:CPU picked an [H, N, D] order and
        # transposed the whole o_proj weight on every call (a copy per layer per decode step).
        nh = cfg.num_heads * cfg.head_dim
        out = out.reshape(b, t, nh)  # [B, T, N*H]
        flat = lambda w: w.reshape(nh, -1)  # [N·H, D]
        return _project(self, "o_proj", "BTE,ED->BTD", out, flat), (k, v)


class MLP(nnx.Module):
    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype,
        dtype,
        lora: lora_lib.LoRAConfig | None = None,
        lora_rngs: nnx.Rngs | None = None,
    ):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.dtype = dtype
        self.lora_scale = lora.scale if lora else 0.0
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), param_dtype)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), param_dtype)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), param_dtype)
        if lora:
            lora_lib.add_adapters(self, lora, "mlp", lora_rngs)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        gate = _project(self, "gate_proj", "BTD,DF->BTF", x)  # [B, T, F]
        up = _project(self, "up_proj", "BTD,DF->BTF", x)  # [B, T, F]
        return _project(self, "down_proj", "BTF,FD->BTD", jax.nn.silu(gate) * up)


def _project(module: nnx.Module, proj: str, eq: str, x: Array, view=lambda w: w) -> Array:
    """x [B, T, I] through projection `proj` of `module` (its weight seen through `view`), with
    the projection's LoRA adapter if it has one (models/lora.py): folded into the weight for
    calls with many tokens, added as s·B(A x) for decode steps."""
    dt, scale = module.dtype, module.lora_scale
    if scale and lora_lib.merge_pays(module, proj, x.shape[0] * x.shape[1]):
        return _dot(eq, x, view(lora_lib.merged_weight(module, proj, scale, dt)), dt)
    y = _dot(eq, x, view(getattr(module, proj)[...]), dt)
    d = lora_lib.delta(module, proj, x, scale, dt, rows_sharded) if scale else None
    return y if d is None else y + d


class Block(nnx.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype,
        dtype,
        attention: str = "naive",
        lora: lora_lib.LoRAConfig | None = None,
        lora_rngs: nnx.Rngs | None = None,
    ):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", param_dtype)
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, lora=lora, lora_rngs=lora_rngs)
        self.attn = Attention(cfg, attention=attention, **kw)
        self.post_attention_layernorm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, "norm", param_dtype
        )
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x, rope_cs, mask, kv=None, cache_index=None):
        h, kv = self.attn(self.input_layernorm(x), rope_cs, mask, kv, cache_index)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Decoder(nnx.Module):
    """Dense causal LM (any family's config). `model(input_ids)` returns float32 logits
    [B, T, V]. Implements `family.CausalLM`."""

    def __init__(
        self,
        cfg: DecoderConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        remat: bool | str = False,
        attention: str = "naive",
        scan_layers: bool = False,
        lora: lora_lib.LoRAConfig | None = None,
    ):
        self.cfg, self.dtype = cfg, dtype
        self.remat = check_remat(remat)  # model.remat: a REMAT_POLICIES name
        # model.attention (models/attention.py); naive is the dense reference.
        self.attention = attention_lib.check_impl(attention)
        v, d = cfg.vocab_size, cfg.hidden_size
        self.embed_tokens = _param(rngs, (v, d), ("vocab", "embed"), param_dtype)
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype, attention=attention)
        if lora:  # model.lora: the adapters draw from their own stream (the base's init is kept)
            kw.update(lora=lora, lora_rngs=nnx.Rngs(lora=lora.seed))
        blocks = [Block(cfg, **kw) for _ in range(cfg.num_layers)]
        # model.scan_layers: one Block whose parameters carry a leading [L] axis ("layers"),
        # run under lax.scan when uncached, so compile time does not grow with depth.
        self.scan_layers = bool(scan_layers)
        self.layers = stack_blocks(blocks) if scan_layers else nnx.List(blocks)
        self.norm = RMSNorm(d, cfg.rms_norm_eps, "norm", param_dtype)
        if not cfg.tie_word_embeddings:
            # Stored like the embedding, [V, D] (HF's lm_head.weight layout), so that the fused
            # log-prob code sees one unembedding layout whether or not the head is tied.
            self.lm_head = _param(rngs, (v, d), ("vocab", "embed"), param_dtype)

    def rope_tables(self, positions: Int[Array, "B T"]) -> RopeTables:
        """cos/sin tables for `positions` (models/rope.py), for `hidden_states(rope_cs=)`."""
        return rope.tables(positions, self.cfg.head_dim, self.cfg.rope_theta)

    def unembed(self) -> Float[Array, "V D"]:
        """The LM head matrix, rows indexed by vocabulary."""
        w = self.embed_tokens if self.cfg.tie_word_embeddings else self.lm_head
        return w[...]

    def hidden_states(
        self,
        input_ids: Int[Array, "B T"],
        positions: Int[Array, "B T"],
        mask: attention_lib.Mask,
        cache: Sequence[KVLayer] | None = None,
        cache_index: Int[Array, ""] | Int[Array, " B"] | None = None,
        *,
        rope_cs: RopeTables | None = None,
    ) -> tuple[Float[Array, "B T D"], list[KVLayer] | None]:
        """Final-norm hidden states, plus the updated per-layer KV cache when one is given.

        `mask` (an `attention.Mask`, for every `model.attention`) says which keys each query
        sees: uncached (S == T) `Mask.from_valid` for padded rows, `Mask.from_segments` for
        packed rows (positions then restart at 0 in each segment); with a cache of length S,
        this step's T keys are written at slots `cache_index .. cache_index + T - 1` first
        (`cache_index` a scalar, or [B]: each row's own slot) and
        `Mask.for_cache` ranges over all S slots.
        `rope_cs`, if given, are precomputed `rope.tables(positions, ...)` (positions unused).
        """
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)  # [B, T, D]
        x = rows_sharded(x)
        if rope_cs is None:
            rope_cs = self.rope_tables(positions)
        new_cache = [] if cache is not None else None
        policy = REMAT_POLICIES[self.remat]
        if self.scan_layers:
            graphdef, stacked = nnx.split(self.layers)
            if cache is None:  # training / scoring: one compiled layer, scanned
                x = _scan_blocks(graphdef, stacked, x, rope_cs, mask, self.remat, policy)
            else:  # rollout: a Python loop over layer slices, each with its cache entry
                for i in range(self.cfg.num_layers):
                    block = nnx.merge(graphdef, jax.tree.map(lambda w, i=i: w[i], stacked))
                    x, kv = block(x, rope_cs, mask, cache[i], cache_index)
                    new_cache.append(kv)
            return self.norm(x), new_cache
        run = lambda blk, x, kv: blk(x, rope_cs, mask, kv, cache_index)
        if self.remat != "none" and cache is None:  # cached calls are never differentiated
            run = nnx.remat(run, policy=policy)
        for i, block in enumerate(self.layers):
            x, kv = run(block, rows_sharded(x), None if cache is None else cache[i])
            if new_cache is not None:
                new_cache.append(kv)
        return self.norm(x), new_cache

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        w = self.unembed().astype(self.dtype)
        return jnp.einsum(
            "BTD,VD->BTV", hidden.astype(self.dtype), w, preferred_element_type=jnp.float32
        )

    def __call__(
        self,
        input_ids: Int[Array, "B T"],
        *,
        attention_mask: Array | None = None,
        positions: Int[Array, "B T"] | None = None,
    ) -> Float[Array, "B T V"]:
        """Causal forward pass. `attention_mask` [B, T] marks real tokens (1) vs padding (0);
        positions default to the count of real tokens before each one, so a left- or
        right-padded row gives the same logits at its real tokens as the unpadded row."""
        positions, mask = causal_inputs(input_ids, attention_mask, positions)
        hidden = self.hidden_states(input_ids, positions, mask)[0]
        return self.logits(hidden)


def _scan_blocks(graphdef, stacked, x, rope_cs, mask, remat: str, policy):
    """x through every layer of `stacked` ([L, ...] parameters) with lax.scan. Under remat the
    scanned body is checkpointed: the backward pass keeps only each layer's input x (plus what
    `policy` saves), one residual stream per layer, and recomputes the rest layer by layer."""

    def body(x, params):
        x, _ = nnx.merge(graphdef, params)(rows_sharded(x), rope_cs, mask)
        return rows_sharded(x), None

    if remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)  # scan keeps the order
    return jax.lax.scan(body, x, stacked)[0]


def stack_blocks(blocks: Sequence[Block]) -> Block:
    """One Block whose parameters are the blocks' stacked along a new leading axis [L, ...],
    with the logical axis "layers" (unsharded: infra/sharding.py) prepended to their `axes`."""
    graphdef, _ = nnx.split(blocks[0])
    stacked = jax.tree.map(lambda *w: jnp.stack(w), *(nnx.split(b)[1] for b in blocks))
    for _, variable in nnx.to_flat_state(stacked):
        variable.set_metadata("axes", ("layers", *variable.get_metadata()["axes"]))
    return nnx.merge(graphdef, stacked)


def causal_inputs(
    input_ids: Int[Array, "B T"],
    attention_mask: Array | None = None,
    positions: Array | None = None,
) -> tuple[Int[Array, "B T"], attention_lib.Mask]:
    """Positions and the causal + padding mask (described: `Mask.from_valid`, so each row's
    real tokens must be contiguous) for an uncached forward pass of padded rows."""
    b, t = input_ids.shape
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    if positions is None:
        positions = jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0).astype(jnp.int32)  # [B, T]
    return positions, attention_lib.Mask.from_valid(valid)


def init_model(cfg: DecoderConfig, seed: int = 0, **kwargs) -> Decoder:
    """A randomly initialised model of any family (HF-like init: normal(0.02), norms at one,
    biases at zero)."""
    return Decoder(cfg, rngs=nnx.Rngs(params=seed), **kwargs)
