"""Causal GQA attention behind one selector (`model.attention`): a described mask, the naive
reference, a blockwise online-softmax XLA version (any backend: models/blockwise.py), cuDNN (GPU)
and splash (TPU).

Shapes: q [B, T, N, H]; k, v [B, S, K, H] ("BSKH", a call's own keys) or [B, K, S, H] ("BKSH",
the KV cache); N = K * G with query head n reading kv head n // G. Output [B, T, N, H] in q.dtype.
Scores, softmax statistics and accumulators are float32 in every implementation.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int

from apo_jax.models import blockwise

IMPLS = ("auto", "xla_blockwise", "cudnn", "splash", "naive")
MASK_VALUE = blockwise.MASK_VALUE  # the one masking constant (models/blockwise.py)
# Mesh axes a kernel call splits over: rows over the batch axes, heads over `tensor` (the
# TRAIN_RULES / ROLLOUT_RULES "batch" and "heads" entries; not imported, to keep models/ free of
# infra/).
_BATCH_AXES, _HEAD_AXIS = ("data", "fsdp"), "tensor"
_KERNEL_MESH: contextvars.ContextVar = contextvars.ContextVar("kernel_mesh", default=None)


@contextlib.contextmanager
def kernels_split_over(mesh):
    """While tracing inside this context, a Mosaic kernel (splash) runs under `jax.shard_map`
    over `mesh`: the SPMD partitioner cannot split a custom kernel call by itself ("Mosaic
    kernels cannot be automatically partitioned"). trainer/step.py (through
    decoder.rows_split_over) and the sampler's prefill enter it."""
    token = _KERNEL_MESH.set(mesh)
    try:
        yield
    finally:
        _KERNEL_MESH.reset(token)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Mask:
    """Which key slots each query sees, without a [B, T, S] array.

    Query t sits at slot `q_offset + t` and sees key slot s iff
    `kv_start[b] <= s < kv_end[b]` and `s <= q_offset + t` (causal). `q_offset=None` means a
    call's own keys (T == S, offset 0): the only case the cuDNN / splash kernels take.
    Training: `from_valid(valid)` (left-padded prompt + right-padded completion); prefill into an
    empty cache of P slots: `Mask(starts, full(P), None)`; a cached step: `for_cache`.
    Queries outside [kv_start, kv_end) are padding: their outputs are finite and implementation-
    defined (naive: mean of v; blockwise: 0 where no key is visible; kernels: 0).
    Packed rows (uncached only): `segment_ids` [B, T] puts several sequences end to end in one
    row; query t also needs segment_ids[t] == segment_ids[s], so attention never crosses a
    segment. Each segment's tokens are contiguous and its id differs from its neighbours'; 0
    marks padding (`from_segments`). The caller restarts RoPE positions at 0 in each segment.
    """

    kv_start: Int[Array, " B"]  # first real key slot (left padding before it)
    kv_end: Int[Array, " B"]  # one past the last real key slot (right padding / unfilled cache)
    q_offset: Int[Array, ""] | None = None  # slot of query 0 (the cache write index)
    segment_ids: Int[Array, "B T"] | None = None  # packed rows: the sequence of each token

    @classmethod
    def from_valid(cls, valid: Bool[Array, "B T"]) -> Mask:
        """Uncached mask from real-token flags; each row's real tokens must be contiguous."""
        valid = valid.astype(bool)
        t = valid.shape[1]
        idx = jnp.arange(t, dtype=jnp.int32)
        start = jnp.min(jnp.where(valid, idx, t), axis=1)  # [B]; t for an empty row
        end = jnp.max(jnp.where(valid, idx + 1, 0), axis=1)  # [B]; 0 for an empty row
        return cls(start.astype(jnp.int32), jnp.maximum(end, start).astype(jnp.int32))

    @classmethod
    def from_segments(cls, segment_ids: Int[Array, "B T"]) -> Mask:
        """Uncached mask of packed rows: ids >= 1 name a row's sequences (contiguous runs), 0
        marks padding (at the row's ends only: the real tokens of a row are contiguous)."""
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        bounds = cls.from_valid(segment_ids > 0)
        return cls(bounds.kv_start, bounds.kv_end, None, segment_ids)

    @classmethod
    def for_cache(cls, starts: Int[Array, " B"], index, num_queries: int) -> Mask:
        """T = num_queries queries written at cache slots index .. index + T - 1: they see the
        filled slots starts[b] .. their own."""
        index = jnp.asarray(index, jnp.int32)
        end = jnp.broadcast_to(index + num_queries, starts.shape).astype(jnp.int32)
        return cls(starts.astype(jnp.int32), end, index)

    def dense(self, num_queries: int, num_keys: int) -> Bool[Array, "B T S"]:
        """The [B, T, S] boolean this mask describes (for `naive` and tests)."""
        q = jnp.arange(num_queries, dtype=jnp.int32)
        if self.q_offset is not None:
            q = q + self.q_offset
        s = jnp.arange(num_keys, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
        lo, hi = self.kv_start[:, None, None], self.kv_end[:, None, None]
        dense = (s >= lo) & (s < hi) & (s <= q[None, :, None])  # [B, T, S]
        if self.segment_ids is not None:  # T == S: a packed row's tokens are its own keys
            seg = self.segment_ids
            dense = dense & (seg[:, :, None] == seg[:, None, :])
        return dense


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"model.attention must be one of {IMPLS}, got {impl!r}")
    return impl


