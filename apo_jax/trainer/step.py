"""The train state and one fused, jitted update: forward -> chunked log-probs -> loss -> grads ->
global-norm clip -> AdamW, with exact gradient accumulation over micro-batches of any rows.

The step consumes a `records.Batch` (B = P·G rows, the G completions of a prompt consecutive):
`score` fills in its anchor and reference log-probs before the first update, `train_step` updates
on it. The loss sees its rows grouped by prompt as a `LossBatch` (objectives/batch.py); an
objective that reads an optional field (`Objective.reads`) makes it required: the step refuses to
trace without it.
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
from apo_jax.models import lora as lora_lib
from apo_jax.objectives import batch as batch_lib
from apo_jax.objectives import common
from apo_jax.objectives import entropy as entropy_lib
from apo_jax.objectives import schedule as schedule_lib
from apo_jax.trainer import logprobs as logprobs_lib
from apo_jax.trainer import records
from apo_jax.trainer import rollout_correction as rc_lib


@flax.struct.dataclass
class TrainState:
    params: nnx.State  # model parameters (pytree of arrays)
    opt_state: optax.OptState
    step: Array  # int32: optimizer updates applied
    rng: Array  # uint32 raw key data (checkpoint-friendly)
    schedule: schedule_lib.ScheduleState  # alpha-schedule state (EMA / ESS smoothing)
    skipped: Array  # int32: updates skipped for a non-finite loss, gradient or update
    entropy: entropy_lib.EntropyState  # entropy-bonus coefficient state (adaptive mode)


def init_train_state(
    params: nnx.State, tx, seed: int, sched_cfg, entropy_cfg: entropy_lib.EntropyConfig = None
) -> TrainState:
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        schedule=schedule_lib.init_schedule_state(sched_cfg),
        skipped=jnp.zeros((), jnp.int32),
        entropy=entropy_lib.init_entropy_state(entropy_cfg or entropy_lib.EntropyConfig()),
    )


def _float32_model(model) -> None:
    """Sets the compute dtype of every (sub)module that has one to float32, in place (a freshly
    merged scoring copy only)."""
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "dtype"):
            module.dtype = jnp.float32


def completion_logprobs(
    graphdef,
    params,
    batch: records.Batch,
    *,
    chunk: int,
    with_entropy: bool = False,
    precision: str = "default",
) -> Float[Array, "B Tc"] | tuple[Array, Array]:
    """Token log-probs (and entropies) of the completions given their prompts, float32.

    precision "float32": parameters cast to float32, float32 activations and the highest matmul
    precision (bf16 matmul tiling makes a row's log-probs depend on the batch shape; float32 with
    full-precision matmuls removes that at ~2x the forward cost). Gradients flow back through the
    cast to the stored parameter dtype."""
    if precision == "float32":
        params = jax.tree.map(
            lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x,
            params,
        )
        with jax.default_matmul_precision("highest"):
            return _completion_logprobs(graphdef, params, batch, chunk, with_entropy, True)
    return _completion_logprobs(graphdef, params, batch, chunk, with_entropy, False)


def _completion_logprobs(graphdef, params, batch, chunk, with_entropy, float32):
    model = nnx.merge(graphdef, params)
    if float32:
        _float32_model(model)
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
    micro_batches: int  # gradient accumulation steps per update (any count dividing the rows)
    logprob_chunk: int  # vocabulary chunk of the fused log-prob kernel
    max_new_tokens: int  # the rollout's fixed generation length (Dr.GRPO's normaliser)
    objective: objectives.Objective
    loss_params: tuple[tuple[str, object], ...]  # config.loss.<name>.* as sorted pairs
    schedule: schedule_lib.ScheduleConfig
    logprob_precision: str = "default"  # model.logprob_precision: default | float32
    rollout_correction: str = "none"  # loss.rollout_correction (trainer/rollout_correction.py)
    rollout_correction_cap: float = 2.0  # loss.rollout_correction_cap: C > 1
    entropy: entropy_lib.EntropyConfig = entropy_lib.EntropyConfig()  # loss.entropy_*


def make_loss_fn(spec: StepSpec) -> Callable:
    """(logp [P,G,T], LossBatch [P,G,...], schedule state, PRNG key) -> (LossOutput, new
    state, schedule metrics). Reads the objective's declarations, never its name."""
    obj, params = spec.objective, dict(spec.loss_params)

    def fn(logp, b, sched_state, key=None):
        extra, ctx = {}, objectives.Context(max_new_tokens=spec.max_new_tokens, key=key)
        if obj.schedule:
            mask = b.completion_mask
            ell = common.sequence_logp(jax.lax.stop_gradient(logp), mask)  # [P, G]
            ell_ref = common.sequence_logp(b.old_logp, mask)
            alpha, tau, sched_state, extra = schedule_lib.schedule(
                spec.schedule, sched_state, ell, ell_ref, b.rewards
            )
            ctx = ctx._replace(alpha=alpha, tau=tau)
        return obj.loss(logp, b, ctx, **params), sched_state, extra

    return fn


