"""The continuous rollout engine: `slots` rows decode at once and a row that stops frees its slot
for the next queued row, so no slot steps on behalf of a batch's longest row.

One `sample` call (rows = prompts × n, group-major, as the static engine):
1. the prompts are prefilled in groups of at most as many cache positions as the slots hold
   (`_group`; all of them at once when they fit; decode.prefill, as static, without the repeat):
   a group's caches stay on device as the pool of prompt prefixes, their first tokens seed the
   output rows, and the group's rows join the queue. The next group is prefilled (one device call
   and one sync) when the queue is empty, so the cache holds one group's prompts, not a step's;
2. rounds: the host gives queued rows to free slots, and one jitted program copies each admitted
   row's prompt cache into its slot (kv_cache.admit: the prompt is prefilled once for its n rows),
   then decodes every slot in a while_loop until `refill` slots have freed; the host reads the
   slots' live flags back (one sync) and frees them;
3. the drain: once the queue is empty and every group prefilled, a round ends when the live rows
   fit half the slots, and they move to a slot array of half the size (one gather), down to two
   rows per device, so the tail of long rows is not decoded at full width.
A round is one device call and one host sync (plus one call per halving). No shape depends on
the schedule: one compile per (prompt bucket, rows, slot count, sampling), whatever the refills
(two prefill programs when there are several groups: the first one also makes the buffers).
Several rounds per call keep the host out of the decode loop: with `refill` = slots / 8, a call
of B rows of mean length m makes ~8 B / slots rounds, each ~ m / 8 decode steps long.

Prompt buckets: every row of a call uses the call's bucket P (its longest prompt's, as static)
and a slot holds P + T positions, so a row occupies the same cache slots as under static and its
attention sums run over the same layout: on CPU in float32 both engines give bit-identical rows
(tests/test_rollout_engine.py). A per-row bucket would save prefill work on short prompts but
shift a row's keys within the cache, changing the sums' rounding.
Shapes: P prompts, B = P·n rows, Z slots, Q prompts per prefill group, Tp prompt bucket,
Tc = max_new_tokens.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jaxtyping import Array, Bool, Float, Int

from apo_jax.models import attention as attention_lib
from apo_jax.rollout import decode as decode_lib
from apo_jax.rollout import kv_cache as kv_cache_lib
from apo_jax.rollout.sampling import SamplingParams

# on_finished(rows, tokens): row indices of the call (group-major; with several processes, the
# indices among this process's own rows, which are the only ones reported) and each row's
# completion (stop token included), called on the host as rows finish, while others decode.
OnFinished = Callable[[np.ndarray, list], None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """The call's output so far, one entry per row (what SampleOutput is built from)."""

    tokens: Int[Array, "B Tc"]
    logp: Float[Array, "B Tc"]
    sample_logp: Float[Array, "B Tc"]
    lengths: Int[Array, " B"]
    stopped: Bool[Array, " B"]  # ended with a stop id


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Pool:
    """One group's prefilled prompts: prompts first .. first + Q - 1 of the call."""

    prefilled: decode_lib.Prefilled  # cache [Q, K, Tp, H] per layer; first tokens of Q·n rows
    first: Int[Array, ""]  # the group's first prompt


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
    """The decode slots: their cache and the row each one holds (donated between rounds)."""

    cache: kv_cache_lib.KVCache  # [Z, K, Tp + Tc, H] per layer
    row: Int[Array, " Z"]  # the row held, -1 for none
    last: Int[Array, " Z"]  # the token to feed at the next step
    stopped: Bool[Array, " Z"]
    lengths: Int[Array, " Z"]  # tokens generated so far (column of the next one)
    keys: Array  # [Z] the held row's PRNG key
    tokens: Int[Array, "Z Tc"]
    logp: Float[Array, "Z Tc"]
    sample_logp: Float[Array, "Z Tc"]