def resolve(impl: str, q: Array, k: Array, mask: Mask, kv_layout: str = "BSKH") -> str:
    """The implementation a call runs. The kernels take the uncached shape only (q_offset None,
    T == S); a cached step under `cudnn` / `splash` runs `xla_blockwise` (decode and prefill
    with an offset are not kernel-shaped). `auto`: cuDNN on GPU when it takes the shapes,
    splash on TPU when it can be split (one device, or traced under `kernels_split_over`:
    lowered and compiled for a sharded v5e slice in tests/test_tpu_compile.py), else
    xla_blockwise. Packed rows (segment ids) under `cudnn` run xla_blockwise too:
    jax.nn.dot_product_attention (the pinned JAX) takes per-row lengths but no segment ids, and
    a dense mask would bring back the [T, T] buffer."""
    check_impl(impl)
    s = k.shape[2 if kv_layout == "BKSH" else 1]
    uncached = mask.q_offset is None and q.shape[1] == s
    if mask.segment_ids is not None and not uncached:
        raise ValueError("attention: segment ids describe uncached calls only (T == S, no offset)")
    packed = mask.segment_ids is not None
    backend = _platform()
    if impl == "cudnn" and backend != "gpu":
        raise ValueError(f"model.attention='cudnn' needs a GPU backend, this one is {backend!r}")
    if impl == "cudnn" and not _cudnn_takes(q):
        raise ValueError(
            f"model.attention='cudnn' takes bf16/fp16 with head_dim % 8 == 0 and <= 256, got "
            f"{q.dtype} head_dim {q.shape[-1]} (use 'auto' or 'xla_blockwise')"
        )
    if (impl in ("cudnn", "splash") and not uncached) or (impl == "cudnn" and packed):
        return "xla_blockwise"
    if impl == "auto":
        if backend == "gpu" and uncached and not packed and _cudnn_takes(q):
            return "cudnn"
        if backend == "tpu" and uncached and (_KERNEL_MESH.get() or jax.device_count() == 1):
            return "splash"
        return "xla_blockwise"
    return impl


def _platform() -> str:
    """The platform a call compiles for: the kernel mesh's devices (a TPU topology described on
    a CPU host by `--dry_run --target=tpu-*`), else the default backend."""
    mesh = _KERNEL_MESH.get()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def attend(
    q: Array,
    k: Array,
    v: Array,
    mask: Mask,
    *,
    impl: str = "auto",
    kv_layout: str = "BSKH",
    scale: float | None = None,
    block_q: int = 256,
    block_k: int = 256,
    interpret: bool = False,
) -> Array:
    """Causal GQA attention of q [B, T, N, H] over k, v (`kv_layout`), masked by `mask`.
    `block_q` / `block_k` size xla_blockwise's tiles; `interpret` runs splash in Pallas
    interpret mode (CPU tests)."""
    if kv_layout not in ("BSKH", "BKSH"):
        raise ValueError(f"kv_layout must be 'BSKH' or 'BKSH', got {kv_layout!r}")
    b, t, n, h = q.shape
    kh = k.shape[1 if kv_layout == "BKSH" else 2]
    if n % kh or k.shape != v.shape or k.shape[-1] != h:
        raise ValueError(f"attention: q {q.shape} does not fit k {k.shape} / v {v.shape}")
    scale = h**-0.5 if scale is None else scale
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    which = resolve(impl, q, k, mask, kv_layout)
    if which == "naive":
        return naive(q, k, v, mask, kv_layout=kv_layout, scale=scale)
    if which == "cudnn":
        return _cudnn(q, _to_bskh(k, kv_layout), _to_bskh(v, kv_layout), mask, scale)
    if which == "splash":
        kt, vt = (x if kv_layout == "BKSH" else x.transpose(0, 2, 1, 3) for x in (k, v))
        return _splash(q, kt, vt, mask, scale, interpret)
    offset = jnp.zeros((), jnp.int32) if mask.q_offset is None else mask.q_offset
    return blockwise.attend(
        q,
        k,
        v,
        mask.kv_start,
        mask.kv_end,
        offset,
        mask.segment_ids,
        block_q=block_q,
        block_k=block_k,
        scale=scale,
        kv_layout=kv_layout,
    )


