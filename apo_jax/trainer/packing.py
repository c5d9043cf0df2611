"""Padding-free scoring: host-side pack plans, trimmed completion lengths, packed log-probs.

A batch's sequences (each row's real prompt tokens, then its real completion tokens) are laid
end to end into R rows of `pack_len` tokens (first-fit decreasing), with per-token segment ids
and RoPE positions that restart at 0 in each sequence; attention never crosses a segment
(attention.Mask.from_segments). The plan is index arrays only, made on the host from the masks;
the device gathers the token ids, scores the positions that predict a completion token, and
gathers the log-probs back into the padded [B, Tc] layout the losses read.
Shapes: B rows, Tp / Tc prompt / completion length, R packed rows, L = pack_len, Sc scored
positions per packed row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from apo_jax import settings
from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import attention as attention_lib
from apo_jax.models import decoder
from apo_jax.trainer import logprobs as logprobs_lib

MIN_BUCKET = 64  # the smallest trimmed / scored length


def bucket(n: int, cap: int, floor: int = MIN_BUCKET) -> int:
    """The smallest of {floor·2^k, 1.5·floor·2^k} ∪ {cap} that is >= n (capped at `cap`):
    a length from a set of ~2·log2(cap / floor) values, wasting at most a third of it, so the
    programs compiled for varying lengths stay few."""
    if n > cap:
        raise ValueError(f"length {n} exceeds its cap {cap}")
    size = max(floor, 1)
    while size < n:
        step = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
        size = max(step, size + 1)
    return min(size, cap)


def trimmed_length(completion_mask: np.ndarray, max_new_tokens: int) -> int:
    """Completion-axis length for packing=none: the batch's longest real completion, rounded up
    by `bucket` (columns past it are padding in every row: nobody reads them)."""
    longest = int(np.asarray(completion_mask).astype(bool).sum(-1).max(initial=0))
    return bucket(max(longest, 1), max_new_tokens)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackPlan:
    """Index arrays (int32) that pack a [B, Tp + Tc] batch into [R, L] rows and unpack back.

    Flat indices address row-major arrays; padding entries hold 0 (a valid index) and are
    masked by `segment_ids == 0` (packed side) or the completion mask (unpacked side)."""

    src: Int[Array, "R L"]  # token j of packed row r = concat(prompt_ids, completion_ids).flat[src]
    positions: Int[Array, "R L"]  # RoPE position: 0 at each sequence's first real token
    segment_ids: Int[Array, "R L"]  # 1, 2, ... per sequence within a row; 0 padding
    score_pos: Int[Array, "R Sc"]  # positions whose hidden state predicts a completion token
    score_src: Int[Array, "R Sc"]  # that token: completion_ids.flat[score_src]
    unpack: Int[Array, "B Tc"]  # token (b, t) of the completions = scored.flat[unpack]

    @property
    def pad_frac(self) -> float:
        """Padding share of the computed tokens (host plans only)."""
        return float(np.mean(np.asarray(self.segment_ids) == 0))


def _first_fit_decreasing(lengths: np.ndarray, pack_len: int) -> list[list[int]]:
    """Sequence indices per row: longest first (stable), each into the first row with room
    (at most 11/9·OPT + 6/9 rows, Dósa 2007). Zero lengths are left out."""
    room: list[int] = []
    content: list[list[int]] = []
    for i in np.argsort(-lengths, kind="stable"):
        if lengths[i] == 0:
            continue
        r = next((r for r, left in enumerate(room) if left >= lengths[i]), None)
        if r is None:
            room.append(pack_len)
            content.append([])
            r = len(room) - 1
        room[r] -= int(lengths[i])
        content[r].append(int(i))
    return content


def _lengths(pm: np.ndarray, cm: np.ndarray, pack_len: int):
    n_prompt, n_comp = pm.sum(1), cm.sum(1)
    if pack_len < 2:
        raise ValueError(f"config.optim.pack_len={pack_len}: must be at least 2")
    if np.any((n_comp > 0) & (n_prompt == 0)):
        raise ValueError("packing: every scored row needs a prompt token (it predicts token 0)")
    lengths = np.where(n_comp > 0, n_prompt + n_comp, 0)  # an empty completion: not packed
    if lengths.max(initial=0) > pack_len:
        raise ValueError(
            f"config.optim.pack_len={pack_len} is shorter than a sequence of this batch "
            f"({int(lengths.max())} tokens: prompt + completion); raise it to at least "
            "the prompt bucket + rollout.max_new_tokens"
        )
    return n_prompt, n_comp, lengths


def plan(
    prompt_mask: np.ndarray,
    completion_mask: np.ndarray,
    pack_len: int,
    *,
    rows: int | None = None,
    row_multiple: int = 1,
    scored: int | None = None,
) -> PackPlan:
    """Packs each batch row's real tokens (left-padded prompt, right-padded completion, both
    contiguous) into rows of `pack_len` tokens by first-fit decreasing.

    R: `rows` if given (an error if they do not fit), else the rows needed rounded up by
    `bucket` in units of `row_multiple` (so each device gets whole rows and compiles stay few).
    Sc: `scored` if given, else the most completion tokens in one packed row, rounded up by
    `bucket`. A row with an empty completion is not packed (it has nothing to score)."""
    pm, cm = (np.asarray(m).astype(bool) for m in (prompt_mask, completion_mask))
    b, tp = pm.shape
    tc = cm.shape[1]
    n_prompt, n_comp, lengths = _lengths(pm, cm, pack_len)
    content = _first_fit_decreasing(lengths, pack_len)
    need = max(len(content), 1)
    if rows is None:
        rows = row_multiple * bucket(-(-need // row_multiple), 1 << 30, floor=1)
    elif need > rows:
        raise ValueError(f"packing: {need} rows of {pack_len} tokens needed, {rows} given")
    per_row = [int(sum(n_comp[i] for i in c)) for c in content]
    sc = bucket(max(per_row, default=1), pack_len) if scored is None else scored
    if max(per_row, default=0) > sc:
        raise ValueError(f"packing: {max(per_row)} scored tokens in a row, room for {sc}")
    src = np.zeros((rows, pack_len), np.int32)
    pos = np.zeros((rows, pack_len), np.int32)
    seg = np.zeros((rows, pack_len), np.int32)
    score_pos = np.zeros((rows, sc), np.int32)
    score_src = np.zeros((rows, sc), np.int32)
    unpack = np.zeros((b, tc), np.int32)
    width = tp + tc  # of the concatenated [B, Tp + Tc] batch
    for r, members in enumerate(content):
        at, done = 0, 0
        for s_id, i in enumerate(members, start=1):
            p0 = tp - n_prompt[i]  # first real prompt column (left padding)
            cols = np.concatenate([np.arange(p0, tp), tp + np.arange(n_comp[i])])
            n = cols.size
            src[r, at : at + n] = i * width + cols
            pos[r, at : at + n] = np.arange(n)
            seg[r, at : at + n] = s_id
            # hidden state at j predicts token j + 1: completion token t from j = start + t - 1
            c = n_comp[i]
            first = at + n_prompt[i] - 1
            score_pos[r, done : done + c] = first + np.arange(c)
            score_src[r, done : done + c] = i * tc + np.arange(c)
            unpack[i, :c] = r * sc + done + np.arange(c)
            at, done = at + n, done + c
    return PackPlan(src, pos, seg, score_pos, score_src, unpack)


def for_micro_batches(
    prompt_mask: np.ndarray,
    completion_mask: np.ndarray,
    pack_len: int,
    micro: int = 1,
    row_multiple: int = 1,
) -> PackPlan:
    """One plan per micro-batch (the step's strided split, trainer/grads.py: micro-batch k = rows
    k, k + M, ...), all with the same (R, Sc), interleaved the same way: `split_rows` of the result
    gives micro-batch k its own plan [R, ...] and the unpack rows of its batch rows. Packed
    rows never mix micro-batches, so every gradient strategy stays exact."""
    pm, cm = (np.asarray(m).astype(bool) for m in (prompt_mask, completion_mask))
    parts = [(pm[k::micro], cm[k::micro]) for k in range(micro)]
    content = [_first_fit_decreasing(_lengths(p, c, pack_len)[2], pack_len) for p, c in parts]
    need = max(max(len(x), 1) for x in content)
    rows = row_multiple * bucket(-(-need // row_multiple), 1 << 30, floor=1)
    most = 1  # completion tokens of the fullest packed row
    for (_, c), rows_k in zip(parts, content, strict=True):
        n_comp = c.sum(1)
        most = max([most] + [int(n_comp[row].sum()) for row in rows_k])
    sc = bucket(max(most, 1), pack_len)
    plans = [plan(p, c, pack_len, rows=rows, scored=sc) for p, c in parts]
    # row j * M + k of the result is row j of plan k (the inverse of grads.split_rows)
    weave = lambda *xs: np.stack(xs, axis=1).reshape(-1, *xs[0].shape[1:])
    return jax.tree.map(weave, *plans)


def score(
    model,
    plan_: PackPlan,
    prompt_ids: Int[Array, "B Tp"],
    completion_ids: Int[Array, "B Tc"],
    completion_mask: Array,
    chunk: int,
    with_entropy: bool = False,
) -> Float[Array, "B Tc"] | tuple[Array, Array]:
    """Token log-probs (and entropies) [B, Tc] float32 of the completions, computed on packed
    rows: the same values as trainer/step.py completion_logprobs on the padded batch (0 past
    each completion's end). `model` is a merged decoder (any model.attention)."""
    # Split by rows like the plan (each device its own packed rows) before the embedding lookup.
    ids = jnp.concatenate([prompt_ids, completion_ids], axis=1).reshape(-1)  # [B*(Tp+Tc)]
    ids = decoder.rows_sharded(jnp.take(ids, plan_.src, axis=0))  # [R, L]
    mask = attention_lib.Mask.from_segments(plan_.segment_ids)
    hidden, _ = model.hidden_states(ids, plan_.positions, mask)  # [R, L, D]
    # Only the positions that predict a completion token go through the LM head.
    h = jnp.take_along_axis(hidden, plan_.score_pos[..., None], axis=1)  # [R, Sc, D]
    targets = jnp.take(completion_ids.reshape(-1), plan_.score_src, axis=0)  # [R, Sc]
    out = logprobs_lib.token_logprobs(
        h, model.unembed(), targets, chunk_size=chunk, return_entropy=with_entropy
    )
    real = completion_mask.astype(bool)  # [B, Tc]
    back = lambda x: jnp.where(real, jnp.take(x.reshape(-1), plan_.unpack, axis=0), 0.0)
    return tuple(map(back, out)) if with_entropy else back(out)  # [B, Tc] float32


def choose(
    prompt_mask: np.ndarray,
    completion_mask: np.ndarray,
    pack_len: int,
    max_new_tokens: int,
    *,
    row_multiple: int = 1,
) -> tuple[PackPlan | None, int]:
    """optim.packing=packed, per batch: (plan, 0) when the packed rows compute fewer tokens than
    the padded rows trimmed to `trimmed_length`, else (None, that length). With every completion
    at the cap, packing only moves the prompts' padding, and its gathers would cost more than
    they save: the padded program runs instead."""
    tc = trimmed_length(completion_mask, max_new_tokens)
    pl = plan(prompt_mask, completion_mask, pack_len, row_multiple=row_multiple)
    rows, ell = np.asarray(pl.src).shape
    padded = np.asarray(prompt_mask).shape[0] * (np.asarray(prompt_mask).shape[1] + tc)
    return (pl, 0) if rows * ell < padded else (None, tc)


def worst_case(rows: int, micro: int, tp: int, tc: int, pack_len: int, row_multiple: int = 1):
    """ShapeDtypeStructs of the largest plan `for_micro_batches` can return for `rows` batch
    rows of [Tp + Tc] (one sequence per packed row, every row's Sc at pack_len): what
    `--dry_run` compiles, an upper bound on the packed step's memory."""
    per_micro = rows // micro
    r = row_multiple * bucket(-(-per_micro // row_multiple), 1 << 30, floor=1)
    sc = bucket(min(pack_len, max(per_micro, 1) * tc), pack_len)
    sds = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    packed, scored = sds(micro * r, pack_len), sds(micro * r, sc)
    return PackPlan(packed, packed, packed, scored, scored, sds(rows, tc))


def for_rollout(data, o: settings.Optim, max_new_tokens: int, mesh, agree=lambda n: n):
    """The layout of one step's update passes (host side, this process's rows, before
    `Rollout.to_batch`): (rollout, one plan or None per mini-batch, metrics).

    Both optim.packing modes cut the completion axis to `trimmed_length` (columns past the
    batch's longest completion are padding in every row). packed: then each mini-batch is packed
    per micro-batch into rows of optim.pack_len tokens (0: Tp + the trimmed length), split over
    the mesh's data axes in whole rows; a mini-batch whose packed rows would compute no fewer
    tokens than its trimmed rows keeps those (`choose`'s rule). perf/pad_frac: the padding share
    of the tokens the forward passes compute (this process's rows). `agree`: a local length ->
    the largest over processes (every process's rows must have one width); packed plans are this
    process's own (one process only)."""
    pm, cm = np.asarray(data.prompt_mask), np.asarray(data.completion_mask)
    b, tp = pm.shape
    real = float(pm.sum() + cm.sum())
    mini = o.mini_batches
    plans: list[PackPlan | None] = [None] * mini
    tc = agree(trimmed_length(cm, max_new_tokens))
    if tc < cm.shape[1]:
        cut = ("completion_ids", "completion_mask", "sampler_logp")
        data = dataclasses.replace(data, **{k: getattr(data, k)[:, :tc] for k in cut})
    rows, computed = b // mini, b * (tp + tc)
    if o.packing == "packed":
        ell = o.pack_len or tp + tc
        dp = mesh.shape["data"] * mesh.shape["fsdp"]
        computed = 0
        for k in range(mini):
            at = slice(k * rows, (k + 1) * rows)  # to_batch's mini-batch k of the local rows
            pl = for_micro_batches(pm[at], cm[at, :tc], ell, o.micro_batches, dp)
            if pl.src.size < rows * (tp + tc):
                plans[k] = jax.device_put(pl, sharding_lib.batch_sharding(mesh))
                computed += pl.src.size
            else:
                computed += rows * (tp + tc)
    return data, plans, {"perf/pad_frac": 1 - real / computed}