class Engine:
    """The programs and the host loop of the continuous engine for one Sampler (rollout/sampler.py
    builds it and passes itself: graphdef, mesh, limits, pad id, trace counts)."""

    def __init__(self, sampler, slots: int, refill: int):
        self.smp, self.slots, self.refill = sampler, slots, refill
        self._prefills: dict = {}  # (n, z, SamplingParams, first group?) -> jitted prefill
        self._rounds: dict = {}  # SamplingParams -> jitted round
        self.stats: dict = {}  # device_calls, host_syncs, decode_steps of the last call

    def sample(self, params, ids, lengths, rng, row_ids, *, n, sp, on_finished=None) -> Rows:
        smp = self.smp
        r = ids.shape[0] * n  # all processes' rows (ids are global arrays)
        z = min(self.slots * (jax.process_count() if smp._multi_process else 1), r)
        prompts, t = ids.shape[0], smp.max_new_tokens
        q = self._group(prompts, ids.shape[1], n, z)
        pool, rows, slots = self.prefill_program(n, z, sp)(params, ids, lengths, rng, row_ids)
        report = _Reporter(on_finished, rows.lengths)
        queue = collections.deque()

        def enqueue(pool: Pool, rows: Rows, fresh: int) -> None:
            """The group's rows of prompts >= fresh join the queue, or end after one token."""
            first, stopped, start = _host((pool.prefilled.tokens, rows.stopped, pool.first))
            new = np.arange(fresh * n, (int(start) + q) * n)
            done = stopped[new] | (t == 1)  # rows over after their first token
            at = new[done] - int(start) * n
            report.hold(new[done], [first[i : i + 1] for i in at])
            queue.extend(new[~done].tolist())

        enqueue(pool, rows, 0)
        calls, syncs, steps, prefilled = 1, 1, 0, q  # prefilled: prompts whose rows are queued
        held = np.full((z,), -1, np.int64)  # the row in each slot (host view)
        held_at_start = z
        run, slot_steps = self.round_program(sp), 0
        while queue or (held >= 0).any() or prefilled < prompts:
            if not queue and prefilled < prompts:
                # Every row of the pool's group has a slot: the next group replaces it (the last
                # group ends at the last prompt and may repeat prefilled ones, not their rows).
                start = np.int32(min(prefilled, prompts - q))
                group = self.group_program(n, z, sp)
                fresh = np.int32(prefilled)
                pool, rows = group(params, ids, lengths, rng, row_ids, rows, start, fresh)
                enqueue(pool, rows, prefilled)
                calls, syncs, prefilled = calls + 1, syncs + 1, int(start) + q
                continue
            admit = np.full((z,), -1, np.int32)
            for b in np.flatnonzero(held < 0):
                if not queue:
                    break
                admit[b] = held[b] = queue.popleft()
            # Exit when `refill` more slots are free (with a group left to prefill, counting the
            # slots that stay free); with no row left to admit, when the live rows fit the next
            # smaller slot count (the drain), or when every row is done.
            smaller, more = self._smaller(z), bool(queue) or prefilled < prompts
            idle = int((held < 0).sum())
            want = min(idle + self.refill, z) if more else (z - smaller if smaller else z + 1)
            slots, rows, live, k = run(params, slots, rows, pool, admit, np.int32(want))
            report.flush()  # the previous round's rows, scored while this round decodes
            calls, syncs = calls + 1, syncs + 1
            if on_finished is None:
                live, k = _host((live, k))
            else:
                live, k, tok, length = _host((live, k, slots.tokens, slots.lengths))
            steps, slot_steps = steps + int(k), slot_steps + int(k) * z
            ended = np.flatnonzero((held >= 0) & ~live)
            if on_finished is not None:
                report.hold(held[ended], [tok[b, : length[b]] for b in ended])
            held[ended] = -1
            if not more and smaller and live.sum() <= smaller:
                # The drain: the remaining rows move to the first `smaller` slots of a smaller
                # slot array, so the tail's steps are not paid at full width. One program per
                # slot count (a few halvings), whatever the schedule.
                keep = np.concatenate([np.flatnonzero(live), np.flatnonzero(~live)])[:smaller]
                slots, held, z = _take(slots, keep.astype(np.int32)), held[keep], smaller
                calls += 1
        report.flush()
        self.stats = dict(
            device_calls=calls,
            host_syncs=syncs,
            decode_steps=steps,
            slot_steps=slot_steps,
            slots=held_at_start,
        )
        return rows

    def _group(self, prompts: int, bucket: int, n: int, z: int) -> int:
        """Prompts per prefill group: as many as hold no more cache positions than the z slots
        (z × (bucket + max_new_tokens)), and at least enough rows to fill the slots; a multiple
        of the devices on the batch axes (each prefills the same number), at most every prompt.
        The engine's cache is then at most twice the slots' (the slots' and one group's), and a
        call whose prompts fit prefills them all at once, as static does (bit-identical rows:
        another prefill batch could round the log-probs differently in the last bits)."""
        per = self._per_device()
        fit = max(-(-z // n), z * (bucket + self.smp.max_new_tokens) // bucket)
        return min(prompts, -(-fit // per) * per)

    def _per_device(self) -> int:
        """Devices on the batch mesh axes (1 without a mesh)."""
        smp, per = self.smp, 1
        if smp.mesh is not None:
            for a in smp.rules["batch"]:
                per *= smp.mesh.shape.get(a, 1)
        return per

    def _smaller(self, z: int) -> int:
        """The next slot count of the drain (half of z), or 0 below the smallest: two rows per
        device on the batch axes (one row makes a matrix-vector product, whose sums round
        differently, and the rows stay evenly split)."""
        per, half = self._per_device(), z // 2
        return half if half >= 2 * per and half % per == 0 else 0

    # --- the two jitted programs -------------------------------------------------------------
    def prefill_program(self, n: int, z: int, sp: SamplingParams):
        """Prefill of the call's first group of prompts + the output rows + z empty slots (one
        device call): (params, ids, lengths, rng, row_ids) -> (pool, rows, slots)."""
        key = (n, z, sp, True)
        if key not in self._prefills:
            self._prefills[key] = jax.jit(lambda *a: self._prefill(*a, n=n, z=z, sp=sp))
        return self._prefills[key]

    def group_program(self, n: int, z: int, sp: SamplingParams):
        """Prefill of a later group: (params, ids, lengths, rng, row_ids, rows, start, fresh) ->
        (pool, rows): prompts start .. start + Q - 1, whose rows from prompt `fresh` on get their
        first token (rows donated)."""
        key = (n, z, sp, False)
        if key not in self._prefills:
            fn = lambda *a: self._next_group(*a, n=n, z=z, sp=sp)
            self._prefills[key] = jax.jit(fn, donate_argnums=(5,))
        return self._prefills[key]

    def round_program(self, sp: SamplingParams):
        """Admission + decode until enough slots free (slots and rows donated)."""
        if sp not in self._rounds:
            fn = lambda *a: self._round(*a, sp=sp)
            self._rounds[sp] = jax.jit(fn, donate_argnums=(1, 2))
        return self._rounds[sp]

    def _pool(self, params, ids, lengths, rng, row_ids, start, *, n: int, z: int, sp):
        """(model, the group of prompts start .. start + Q - 1 prefilled)."""
        smp = self.smp
        smp.traces["prefill"] += 1
        model = nnx.merge(smp.graphdef, params)
        dtype = smp.cache_dtype or model.dtype
        q = self._group(*ids.shape, n, z)
        # [Q, ...] back on the batch axes: a slice at a traced start is otherwise replicated, and
        # every device would prefill the whole group.
        part = lambda x: decode_lib.constrain_rows(
            jax.lax.dynamic_slice_in_dim(x, start, q), smp.mesh, smp.rules
        )
        with attention_lib.kernels_split_over(smp.mesh):
            pool = decode_lib.prefill(
                model, part(ids), part(lengths), rng, part(row_ids), n=n, sp=sp, dtype=dtype
            )
        return model, Pool(pool, start)

    def _with_group(self, rows: Rows, pool: Pool, fresh, sp) -> Rows:
        """`rows` with the first token of each of the pool's rows from prompt `fresh` on."""
        pre, t = pool.prefilled, self.smp.max_new_tokens
        m = pre.tokens.shape[0]  # Q·n rows, from row first·n
        n = m // pre.cache.starts.shape[0]
        at = pool.first * n
        new = at + jnp.arange(m) >= fresh * n  # [Q·n] rows not given a first token before
        first = lambda x, fill: jnp.full((m, t), fill, x.dtype).at[:, 0].set(x)
        group = Rows(
            first(pre.tokens, self.smp.pad_id),
            first(pre.logp, 0.0),
            first(pre.sample_logp, 0.0),
            jnp.ones((m,), jnp.int32),
            sp.is_stop(pre.tokens),
        )

        def put(full, part):
            old = jax.lax.dynamic_slice_in_dim(full, at, m)
            keep = new.reshape(new.shape + (1,) * (part.ndim - 1))
            return jax.lax.dynamic_update_slice_in_dim(full, jnp.where(keep, part, old), at, 0)

        return self._rows(jax.tree.map(put, rows, group))

    def _next_group(self, params, ids, lengths, rng, row_ids, rows, start, fresh, *, n, z, sp):
        _, pool = self._pool(params, ids, lengths, rng, row_ids, start, n=n, z=z, sp=sp)
        return pool, self._with_group(rows, pool, fresh, sp)

    def _prefill(self, params, ids, lengths, rng, row_ids, *, n: int, z: int, sp):
        smp = self.smp
        zero = jnp.zeros((), jnp.int32)
        model, pool = self._pool(params, ids, lengths, rng, row_ids, zero, n=n, z=z, sp=sp)
        dtype = smp.cache_dtype or model.dtype
        r, t, p = ids.shape[0] * n, smp.max_new_tokens, ids.shape[1]
        rows = Rows(
            jnp.full((r, t), smp.pad_id, jnp.int32),
            jnp.zeros((r, t), jnp.float32),
            jnp.zeros((r, t), jnp.float32),
            jnp.ones((r,), jnp.int32),
            jnp.zeros((r,), bool),
        )
        rows = self._with_group(rows, pool, zero, sp)
        empty = jnp.zeros((z,), jnp.int32)
        slots = Slots(
            cache=kv_cache_lib.init(model.cfg, empty, p + t, dtype),
            row=empty - 1,
            last=empty,
            stopped=jnp.ones((z,), bool),
            lengths=empty,
            keys=jnp.take(pool.prefilled.keys, empty, axis=0),  # placeholders until admission
            tokens=jnp.full((z, t), smp.pad_id, jnp.int32),
            logp=jnp.zeros((z, t), jnp.float32),
            sample_logp=jnp.zeros((z, t), jnp.float32),
        )
        return pool, rows, self._constrain(slots)

    def _round(self, params, slots: Slots, rows: Rows, pool, admit, want_free, *, sp):
        smp = self.smp
        smp.traces["decode"] += 1
        model = nnx.merge(smp.graphdef, params)
        t, pad = smp.max_new_tokens, smp.pad_id
        slots = self._constrain(_admit(slots, rows, pool, admit))
        first_slot = pool.prefilled.cache.length  # Tp: decode slots follow the prompt
        tables = decode_lib.rope(model, slots.cache, first_slot, t)  # this round's occupants
        live_of = lambda s: (s.row >= 0) & decode_lib.live_mask(s.stopped, s.lengths, t)
        z = slots.row.shape[0]

        def cond(carry):
            s, _ = carry
            live = live_of(s)
            return jnp.any(live) & (jnp.sum(~live) < want_free)

        def body(carry):
            s, k = carry
            live = live_of(s)
            tok, logp, sample_logp, cache = decode_lib.step(
                model, s.cache, s.last, s.keys, s.lengths, tables, first_slot, sp, live
            )
            tok = jnp.where(live, tok, pad)  # [Z]
            col = jnp.where(live, s.lengths, t)  # t: out of range, a dead slot writes nothing
            put = lambda buf, x: buf.at[jnp.arange(z), col].set(x, mode="drop")
            cache = dataclasses.replace(cache, index=cache.index + live)
            s = Slots(
                cache=cache,
                row=s.row,
                last=tok,
                stopped=s.stopped | (live & sp.is_stop(tok)),
                lengths=s.lengths + live,
                keys=s.keys,
                tokens=put(s.tokens, tok),
                logp=put(s.logp, logp),
                sample_logp=put(s.sample_logp, sample_logp),
            )
            return self._constrain(s), k + 1

        slots, k = jax.lax.while_loop(cond, body, (slots, jnp.zeros((), jnp.int32)))
        # Every held row's buffers go to its output row (a finished row's for the last time).
        dst = jnp.where(slots.row >= 0, slots.row, rows.lengths.shape[0])  # R: dropped
        put = lambda full, part: full.at[dst].set(part, mode="drop")
        rows = Rows(
            put(rows.tokens, slots.tokens),
            put(rows.logp, slots.logp),
            put(rows.sample_logp, slots.sample_logp),
            put(rows.lengths, slots.lengths),
            put(rows.stopped, slots.stopped),
        )
        return slots, self._rows(rows), live_of(slots), k

    def _constrain(self, s: Slots) -> Slots:
        smp = self.smp
        if smp.mesh is None:
            return s
        rows = lambda x: decode_lib.constrain_rows(x, smp.mesh, smp.rules)
        cache = decode_lib.constrain_cache(s.cache, smp.mesh, smp.rules)
        fields = [f.name for f in dataclasses.fields(s) if f.name != "cache"]
        return dataclasses.replace(s, cache=cache, **{f: rows(getattr(s, f)) for f in fields})

    def _rows(self, rows: Rows) -> Rows:
        smp = self.smp
        return jax.tree.map(lambda x: decode_lib.constrain_rows(x, smp.mesh, smp.rules), rows)


def _admit(slots: Slots, rows: Rows, pool: Pool, admit: Int[Array, " Z"]) -> Slots:
    """Slot b with admit[b] >= 0 takes row admit[b] (a row of the pool's group): its prompt's
    cache (prompt row // n, of the pool from pool.first), its first token and its key. Other slots
    keep what they hold."""
    pre = pool.prefilled
    q = pre.cache.starts.shape[0]
    n = pre.tokens.shape[0] // q
    take = admit >= 0
    r = jnp.maximum(admit, 0)  # [Z]
    prompt = jnp.where(take, admit // n - pool.first, -1)  # the row's prompt in the pool
    cache = kv_cache_lib.admit(slots.cache, pre.cache, prompt)
    at = jnp.clip(r - pool.first * n, 0, q * n - 1)  # the row in the pool (any, where not taken)

    def pick(old, new):
        return jnp.where(take.reshape(take.shape + (1,) * (old.ndim - 1)), new, old)

    keys = jax.random.wrap_key_data(
        pick(jax.random.key_data(slots.keys), jax.random.key_data(pre.keys)[at])
    )
    return Slots(
        cache=cache,
        row=pick(slots.row, r),
        last=pick(slots.last, rows.tokens[r, 0]),
        stopped=pick(slots.stopped, rows.stopped[r]),
        lengths=pick(slots.lengths, rows.lengths[r]),
        keys=keys,
        tokens=pick(slots.tokens, rows.tokens[r]),
        logp=pick(slots.logp, rows.logp[r]),
        sample_logp=pick(slots.sample_logp, rows.sample_logp[r]),
    )


class _Reporter:
    """Holds finished rows until the next round is dispatched, then calls on_finished with them
    (so the host scores them while the device decodes): this process's rows only, numbered
    among its own rows (what sharding.local_rows of the output gives)."""

    def __init__(self, on_finished: OnFinished | None, like: Array):
        self.fn, self.held = on_finished, []
        if on_finished is None:
            return
        mine = np.zeros((like.shape[0],), bool)
        for shard in like.addressable_shards:
            mine[shard.index[0] if shard.index else slice(None)] = True
        self.local = np.where(mine, np.cumsum(mine) - 1, -1)  # global row -> local index

    def hold(self, rows: np.ndarray, tokens: list) -> None:
        if self.fn is not None:
            self.held += [(r, t) for r, t in zip(rows, tokens, strict=True) if self.local[r] >= 0]

    def flush(self) -> None:
        if self.held:
            rows, tokens = zip(*self.held, strict=True)
            self.held = []
            self.fn(self.local[np.asarray(rows)], list(tokens))


@jax.jit
def _take(slots: Slots, keep: Int[Array, " Y"]) -> Slots:
    """The slots `keep` of `slots` (a smaller slot array, rows as they are)."""
    return jax.tree.map(lambda x: jnp.take(x, keep, axis=0), slots)


def _host(arrays):
    """Device arrays to numpy in one transfer; arrays spread over processes are gathered (every
    process then takes the same scheduling decisions, so all make the same collective calls)."""
    if all(not isinstance(x, jax.Array) or x.is_fully_addressable for x in arrays):
        return tuple(np.asarray(x) for x in jax.device_get(tuple(arrays)))
    return tuple(np.asarray(multihost_utils.process_allgather(x, tiled=True)) for x in arrays)