# --- naive: the reference (the model's original code path) -------------------------------------
def naive(q, k, v, mask: Mask, *, kv_layout: str = "BSKH", scale: float) -> Array:
    """Materialises float32 scores [B, K, R, T, S]; the mask is densified here (the one place
    a [B, T, S] mask exists)."""
    b, t, n, h = q.shape
    kh = k.shape[1 if kv_layout == "BKSH" else 2]
    dt = q.dtype
    dense = mask.dense(t, k.shape[kv_layout.index("S")])  # [B, T, S]
    q = q.reshape(b, t, kh, n // kh, h)  # [B, T, K, R, H]
    scores = jnp.einsum(
        f"BTKRH,{kv_layout}->BKRTS", q, k.astype(dt), preferred_element_type=jnp.float32
    )
    scores = scores * scale  # [B, K, R, T, S] float32
    scores = jnp.where(dense[:, None, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)  # [B, K, R, T, S]
    # Output BKRTH, then a small transpose: XLA:CPU has no bf16 x bf16 -> f32 kernel for the
    # BKSH dot with a BTKRH output (it fails at run time).
    out = jnp.einsum(
        f"BKRTS,{kv_layout}->BKRTH", probs, v.astype(dt), preferred_element_type=jnp.float32
    )
    return out.transpose(0, 3, 1, 2, 4).astype(dt).reshape(b, t, n, h)  # [B, T, N, H]


# --- cuDNN (GPU) -------------------------------------------------------------------------------
def _cudnn_takes(q: Array) -> bool:
    """cuDNN flash attention: fp16/bf16 only, head dim a multiple of 8 up to 256."""
    h = q.shape[-1]
    return q.dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= 256


def _to_bskh(x: Array, layout: str) -> Array:
    return x.transpose(0, 2, 1, 3) if layout == "BKSH" else x


def _roll_rows(x: Array, shift: Int[Array, " B"]) -> Array:
    """x [B, T, ...] with row b rotated left by shift[b] (a gather, O(T) memory)."""
    t = x.shape[1]
    idx = (jnp.arange(t, dtype=jnp.int32)[None, :] + shift[:, None]) % t  # [B, T]
    return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def _cudnn(q, k, v, mask: Mask, scale: float, implementation: str = "cudnn") -> Array:
    """cuDNN takes right padding (per-row lengths) with a causal mask, not left padding:
    rotate each row left by kv_start so its real tokens start at 0, attend, rotate back."""
    start, length = mask.kv_start, jnp.maximum(mask.kv_end - mask.kv_start, 0)
    qr, kr, vr = (_roll_rows(x, start) for x in (q, k, v))
    out = jax.nn.dot_product_attention(
        qr,
        kr,
        vr,
        scale=scale,
        is_causal=True,
        query_seq_lengths=length.astype(jnp.int32),
        key_value_seq_lengths=length.astype(jnp.int32),
        implementation=implementation,  # "xla" in the CPU test of the rotation
    )  # [B, T, N, H]
    out = _roll_rows(out, (q.shape[1] - start) % q.shape[1])
    return _zero_padding_rows(out, mask)


def _zero_padding_rows(out: Array, mask: Mask) -> Array:
    t = jnp.arange(out.shape[1], dtype=jnp.int32)[None, :]
    real = (t >= mask.kv_start[:, None]) & (t < mask.kv_end[:, None])  # [B, T]
    return jnp.where(real[:, :, None, None], out, 0).astype(out.dtype)


# --- splash (TPU Pallas) -----------------------------------------------------------------------
_SPLASH_TILE = 128  # the kernel's lane width: sequence lengths and tiles are multiples of it


@functools.lru_cache(maxsize=16)
def _splash_kernel(num_heads: int, length: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    blk = max(b for b in (512, 256, 128) if length % b == 0)
    sizes = splash.BlockSizes(
        block_q=blk,
        block_kv=blk,
        block_kv_compute=blk,
        block_q_dkv=blk,
        block_kv_dkv=blk,
        block_kv_dkv_compute=blk,
        block_q_dq=blk,
        block_kv_dq=blk,
    )
    causal = splash.MultiHeadMask([splash.CausalMask((length, length))] * num_heads)
    # Built eagerly: the kernel holds its mask tables as arrays, and this cache outlives the
    # trace that first asks for it (built under it, a later call would meet a leaked tracer).
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(
            causal, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
        )


def _splash(q, k, v, mask: Mask, scale: float, interpret: bool) -> Array:
    """Splash attention with a static causal mask; padding via segment ids (real tokens 1, or
    their packed sequence's id; padding 0: a padding query still sees itself, so no softmax row
    is empty). k, v [B, K, S, H]."""
    if _platform() != "tpu" and not interpret:
        raise ValueError(
            f"model.attention='splash' needs a TPU backend, this one is "
            f"{_platform()!r} (interpret=True runs it slowly elsewhere, for tests)"
        )
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, n, h = q.shape
    tp = -(-t // _SPLASH_TILE) * _SPLASH_TILE
    pad = lambda x, axis: jnp.pad(x, [(0, tp - t) if a == axis else (0, 0) for a in range(4)])
    qh = pad(q.transpose(0, 2, 1, 3) * jnp.asarray(scale, q.dtype), 2)  # [B, N, Tp, H]
    kh, vh = pad(k, 2), pad(v, 2)  # [B, K, Tp, H]
    pos = jnp.arange(tp, dtype=jnp.int32)[None, :]
    seg = ((pos >= mask.kv_start[:, None]) & (pos < mask.kv_end[:, None])).astype(jnp.int32)
    if mask.segment_ids is not None:  # packed rows: the kernel's own segment ids (0 padding)
        ids = jnp.pad(mask.segment_ids.astype(jnp.int32), [(0, 0), (0, tp - t)])
        seg = seg * ids
    mesh = _KERNEL_MESH.get()
    rows, heads = _splash_split(mesh, b, n, k.shape[1])
    kernel = _splash_kernel(n // _axes_size(mesh, heads), tp, interpret)
    seg = splash.SegmentIds(q=seg, kv=seg)
    call = lambda q, k, v, seg: jax.vmap(kernel)(q, k, v, seg)  # per-device shapes
    if mesh is not None:
        # Each device runs the kernel on its rows and heads: q head n reads kv head n // G, and
        # a contiguous split of N and K over `tensor` keeps each query head with its kv head.
        spec = jax.sharding.PartitionSpec(rows, heads)
        call = jax.shard_map(
            call,
            mesh=mesh,
            in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(rows)),
            out_specs=spec,
            check_vma=False,  # the kernel's pallas_call carries no varying-axes types
        )
    out = call(qh, kh, vh, seg)  # [B, N, Tp, H]
    out = out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)  # [B, T, N, H]
    return _zero_padding_rows(out, mask)


def _axes_size(mesh, axes) -> int:
    if mesh is None or axes is None:
        return 1
    names = (axes,) if isinstance(axes, str) else axes
    size = 1
    for a in names:
        size *= mesh.shape[a]
    return size


def _splash_split(mesh, b: int, n: int, kv_heads: int):
    """(row axes, head axis) of the kernel's shard_map: the batch axes when they divide the B
    rows, `tensor` when it divides both head counts; else that dimension is whole on each
    device (the partitioner gathers it first)."""
    if mesh is None:
        return None, None
    rows = tuple(a for a in _BATCH_AXES if a in mesh.shape)
    rows = rows if rows and b % _axes_size(mesh, rows) == 0 else None
    t = mesh.shape.get(_HEAD_AXIS, 1)
    heads = _HEAD_AXIS if t > 1 and n % t == 0 and kv_heads % t == 0 else None
    return rows, heads