def make_update_loss(spec: StepSpec) -> Callable:
    """Everything of one update after the model, as a pure function of token log-probs and
    entropies [B, T] and the [B, ...] batch (with old_logp, ref_logp):

        (logp, entropy, batch, (schedule state, entropy state), PRNG key)
            -> (loss_sum, (denom, (schedule state, entropy state), metrics))

    rollout correction (trainer/rollout_correction.py) -> LossBatch -> objective (+ α/τ
    schedule) -> entropy bonus (objectives/entropy.py). The update's loss is loss_sum / denom;
    denominators come from masks only, so gradients of loss_sum divided by denom are exact."""
    obj, g, ent_cfg = spec.objective, spec.group_size, spec.entropy
    loss_fn = make_loss_fn(spec)
    weights_itself = "is_weight" in obj.reads  # applies the correction to its policy term

    def fn(logp, entropy, batch, states, key=None):
        sched_state, ent_state = states
        w, loss_mask, rc_metrics = rc_lib.correction(
            batch["old_logp"],
            batch.get("sampler_logp"),
            batch["completion_mask"],
            spec.rollout_correction,
            spec.rollout_correction_cap,
        )
        extra = {}
        if weights_itself:
            extra["is_weight"] = jnp.ones_like(logp) if w is None else w
        elif w is not None:  # the gradient of every log-prob is the policy-gradient term
            logp = rc_lib.scale_grad(logp, w)
        lb = batch_lib.from_batch(batch, g, completion_mask=loss_mask, **extra)
        out, sched_state, extra_metrics = loss_fn(_group(logp, g), lb, sched_state, key)
        metrics = {f"loss/{k}": v for k, v in out.metrics.items() if k not in ("alpha", "tau")}
        metrics.update({f"schedule/{k}": v for k, v in extra_metrics.items()})
        metrics.update(rc_metrics)
        loss_sum = out.loss_sum
        m = loss_mask.astype(jnp.float32)
        h_mean = (entropy.astype(jnp.float32) * m).sum() / jnp.maximum(m.sum(), 1.0)
        metrics["policy/entropy"] = jax.lax.stop_gradient(h_mean)
        if ent_cfg.active:
            coef = entropy_lib.applied_coef(ent_cfg, ent_state)
            # − c·H̄ on the update's loss, written into its sum: loss_sum / denom − c·H̄.
            loss_sum = loss_sum - coef * h_mean * jnp.maximum(out.denom, 1e-8)
            ent_state = entropy_lib.update(ent_cfg, ent_state, jax.lax.stop_gradient(h_mean))
            metrics["policy/entropy_coef"] = coef
        return loss_sum, (out.denom, (sched_state, ent_state), metrics)

    return fn


def check_micro_batches(rows: int, micro: int, data_parallel: int = 1) -> None:
    """Any micro-batch count works if it divides the update's rows and the data-parallel axes
    (data x fsdp) divide every micro-batch; errors name the key."""
    if micro < 1 or rows % micro:
        raise ValueError(
            f"config.optim.micro_batches={micro}: must divide the {rows} rows of each update "
            "(rollout.prompts_per_step * rollout.group_size / optim.mini_batches)"
        )
    if (rows // micro) % data_parallel:
        raise ValueError(
            f"config.optim.micro_batches={micro}: micro-batches of {rows // micro} rows do not "
            f"split over the data-parallel axes (mesh.data * mesh.fsdp = {data_parallel})"
        )


def _split(x: Array, micro: int) -> Array:
    """[B, ...] -> [micro, B/micro, ...], micro-batch k = rows k, k + micro, ... (strided: with
    rows split over devices in contiguous blocks, each device keeps its own rows)."""
    return x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1)


def _unsplit(x: Array) -> Array:
    return x.swapaxes(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])  # inverse of _split


def state_init(tx, seed: int, spec: StepSpec) -> Callable[[nnx.State], TrainState]:
    """params -> a fresh TrainState for this run (the loop's, the dry run's and the evaluation
    restore's skeleton: one definition, so their trees cannot drift apart)."""
    return lambda params: init_train_state(params, tx, seed, spec.schedule, spec.entropy)


def reference_params(uses_reference: bool, params: nnx.State, frozen) -> nnx.State | None:
    """The frozen reference π_ref, for objectives that ask for one: a copy of the initial
    parameters (the state is donated), or under LoRA the base itself with switched-off (zero)
    adapters, no second copy."""
    if not uses_reference:
        return None
    if frozen is not None:
        return lora_lib.switched_off(params)
    return jax.tree.map(jnp.copy, params)


