"""Jitted rollout sampler: bucketed left-padded prefill, a `while_loop` decode with a donated KV
cache, temperature / top-k / top-p / greedy sampling, group sampling and per-token log-probs.

Row layout with group sampling: completion j of prompt i is row i * n + j. Every row draws its
randomness from fold_in(fold_in(rng, row_id), t) (row_id = prompt row id * n + j, t the row's
own token index), so a row's tokens do not depend on which other rows share its batch, nor on
the engine: `static` (here) or `continuous` (rollout/continuous.py; both trace the same prefill
and decode step, rollout/decode.py). Shapes: B rows (prompts × n), Tp bucketed prompt length,
Tc = max_new_tokens, V vocab, S = Tp + Tc cache slots.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, Bool, Float, Int

from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import attention as attention_lib
from apo_jax.rollout import continuous as continuous_lib
from apo_jax.rollout import decode as decode_lib
from apo_jax.rollout import kv_cache as kv_cache_lib
from apo_jax.rollout.sampling import SamplingParams

__all__ = ["SampleOutput", "Sampler", "SamplingParams", "length_buckets"]

MIN_BUCKET = 16  # shortest prompt bucket: below this, compile count matters more than padding


class SampleOutput(NamedTuple):
    """What `Sampler.sample` returns (device arrays; rows = prompts × n, group-major).

    `logp` is log π(y_t | x, y_<t) under the policy itself (softmax of the raw logits, i.e.
    temperature 1, no top-k/top-p): what an RL loss compares against. `sample_logp` is the
    log-probability under the distribution actually sampled from (logits / temperature,
    restricted to the top-k / top-p set and renormalised); 0 for greedy (a point mass).
    Both are 0 where `mask` is False. `tokens` holds `pad_id` after a row's end.
    """

    tokens: Int[Array, "B Tc"]
    logp: Float[Array, "B Tc"]
    sample_logp: Float[Array, "B Tc"]
    mask: Bool[Array, "B Tc"]  # True for generated tokens, the stop token included
    lengths: Int[Array, " B"]  # number of generated tokens (= mask.sum(-1))
    truncated: Bool[Array, " B"]  # True when a row reached max_new_tokens without a stop id
    prompt_ids: Int[Array, "B Tp"]  # each row's prompt, left-padded to the call's bucket
    prompt_mask: Int[Array, "B Tp"]  # 1 on the real prompt tokens


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    """Everything the decode loop carries (donated between prefill and decode)."""

    cache: kv_cache_lib.KVCache
    tokens: Int[Array, "B Tc"]
    logp: Float[Array, "B Tc"]
    sample_logp: Float[Array, "B Tc"]
    last: Int[Array, " B"]  # the token to feed at the next step
    done: Bool[Array, " B"]  # the row emitted a stop id
    lengths: Int[Array, " B"]
    step: Int[Array, ""]  # number of tokens generated so far (column of the next token)
    keys: Array  # [B] per-row PRNG keys, fold_in(rng, row_id)


def length_buckets(max_prompt_len: int, smallest: int = MIN_BUCKET) -> tuple[int, ...]:
    """Powers of two from `smallest` up to (and capped at) `max_prompt_len`."""
    out, b = [], smallest
    while b < max_prompt_len:
        out.append(b)
        b *= 2
    return (*out, max_prompt_len)


ENGINES = ("static", "continuous")  # rollout.engine


class Sampler:
    """Compiles prefill + decode once per (batch, prompt bucket, n, sampling params) and reuses
    them: pass updated params every step without re-splitting the model.

    `graphdef` comes from `nnx.split(model)`; `params` (the matching state) is an argument of
    every call. The cache dtype defaults to the model's compute dtype (`rollout.cache_dtype`
    chooses: trainer/build.py resolves `auto` to bfloat16 on accelerators).
    With a `mesh`, the cache and the per-row state are constrained to the `rules` shardings
    (rows on the batch axes, kv heads on tensor); params keep the shardings they come with.

    `engine` (rollout.engine): "static" decodes all the call's rows until the longest stops (a
    caller bounds the cache by calling with fewer prompts: rollout.rows_per_chunk);
    "continuous" keeps `slots` rows per process in flight and gives a stopped row's slot to the
    next queued row (rollout/continuous.py), returning to the host whenever `refill` slots have
    freed (default slots // 8). Both give the same rows: the engine changes the speed, not the
    samples.
    """

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        *,
        max_prompt_len: int,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_ids: Sequence[int] = (),
        pad_id: int = 0,
        buckets: Sequence[int] | None = None,
        cache_dtype=None,
        mesh: Mesh | None = None,
        rules: sharding_lib.Rules = sharding_lib.ROLLOUT_RULES,
        engine: str = "static",
        slots: int | None = None,
        refill: int | None = None,
    ):
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(max_prompt_len, int) or max_prompt_len < 1:
            raise ValueError(f"max_prompt_len must be an integer >= 1, got {max_prompt_len!r}")
        if engine not in ENGINES:
            raise ValueError(f"rollout.engine must be one of {ENGINES}, got {engine!r}")
        for name, value in (("slots", slots), ("refill", refill)):
            if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
                raise ValueError(f"rollout.{name} must be an integer >= 1, got {value!r}")
        if (engine == "continuous") != (slots is not None):
            raise ValueError(
                "rollout.slots (rows in flight) goes with rollout.engine='continuous' and only "
                f"with it; got engine={engine!r}, slots={slots!r}"
            )
        buckets = tuple(sorted(set(buckets))) if buckets else length_buckets(max_prompt_len)
        if buckets[0] < 1 or buckets[-1] < max_prompt_len:
            raise ValueError(f"buckets {buckets} must be >= 1 and cover max_prompt_len")
        self.graphdef, self.buckets = graphdef, buckets
        self.max_prompt_len, self.max_new_tokens = max_prompt_len, max_new_tokens
        self.pad_id, self.cache_dtype = int(pad_id), cache_dtype
        self.mesh, self.rules = mesh, rules
        self.engine, self.slots = engine, None if slots is None else int(slots)
        self.sampling = SamplingParams.make(temperature, top_k, top_p, eos_ids)
        self.traces: collections.Counter = collections.Counter()  # trace-time call counts
        self._prefills: dict = {}  # (n, SamplingParams) -> jitted prefill; jit adds the shapes
        self._decodes: dict = {}  # SamplingParams -> jitted decode
        self._cfg = None
        self._stats: dict = {}
        self.continuous = None  # the continuous engine's programs and host loop
        if engine == "continuous":
            refill = max(1, self.slots // 8) if refill is None else int(refill)
            self.continuous = continuous_lib.Engine(self, self.slots, refill)

    # --- host-side API -----------------------------------------------------------------------
    def sample(
        self,
        params: nnx.State,
        prompts: Sequence[Sequence[int]],
        *,
        n: int = 1,
        rng: int | Array = 0,
        row_ids: Sequence[int] | None = None,
        on_finished: continuous_lib.OnFinished | None = None,
        **overrides,
    ) -> SampleOutput:
        """n completions for each prompt (list of token-id lists); rows i*n .. i*n+n-1 belong to
        prompt i. `rng` is a seed or a PRNG key; `row_ids` (default 0..len-1) name each prompt
        for the per-row randomness. `overrides`: temperature, top_k, top_p, eos_ids.

        `on_finished(rows, tokens)`, if given, is called on the host with finished rows (their
        indices in the output, and each one's completion, stop token included): under
        `continuous` as they finish, while other rows decode (a scorer can overlap them);
        under `static` once, with every row, after the decode."""
        sp = self.sampling_for(**overrides)
        if self._cfg is None:  # merging outside jit wraps the arrays in modules, no copies
            self._cfg = nnx.merge(self.graphdef, params).cfg
        cfg = self._cfg
        ids, lengths = self.pad(prompts, cfg.vocab_size)
        row_ids = _check_row_ids(row_ids, len(prompts))
        sp.check_vocab(cfg.vocab_size)
        n = _check_n(n)
        rng = _as_key(rng)
        ids, lengths, row_ids = self._global_rows(ids, lengths, row_ids)
        if self.continuous is not None:
            rows = self.continuous.sample(
                params, ids, lengths, rng, row_ids, n=n, sp=sp, on_finished=on_finished
            )
            self._stats = self.continuous.stats
            return _finish_rows(rows, self.max_new_tokens, ids, lengths, n)
        state = self.prefill(params, ids, lengths, rng, row_ids, n=n, sampling=sp)
        if self.max_new_tokens > 1:  # prefill already drew the first token
            state = self.decode(params, state, sampling=sp)
        out = _finish(state, self.max_new_tokens, ids, lengths, n)
        steps, rows = state.step - 1, state.last.shape[0]
        self._stats = dict(
            device_calls=3 if self.max_new_tokens > 1 else 2,
            host_syncs=int(on_finished is not None),  # the fetch on_finished needs
        )
        self._stats.update(decode_steps=steps, slot_steps=steps * rows, slots=rows)
        if on_finished is not None:  # static: every row at once, after the decode
            tokens, lens = sharding_lib.local_rows(out.tokens), sharding_lib.local_rows(out.lengths)
            on_finished(np.arange(len(lens)), [tokens[i, : lens[i]] for i in range(len(lens))])
        return out

    def stats(self) -> dict:
        """What the last `sample` call cost: device_calls (programs dispatched), host_syncs
        (waits on the device inside `sample`), decode_steps (decode iterations), slot_steps
        (rows those iterations computed, live or not) and slots (the rows decoded at once)."""
        return {k: v if isinstance(v, int) else int(v) for k, v in self._stats.items()}

    def bucket(self, prompts: Sequence[Sequence[int]]) -> int:
        """The padded prompt length for these prompts (agreed by all processes of a run)."""
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        lengths = np.array([len(p) for p in prompts], np.int32)
        if lengths.min() < 1:
            raise ValueError(f"prompt {int(lengths.argmin())} is empty; every prompt needs a token")
        longest = int(lengths.max())
        if longest > self.max_prompt_len:
            raise ValueError(
                f"prompt {int(lengths.argmax())} has {longest} tokens, longer than the cache "
                f"allows (max_prompt_len={self.max_prompt_len}); truncate it or raise the limit"
            )
        if self._multi_process:  # every process must compile and run the same shapes
            longest = int(multihost_utils.process_allgather(np.asarray(longest)).max())
        return next(b for b in self.buckets if b >= longest)

    def pad(self, prompts: Sequence[Sequence[int]], vocab_size: int | None = None):
        """Left-pads prompts to their length bucket: ids [B, P] int32 and lengths [B]."""
        bucket = self.bucket(prompts)
        lengths = np.array([len(p) for p in prompts], np.int32)
        ids = np.full((len(prompts), bucket), self.pad_id, np.int32)
        for i, p in enumerate(prompts):
            ids[i, bucket - len(p) :] = p
        if vocab_size is not None and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"prompt token ids must lie in [0, {vocab_size}), got {ids.min()}..")
        return ids, lengths

    # --- the two jitted programs -------------------------------------------------------------
    def prefill(self, params, ids, lengths, rng, row_ids, *, n: int, sampling: SamplingParams):
        """Runs the prompts [B, P] once, repeats the cache n times, samples the first token."""
        return self.prefill_program(n, sampling)(params, ids, lengths, rng, row_ids)

    def decode(self, params, state: DecodeState, *, sampling: SamplingParams) -> DecodeState:
        """The decode loop; consumes (donates) `state`, whose buffers the result reuses."""
        return self.decode_program(sampling)(params, state)

    def prefill_program(self, n: int, sampling: SamplingParams):
        """The jitted prefill `prefill` runs for (n, sampling): the dry run lowers this very
        function on abstract arguments (trainer/dry_run.py)."""
        key = (n, sampling)
        if key not in self._prefills:
            self._prefills[key] = jax.jit(functools.partial(self._prefill, n=n, sp=sampling))
        return self._prefills[key]

    def decode_program(self, sampling: SamplingParams):
        """The jitted decode loop `decode` runs for `sampling` (state donated)."""
        if sampling not in self._decodes:  # the state already holds B * n rows: n is not a key
            fn = functools.partial(self._decode, sp=sampling)
            self._decodes[sampling] = jax.jit(fn, donate_argnums=1)
        return self._decodes[sampling]

    def _prefill(self, params, ids, lengths, rng, row_ids, *, n: int, sp: SamplingParams):
        # A kernel (splash) on the prompt runs under shard_map over the sampler's mesh.
        with attention_lib.kernels_split_over(self.mesh):
            return self._prefill_traced(params, ids, lengths, rng, row_ids, n=n, sp=sp)

    def _prefill_traced(self, params, ids, lengths, rng, row_ids, *, n: int, sp: SamplingParams):
        self.traces["prefill"] += 1
        model = nnx.merge(self.graphdef, params)
        dtype = self.cache_dtype or model.dtype  # rollout.cache_dtype, resolved by the build
        pre = decode_lib.prefill(model, ids, lengths, rng, row_ids, n=n, sp=sp, dtype=dtype)
        # Each prompt's cache serves its n rows, with the T decode slots appended.
        cache = kv_cache_lib.extend(kv_cache_lib.repeat(pre.cache, n), self.max_new_tokens)
        r, t = pre.tokens.shape[0], self.max_new_tokens
        first = lambda x, fill: jnp.full((r, t), fill, x.dtype).at[:, 0].set(x)
        return self._constrain(
            DecodeState(
                cache=cache,
                tokens=first(pre.tokens, self.pad_id),  # [B, Tc]
                logp=first(pre.logp, 0.0),
                sample_logp=first(pre.sample_logp, 0.0),
                last=pre.tokens,
                done=sp.is_stop(pre.tokens),
                lengths=jnp.ones((r,), jnp.int32),
                step=jnp.ones((), jnp.int32),
                keys=pre.keys,
            )
        )

    def _decode(self, params, state: DecodeState, *, sp: SamplingParams) -> DecodeState:
        self.traces["decode"] += 1
        model = nnx.merge(self.graphdef, params)
        first_slot = state.cache.length - self.max_new_tokens
        tables = decode_lib.rope(model, state.cache, first_slot, self.max_new_tokens)

        def cond(s: DecodeState):
            return (s.step < self.max_new_tokens) & ~jnp.all(s.done)

        def body(s: DecodeState) -> DecodeState:
            # Every row is at the same column (s.step) here; a stopped row keeps stepping with
            # its outputs masked, which is what the continuous engine avoids.
            tok, logp, sample_logp, cache = decode_lib.step(
                model, s.cache, s.last, s.keys, s.lengths, tables, first_slot, sp
            )
            live = ~s.done
            tok = jnp.where(live, tok, self.pad_id)  # [B]
            put = lambda buf, x: jax.lax.dynamic_update_slice(buf, x[:, None], (0, s.step))
            cache = dataclasses.replace(cache, index=cache.index + 1)
            return self._constrain(
                DecodeState(
                    cache=cache,
                    tokens=put(s.tokens, tok),
                    logp=put(s.logp, jnp.where(live, logp, 0.0)),
                    sample_logp=put(s.sample_logp, jnp.where(live, sample_logp, 0.0)),
                    last=tok,
                    done=s.done | sp.is_stop(tok),
                    lengths=s.lengths + live,
                    step=s.step + 1,
                    keys=s.keys,
                )
            )

        return jax.lax.while_loop(cond, body, state)

    def _constrain(self, s: DecodeState) -> DecodeState:
        if self.mesh is None:
            return s
        rows = lambda x: decode_lib.constrain_rows(x, self.mesh, self.rules)
        fields = ("tokens", "logp", "sample_logp", "last", "done", "lengths", "keys")
        cache = decode_lib.constrain_cache(s.cache, self.mesh, self.rules)
        return dataclasses.replace(s, cache=cache, **{f: rows(getattr(s, f)) for f in fields})

    @property
    def _multi_process(self) -> bool:
        return self.mesh is not None and jax.process_count() > 1

    def _global_rows(self, *arrays):
        """Multi-process: each process's prompt rows become its share of global arrays (rows
        over the batch axes); single process: unchanged."""
        if not self._multi_process:
            return arrays
        spec = PartitionSpec(self.rules["batch"])
        return tuple(
            jax.make_array_from_process_local_data(NamedSharding(self.mesh, spec), np.asarray(a))
            for a in arrays
        )

    def sampling_for(self, **overrides) -> SamplingParams:
        """The sampling parameters a `sample(..., **overrides)` call uses."""
        unknown = set(overrides) - {"temperature", "top_k", "top_p", "eos_ids"}
        if unknown:
            raise TypeError(f"unknown sampling overrides {sorted(unknown)}")
        if not overrides:
            return self.sampling
        merged = {**dataclasses.asdict(self.sampling), **overrides}
        return SamplingParams.make(**merged)


def rollout_weights(params: nnx.State, mesh: Mesh | None, compute_dtype) -> nnx.State:
    """The decode copy of the train parameters, without a second full copy where avoidable:
    a parameter that ROLLOUT_RULES lay out as TRAIN_RULES do on `mesh` is the train array itself
    (no copy); any other is gathered to its rollout layout, cast first to the compute dtype when
    that is narrower. The cast is exact for the sampler: every matmul, norm and embedding lookup
    casts its weight to the compute dtype anyway, so float32 parameters with bfloat16 compute
    give a half-size copy and the same tokens. Abstract parameters (ShapeDtypeStruct leaves
    with shardings) give the abstract copy: what `--dry_run` counts and compiles with."""
    if mesh is None:
        return params
    train = sharding_lib.tree_shardings(params, mesh, sharding_lib.TRAIN_RULES)
    rollout = sharding_lib.tree_shardings(params, mesh, sharding_lib.ROLLOUT_RULES)
    is_var = lambda x: isinstance(x, nnx.Variable)
    narrow = jnp.dtype(compute_dtype)

    def move(var, src, dst):
        src, dst = src.get_value(), dst.get_value()
        value = var.get_value()
        if src.is_equivalent_to(dst, len(value.shape)):
            return var  # same layout: the train parameter serves
        dtype = jnp.dtype(value.dtype)
        if jnp.issubdtype(dtype, jnp.floating) and narrow.itemsize < dtype.itemsize:
            dtype = narrow
        if isinstance(value, jax.ShapeDtypeStruct):  # abstract (the dry run): the copy's shape
            return var.replace(jax.ShapeDtypeStruct(value.shape, dtype, sharding=dst))
        if dtype != value.dtype:
            value = _cast_to(value, dtype, src)
        return var.replace(jax.device_put(value, dst))

    return jax.tree.map(move, params, train, rollout, is_leaf=is_var)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _cast_to(x, dtype, sharding):
    """x cast where it lies (its train shards), before any gather moves it."""
    return jax.lax.with_sharding_constraint(x.astype(dtype), sharding)


@functools.partial(jax.jit, static_argnums=(1, 4))
def _finish(s: DecodeState, max_new_tokens: int, ids, lengths, n: int) -> SampleOutput:
    mask = jnp.arange(max_new_tokens)[None, :] < s.lengths[:, None]  # [B, Tc]
    prompts = _prompt_rows(ids, lengths, n)
    return SampleOutput(s.tokens, s.logp, s.sample_logp, mask, s.lengths, ~s.done, *prompts)


@functools.partial(jax.jit, static_argnums=(1, 4))
def _finish_rows(s: continuous_lib.Rows, max_new_tokens: int, ids, lengths, n) -> SampleOutput:
    mask = jnp.arange(max_new_tokens)[None, :] < s.lengths[:, None]  # [B, Tc]
    prompts = _prompt_rows(ids, lengths, n)
    return SampleOutput(s.tokens, s.logp, s.sample_logp, mask, s.lengths, ~s.stopped, *prompts)


def _prompt_rows(ids, lengths, n: int):
    """Each row's left-padded prompt ids and mask [B, Tp] (prompt rows repeated n times)."""
    tp = ids.shape[1]
    prompt_mask = (jnp.arange(tp)[None, :] >= tp - lengths[:, None]).astype(jnp.int32)  # [B, Tp]
    rep = lambda x: jnp.repeat(x, n, axis=0)  # prompt rows -> their n completion rows
    return rep(ids), rep(prompt_mask)


def _as_key(rng):
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)  # raw uint32 key data


def _check_n(n) -> int:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n (completions per prompt) must be an integer >= 1, got {n!r}")
    return int(n)


def _check_row_ids(row_ids, b: int) -> np.ndarray:
    if row_ids is None:
        return np.arange(b, dtype=np.int32)
    row_ids = np.asarray(row_ids, np.int32)
    if row_ids.shape != (b,):
        raise ValueError(f"row_ids must have one id per prompt ({b}), got shape {row_ids.shape}")
    return row_ids
