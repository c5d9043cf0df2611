"""The three gradient strategies of the train step (trainer/step.py `build` picks one) and the
strided micro-batch split they share.

The gradient of every objective is Σ_{i,t} (∂L/∂log π_θ(y_it)) ∇_θ log π_θ(y_it) (plus
Σ_{i,t} (∂L/∂H_it) ∇_θ H_it with the entropy bonus, H_it the token entropy), so micro-batches of
any rows are exact. Each strategy returns ((loss_sum, (denom, states, metrics)), grads) with the
loss, metrics, denominators and schedule statistics of the whole batch. Shapes: B rows, Tc
completion tokens, M micro-batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array

from apo_jax.trainer import records


def split_rows(x: Array, micro: int) -> Array:
    """[B, ...] -> [micro, B/micro, ...], micro-batch k = rows k, k + micro, ... (strided: with
    rows split over devices in contiguous blocks, each device keeps its own rows)."""
    return x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1)


def unsplit_rows(x: Array) -> Array:
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # inverse of split_rows


def forward(batch: records.Batch) -> records.Batch:
    """The fields a forward pass reads (what the scorer and the micro-batch scans carry)."""
    return batch.replace(sampler_logp=None, correct=None, old_logp=None, ref_logp=None)


@dataclasses.dataclass(frozen=True)
class Grads:
    """What a gradient strategy works with."""

    logp_fn: Callable  # (params, Batch, with_entropy) -> logp [B, Tc] (, entropy [B, Tc])
    update_loss: Callable  # make_update_loss(spec)
    micro: int  # M micro-batches
    split: Callable  # a [B, ...] tree -> [M, B/M, ...] (rows stay on their devices)
    with_entropy: bool  # the entropy bonus is on: its gradient flows


def fused_grads(g: Grads, params, batch: records.Batch, states, key):
    """M = 1: one fused forward/backward pass."""

    def fused(params):
        logp, entropy = g.logp_fn(params, forward(batch), with_entropy=True)
        return g.update_loss(logp, entropy, batch, states, key)

    return jax.value_and_grad(fused, has_aux=True)(params)


def cotangent_grads(g: Grads, params, batch: records.Batch, states, key):
    """Objectives that couple rows (or use the α/τ schedule), M > 1: one forward pass scores the
    whole batch, the loss (and the schedule, once) gives the cotangents ∂L/∂logp and ∂L/∂H
    [B, Tc], and each micro-batch adds vjp(logp_fn)(its cotangent rows)."""
    fwd = forward(batch)
    logp, entropy = by_micro_batch(g, params, fwd, with_entropy=True)  # no backward
    value, cts = jax.value_and_grad(g.update_loss, argnums=(0, 1), has_aux=True)(
        logp, entropy, batch, states, key
    )

    def accumulate(grads, xs):
        mb, ct_mb, ct_ent_mb = xs
        if g.with_entropy:
            _, vjp = jax.vjp(lambda p: g.logp_fn(p, mb, with_entropy=True), params)
            gr = vjp((ct_mb, ct_ent_mb))[0]
        else:
            _, vjp = jax.vjp(lambda p: g.logp_fn(p, mb), params)
            gr = vjp(ct_mb)[0]
        return jax.tree.map(jnp.add, grads, gr), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, _ = jax.lax.scan(accumulate, zeros, (g.split(fwd), g.split(cts[0]), g.split(cts[1])))
    return value, grads


def per_token_grads(g: Grads, params, batch: records.Batch, states, key):
    """Per-token objectives, M > 1: each micro-batch differentiates the whole batch's loss with
    its own rows' log-probs in place (other rows are constants; a row's gradient depends only on
    its own log-probs and on denominators from masks); the value and metrics are then evaluated
    once on the whole batch's log-probs."""
    micro, filler = g.micro, g.split(batch.old_logp)  # [M, B/M, Tc]: other rows' constants

    def accumulate(grads, xs):
        k, mb = xs

        def micro_loss(params):
            logp_mb, ent_mb = g.logp_fn(params, mb, with_entropy=True)  # [B/M, Tc]
            here = (jnp.arange(micro) == k)[:, None, None]
            filled = unsplit_rows(jnp.where(here, logp_mb[None], filler))  # [B, Tc]
            filled_ent = unsplit_rows(jnp.where(here, ent_mb[None], 0.0))
            loss_sum, _ = g.update_loss(filled, filled_ent, batch, states, key)
            return loss_sum, (logp_mb, ent_mb)

        (_, out), gr = jax.value_and_grad(micro_loss, has_aux=True)(params)
        return jax.tree.map(jnp.add, grads, gr), out

    zeros = jax.tree.map(jnp.zeros_like, params)
    xs = (jnp.arange(micro), g.split(forward(batch)))
    grads, (logp, entropy) = jax.lax.scan(accumulate, zeros, xs)
    logp, entropy = unsplit_rows(logp), unsplit_rows(entropy)
    return g.update_loss(logp, entropy, batch, states, key), grads


def by_micro_batch(g: Grads, params, b: records.Batch, with_entropy=False):
    """logp_fn over the rows of b one micro-batch at a time (rows are independent), so a
    forward-only pass holds one micro-batch's activations, as the backward passes do."""
    if g.micro == 1 or b.completion_ids.shape[0] % g.micro:  # (a scorer batch of any rows)
        return g.logp_fn(params, b, with_entropy)
    out = jax.lax.map(lambda mb: g.logp_fn(params, mb, with_entropy), g.split(b))
    return jax.tree.map(unsplit_rows, out)
