"""The train state and one fused, jitted update: forward -> chunked log-probs -> loss -> grads ->
global-norm clip -> AdamW, with exact gradient accumulation over micro-batches.

Batch layout (B = P·G rows, the G completions of a prompt in consecutive rows):
  prompt_ids, prompt_mask         [B, Tp]  left-padded prompts
  completion_ids, completion_mask [B, Tc]  completions, mask 1 up to and including EOS
  old_logp, ref_logp              [B, Tc]  anchor / frozen-reference token log-probs (float32)
  rewards                         [B]      float32
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float

from apo_jax import objectives
from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import attention as attention_lib
from apo_jax.models import decoder as model_lib
from apo_jax.objectives import common
from apo_jax.objectives import schedule as schedule_lib
from apo_jax.trainer import logprobs as logprobs_lib

Batch = dict[str, Array]
BATCH_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "rewards")


@flax.struct.dataclass
class TrainState:
    params: nnx.State  # model parameters (pytree of arrays)
    opt_state: optax.OptState
    step: Array  # int32: optimizer updates applied
    rng: Array  # uint32 raw key data (checkpoint-friendly)
    schedule: schedule_lib.ScheduleState  # alpha-schedule state (EMA / ESS smoothing)
    skipped: Array  # int32: updates skipped for a non-finite loss, gradient or update


def init_train_state(params: nnx.State, tx, seed: int, sched_cfg) -> TrainState:
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        schedule=schedule_lib.init_schedule_state(sched_cfg),
        skipped=jnp.zeros((), jnp.int32),
    )


def completion_logprobs(
    graphdef, params, batch: Batch, *, chunk: int, with_entropy: bool = False
) -> Float[Array, "B Tc"] | tuple[Array, Array]:
    """Token log-probs (and entropies) of the completions given their prompts, float32."""
    model = nnx.merge(graphdef, params)
    ids = jnp.concatenate([batch["prompt_ids"], batch["completion_ids"]], axis=1)  # [B, L]
    valid = jnp.concatenate([batch["prompt_mask"], batch["completion_mask"]], axis=1)
    positions, mask = model_lib.causal_inputs(ids, valid)  # [B, L], [B, L, L]
    if model.attention != "naive":  # described, never a [B, L, L] array (models/attention.py)
        mask = attention_lib.Mask.from_valid(valid)
    hidden, _ = model.hidden_states(ids, positions, mask)  # [B, L, D]
    tp, tc = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    # The hidden state at position j predicts token j + 1.
    h = jax.lax.dynamic_slice_in_dim(hidden, tp - 1, tc, axis=1)  # [B, Tc, D]
    return logprobs_lib.token_logprobs(
        h, model.unembed(), batch["completion_ids"], chunk_size=chunk, return_entropy=with_entropy
    )


def _group(x: Array, g: int) -> Array:
    return x.reshape(x.shape[0] // g, g, *x.shape[1:])  # [B, ...] -> [P, G, ...]


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """What the update needs to know (built from the config by `trainer/build.py`)."""

    group_size: int  # G: consecutive rows of one prompt
    micro_batches: int  # gradient accumulation steps per update
    logprob_chunk: int  # vocabulary chunk of the fused log-prob kernel
    max_new_tokens: int  # the rollout's fixed generation length (Dr.GRPO's normaliser)
    objective: objectives.Objective
    loss_params: tuple[tuple[str, object], ...]  # config.loss.<name>.* as sorted pairs
    schedule: schedule_lib.ScheduleConfig


def make_loss_fn(spec: StepSpec) -> Callable:
    """(logp [P,G,T], batch grouped [P,G,...], schedule state) -> (LossOutput, new state,
    schedule metrics). Reads the objective's declarations, never its name."""
    obj, params = spec.objective, dict(spec.loss_params)

    def fn(logp, b, sched_state):
        extra, ctx = {}, objectives.Context(max_new_tokens=spec.max_new_tokens)
        if obj.schedule:
            mask = b["completion_mask"]
            ell = common.sequence_logp(jax.lax.stop_gradient(logp), mask)  # [P, G]
            ell_ref = common.sequence_logp(b["old_logp"], mask)
            alpha, tau, sched_state, extra = schedule_lib.schedule(
                spec.schedule, sched_state, ell, ell_ref, b["rewards"]
            )
            ctx = ctx._replace(alpha=alpha, tau=tau)
        return obj.loss(logp, b, ctx, **params), sched_state, extra

    return fn