def _forward(batch: records.Batch) -> records.Batch:
    """The fields a forward pass reads (what the scorer and the micro-batch scans carry)."""
    return batch.replace(sampler_logp=None, correct=None, old_logp=None, ref_logp=None)


def score(fns: StepFns, params, ref_params, batch: records.Batch) -> records.Batch:
    """The batch with its anchor π_old (the rollout policy, scored by the trainer) and reference
    log-probs [B, Tc] (zeros for objectives without a reference). The loop scores every
    mini-batch before the first update, so later mini-batches see off-policy ratios."""
    fwd = _forward(batch)
    old = fns.logprobs(params, fwd)
    ref = fns.logprobs(ref_params, fwd) if ref_params is not None else jnp.zeros_like(old)
    return batch.replace(old_logp=old, ref_logp=ref)


@dataclasses.dataclass(frozen=True)
class StepFns:
    train_step: Callable  # (TrainState, Batch) -> (TrainState, metrics); state donated
    logprobs: Callable  # (params, Batch) -> [B, Tc] float32


@dataclasses.dataclass(frozen=True)
class WithBase:
    """A jitted fn(*args, base), called (and lowered) as fn(*args): the frozen LoRA base is an
    argument of every call, never a constant of the program, and never donated."""

    fn: Callable
    base: object

    def __call__(self, *args):
        return self.fn(*args, self.base)

    def lower(self, *args):
        return self.fn.lower(*args, self.base)


# --- gradient strategies -------------------------------------------------------------------------
# The gradient of every objective is Σ_{i,t} (∂L/∂log π_θ(y_it)) ∇_θ log π_θ(y_it) (plus
# Σ_{i,t} (∂L/∂H_it) ∇_θ H_it with the entropy bonus, H_it the token entropy), so micro-batches of
# any rows are exact. Each strategy returns ((loss_sum, (denom, states, metrics)), grads) with the
# loss, metrics, denominators and schedule statistics of the whole batch.


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
        logp, entropy = g.logp_fn(params, _forward(batch), with_entropy=True)
        return g.update_loss(logp, entropy, batch, states, key)

    return jax.value_and_grad(fused, has_aux=True)(params)


def cotangent_grads(g: Grads, params, batch: records.Batch, states, key):
    """Objectives that couple rows (or use the α/τ schedule), M > 1: one forward pass scores the
    whole batch, the loss (and the schedule, once) gives the cotangents ∂L/∂logp and ∂L/∂H
    [B, Tc], and each micro-batch adds vjp(logp_fn)(its cotangent rows)."""
    fwd = _forward(batch)
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
            filled = _unsplit(jnp.where(here, logp_mb[None], filler))  # [B, Tc]
            filled_ent = _unsplit(jnp.where(here, ent_mb[None], 0.0))
            loss_sum, _ = g.update_loss(filled, filled_ent, batch, states, key)
            return loss_sum, (logp_mb, ent_mb)

        (_, out), gr = jax.value_and_grad(micro_loss, has_aux=True)(params)
        return jax.tree.map(jnp.add, grads, gr), out

    zeros = jax.tree.map(jnp.zeros_like, params)
    xs = (jnp.arange(micro), g.split(_forward(batch)))
    grads, (logp, entropy) = jax.lax.scan(accumulate, zeros, xs)
    logp, entropy = _unsplit(logp), _unsplit(entropy)
    return g.update_loss(logp, entropy, batch, states, key), grads


def by_micro_batch(g: Grads, params, b: records.Batch, with_entropy=False):
    """logp_fn over the rows of b one micro-batch at a time (rows are independent), so a
    forward-only pass holds one micro-batch's activations, as the backward passes do."""
    if g.micro == 1 or b.completion_ids.shape[0] % g.micro:  # (a scorer batch of any rows)
        return g.logp_fn(params, b, with_entropy)
    out = jax.lax.map(lambda mb: g.logp_fn(params, mb, with_entropy), g.split(b))
    return jax.tree.map(_unsplit, out)