@dataclasses.dataclass(frozen=True)
class StepFns:
    train_step: Callable  # (TrainState, Batch) -> (TrainState, metrics); state donated
    logprobs: Callable  # (params, Batch) -> [B, Tc] float32


def _under_mesh(fn, mesh):
    def traced(*args):
        with model_lib.rows_split_over(mesh):
            return fn(*args)

    return traced


def build(graphdef, spec: StepSpec, tx, mesh=None, state_shardings=None) -> StepFns:
    """Jits the update and the log-prob scorer for this model and config. With a mesh, the
    state keeps `state_shardings` (parameters and optimizer moments by their logical axes),
    batch rows are split over the data-parallel axes and metrics come back replicated."""
    g, micro, chunk = spec.group_size, spec.micro_batches, spec.logprob_chunk
    loss_fn = make_loss_fn(spec)
    if mesh is not None:
        rows = sharding_lib.batch_sharding(mesh)
        micro_sharding = sharding_lib.named(mesh, None, sharding_lib.TRAIN_RULES["batch"])
        replicated = sharding_lib.named(mesh)

    def micro_loss(params, mb, sched_state):
        logp, entropy = completion_logprobs(graphdef, params, mb, chunk=chunk, with_entropy=True)
        grouped = {k: _group(v, g) for k, v in mb.items()}
        out, sched_state, extra = loss_fn(_group(logp, g), grouped, sched_state)
        m = grouped["completion_mask"].astype(jnp.float32)
        metrics = {f"loss/{k}": v for k, v in out.metrics.items() if k not in ("alpha", "tau")}
        metrics.update({f"schedule/{k}": v for k, v in extra.items()})
        metrics["policy/entropy"] = (_group(entropy, g) * m).sum() / jnp.maximum(m.sum(), 1.0)
        return out.loss_sum, (out.denom, sched_state, metrics)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch):
        b = batch["rewards"].shape[0]
        if b % (g * micro):
            raise ValueError(
                f"batch of {b} rows does not split into {micro} micro-batches of "
                f"whole groups of {g}"
            )
        split = jax.tree.map(lambda x: x.reshape(micro, b // micro, *x.shape[1:]), batch)
        if mesh is not None:  # keep each micro-batch's rows spread over the data axes
            split = jax.lax.with_sharding_constraint(split, micro_sharding)

        def accumulate(carry, mb):
            grads, loss_sum, denom, sched_state = carry
            (ls, (d, sched_state, metrics)), gr = grad_fn(state.params, mb, sched_state)
            grads = jax.tree.map(jnp.add, grads, gr)
            return (grads, loss_sum + ls, denom + d, sched_state), metrics

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        init = (zeros, jnp.zeros(()), jnp.zeros(()), state.schedule)
        (grads, loss_sum, denom, sched_state), metrics = jax.lax.scan(accumulate, init, split)
        # The loss is sum/denominator over the whole batch; denominators do not depend on the
        # parameters, so dividing the summed gradients once is exact.
        denom = jnp.maximum(denom, 1e-8)
        loss = loss_sum / denom
        grads = jax.tree.map(lambda x: x / denom, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A finite gradient can still give a non-finite update (lr = nan/inf, an optimizer
        # state already overflowed): the update's norm must be finite too.
        update_norm = optax.tree.norm(updates)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = state.replace(
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            schedule=keep(sched_state, state.schedule),
            step=state.step + ok.astype(jnp.int32),
            skipped=state.skipped + (~ok).astype(jnp.int32),
        )
        out = {k: jnp.mean(v) for k, v in metrics.items()}  # mean over micro-batches
        out.update(
            {
                "loss/value": loss,
                "optim/grad_norm": grad_norm,
                "optim/skipped": new_state.skipped.astype(jnp.float32),
            }
        )
        return new_state, out

    def logprobs(params, batch):
        return completion_logprobs(graphdef, params, batch, chunk=chunk)

    if mesh is None:
        return StepFns(jax.jit(train_step, donate_argnums=0), jax.jit(logprobs))
    # Traced under the mesh: the model keeps activations split by rows (decoder.rows_sharded).
    train_step, logprobs = _under_mesh(train_step, mesh), _under_mesh(logprobs, mesh)
    step = jax.jit(
        train_step,
        in_shardings=(state_shardings, rows),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )
    return StepFns(
        step, jax.jit(logprobs, in_shardings=(state_shardings.params, rows), out_shardings=rows)
    )