def _apply_update(tx, state: TrainState, grads, loss_sum, denom, states, metrics):
    """Divides the summed gradients by the batch's denominator (exact: denominators do not
    depend on the parameters) and applies the optimizer, unless the loss, gradient or update is
    non-finite (then the state is kept and `skipped` counts it)."""
    sched, ent_state = states
    denom = jnp.maximum(denom, 1e-8)
    loss = loss_sum / denom
    grads = jax.tree.map(lambda x: x / denom, grads)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # A finite gradient can still give a non-finite update (lr = nan/inf, an optimizer state
    # already overflowed): the update's norm must be finite too.
    update_norm = optax.tree.norm(updates)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = state.replace(
        params=keep(params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        schedule=keep(sched, state.schedule),
        entropy=keep(ent_state, state.entropy),
        step=state.step + ok.astype(jnp.int32),
        skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    out = dict(metrics)
    out.update(
        {
            "loss/value": loss,
            "optim/grad_norm": grad_norm,
            "optim/skipped": new_state.skipped.astype(jnp.float32),
        }
    )
    return new_state, out


# --- the jitted programs -------------------------------------------------------------------------


def build(graphdef, spec: StepSpec, tx, mesh=None, state_shardings=None, frozen=None) -> StepFns:
    """Jits the update and the log-prob scorer for this model and config. With a mesh, the
    state keeps `state_shardings` (parameters and optimizer moments by their logical axes),
    batch rows are split over the data-parallel axes and metrics come back replicated.

    LoRA (`frozen` = the base's parameter state): the state's params are the adapters alone, so
    gradients, the optimizer moments and the update touch nothing else; each call joins them
    with the base, an extra (undonated) argument in its training layout.

    The gradient strategy (above) is `fused_grads` for one micro-batch, `cotangent_grads` for
    objectives that couple rows or use the α/τ schedule, else `per_token_grads`. Forward-only
    passes (the scorer, the cotangent path's first pass) also run one micro-batch at a time:
    activations / micro_batches."""
    micro, obj = spec.micro_batches, spec.objective
    update_loss = make_update_loss(spec)
    if micro == 1:
        strategy = fused_grads
    else:
        strategy = cotangent_grads if obj.couples_rows or obj.schedule else per_token_grads
    data_parallel, micro_sharding = 1, None
    if mesh is not None:
        micro_sharding = sharding_lib.named(mesh, None, sharding_lib.TRAIN_RULES["batch"])
        data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]

    def split(tree):
        out = jax.tree.map(lambda x: _split(x, micro), tree)
        if micro_sharding is not None:  # keep each micro-batch's rows spread over the data axes
            out = jax.lax.with_sharding_constraint(out, micro_sharding)
        return out

    def grads_with(base) -> Grads:
        def logp_fn(params, b, with_entropy=False):
            full = params if base is None else lora_lib.join(base, params)
            return completion_logprobs(
                graphdef,
                full,
                b,
                chunk=spec.logprob_chunk,
                with_entropy=with_entropy,
                precision=spec.logprob_precision,
            )

        return Grads(logp_fn, update_loss, micro, split, spec.entropy.active)

    def train_step(state: TrainState, batch: records.Batch, base=None):
        check_micro_batches(batch.rewards.shape[0], micro, data_parallel)  # at trace time
        batch_lib.check_reads(obj.name, obj.reads, batch.present())
        # The loss's own stream (split off the rollout's, which folds the root key with the
        # rollout step), one key per update: every micro-batch of an update sees the same key.
        loss_key = jax.random.fold_in(
            jax.random.split(jax.random.wrap_key_data(state.rng))[1], state.step
        )
        states = (state.schedule, state.entropy)
        (loss_sum, (denom, states, metrics)), grads = strategy(
            grads_with(base), state.params, batch, states, loss_key
        )
        return _apply_update(tx, state, grads, loss_sum, denom, states, metrics)

    def logprobs(params, batch: records.Batch, base=None):
        return by_micro_batch(grads_with(base), params, batch)

    return _jit(train_step, logprobs, mesh, state_shardings, frozen)


def _jit(train_step, logprobs, mesh, state_shardings, frozen) -> StepFns:
    if mesh is None:
        fns = StepFns(jax.jit(train_step, donate_argnums=0), jax.jit(logprobs))
    else:
        # Traced under the mesh: the model keeps activations split by rows
        # (decoder.rows_sharded).
        rows, replicated = sharding_lib.batch_sharding(mesh), sharding_lib.named(mesh)
        base = () if frozen is None else (sharding_lib.tree_shardings(frozen, mesh),)
        step = jax.jit(
            _under_mesh(train_step, mesh),
            in_shardings=(state_shardings, rows, *base),
            out_shardings=(state_shardings, replicated),
            donate_argnums=0,
        )
        score = jax.jit(
            _under_mesh(logprobs, mesh),
            in_shardings=(state_shardings.params, rows, *base),
            out_shardings=rows,
        )
        fns = StepFns(step, score)
    if frozen is None:
        return fns
    return StepFns(WithBase(fns.train_step, frozen), WithBase(fns.logprobs, frozen))


def _under_mesh(fn, mesh):
    def traced(*args):
        with model_lib.rows_split_over(mesh):
            return fn(*args)

    return traced
