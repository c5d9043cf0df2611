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
from apo_jax.models import decoder as model_lib
from apo_jax.models import lora as lora_lib
from apo_jax.objectives import batch as batch_lib
from apo_jax.objectives import common
from apo_jax.objectives import entropy as entropy_lib
from apo_jax.objectives import schedule as schedule_lib
from apo_jax.trainer import grads as grads_lib
from apo_jax.trainer import logprobs as logprobs_lib
from apo_jax.trainer import packing, records
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
        to_f32 = lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x
        params = jax.tree.map(to_f32, params)
    model = nnx.merge(graphdef, params)
    if precision == "float32":  # the merged copy only: every module with a compute dtype
        for _, module in nnx.iter_modules(model):
            if hasattr(module, "dtype"):
                module.dtype = jnp.float32
    with jax.default_matmul_precision("highest" if precision == "float32" else None):
        ids, cids, cmask = batch["prompt_ids"], batch["completion_ids"], batch["completion_mask"]
        if batch.get("pack") is not None:  # optim.packing=packed: padding-free rows
            return packing.score(model, batch["pack"], ids, cids, cmask, chunk, with_entropy)
        tp, tc = ids.shape[1], cids.shape[1]
        ids = jnp.concatenate([ids, cids], axis=1)  # [B, T]
        valid = jnp.concatenate([batch["prompt_mask"], cmask], axis=1)
        positions, mask = model_lib.causal_inputs(ids, valid)  # [B, T], an attention.Mask
        hidden, _ = model.hidden_states(ids, positions, mask)  # [B, T, D]
        # The hidden state at position j predicts token j + 1.
        h = jax.lax.dynamic_slice_in_dim(hidden, tp - 1, tc, axis=1)  # [B, Tc, D]
        return logprobs_lib.token_logprobs(
            h, model.unembed(), cids, chunk_size=chunk, return_entropy=with_entropy
        )


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
    anchor: str = "recompute"  # loss.anchor: recompute | sampler (see `score`)


def make_update_loss(spec: StepSpec) -> Callable:
    """Everything of one update after the model, as a pure function of token log-probs and
    entropies [B, T] and the [B, ...] batch (with old_logp, ref_logp):

        (logp, entropy, batch, (schedule state, entropy state), PRNG key)
            -> (loss_sum, (denom, (schedule state, entropy state), metrics))

    rollout correction (trainer/rollout_correction.py) -> LossBatch -> objective (+ α/τ
    schedule) -> entropy bonus (objectives/entropy.py). The update's loss is loss_sum / denom;
    denominators come from masks only, so gradients of loss_sum divided by denom are exact.
    loss.anchor=sampler: π_old is the batch's sampler_logp (the one place the anchor is chosen;
    `score` then skips its scoring pass)."""
    obj, g, ent_cfg = spec.objective, spec.group_size, spec.entropy
    loss_params = dict(spec.loss_params)
    weights_itself = "is_weight" in obj.reads  # applies the correction to its policy term

    def fn(logp, entropy, batch, states, key=None):
        sched_state, ent_state = states
        old = batch["sampler_logp" if spec.anchor == "sampler" else "old_logp"]  # π_old
        w, loss_mask, rc_metrics = rc_lib.correction(
            old,
            batch.get("sampler_logp"),
            batch["completion_mask"],
            spec.rollout_correction,
            spec.rollout_correction_cap,
        )
        extra = {}
        if weights_itself:
            extra["is_weight"] = jnp.ones_like(logp) if w is None else w
        elif w is not None:  # the gradient of every log-prob is the policy-gradient term
            logp = common.scale_grad(logp, w)
        lb = batch_lib.from_batch(batch, g, completion_mask=loss_mask, old_logp=old, **extra)
        ctx, sched_metrics = objectives.Context(max_new_tokens=spec.max_new_tokens, key=key), {}
        logp = logp.reshape(-1, g, logp.shape[-1])  # [P, G, Tc]
        if obj.schedule:  # the α/τ schedule, from the update's sequence log-probs
            ell = common.sequence_logp(jax.lax.stop_gradient(logp), lb.completion_mask)  # [P, G]
            ell_ref = common.sequence_logp(lb.old_logp, lb.completion_mask)
            alpha, tau, sched_state, sched_metrics = schedule_lib.schedule(
                spec.schedule, sched_state, ell, ell_ref, lb.rewards
            )
            ctx = ctx._replace(alpha=alpha, tau=tau)
        out = obj.loss(logp, lb, ctx, **loss_params)
        metrics = {f"loss/{k}": v for k, v in out.metrics.items() if k not in ("alpha", "tau")}
        metrics.update({f"schedule/{k}": v for k, v in sched_metrics.items()})
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


def score(
    fns: StepFns, params, ref_params, batch: records.Batch, anchor: str = "recompute"
) -> records.Batch:
    """The batch with its anchor π_old (the rollout policy) and reference log-probs [B, Tc]
    (zeros for objectives without a reference). The loop scores every mini-batch before the
    first update, so later mini-batches see off-policy ratios. loss.anchor: `recompute` scores
    π_old with the trainer's forward pass; `sampler` takes the sampler's own log-probs and skips
    that pass (equal within float32 rounding only where sampler and trainer compute alike:
    trainer/validate.py refuses it otherwise, unless a rollout correction handles the gap)."""
    fwd = grads_lib.forward(batch)
    old = batch.sampler_logp if anchor == "sampler" else fns.logprobs(params, fwd)
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
    return new_state, {
        **metrics,
        "loss/value": loss,
        "optim/grad_norm": grad_norm,
        "optim/skipped": new_state.skipped.astype(jnp.float32),
    }


# --- the jitted programs -------------------------------------------------------------------------


def build(graphdef, spec: StepSpec, tx, mesh=None, state_shardings=None, frozen=None) -> StepFns:
    """Jits the update and the log-prob scorer for this model and config. With a mesh, the
    state keeps `state_shardings` (parameters and optimizer moments by their logical axes),
    batch rows are split over the data-parallel axes and metrics come back replicated.

    LoRA (`frozen` = the base's parameter state): the state's params are the adapters alone, so
    gradients, the optimizer moments and the update touch nothing else; each call joins them
    with the base, an extra (undonated) argument in its training layout.

    The gradient strategy (trainer/grads.py) is `fused_grads` for one micro-batch,
    `cotangent_grads` for objectives that couple rows or use the α/τ schedule, else
    `per_token_grads`. Forward-only passes (the scorer, the cotangent path's first pass) also
    run one micro-batch at a time: activations / micro_batches."""
    micro, obj = spec.micro_batches, spec.objective
    update_loss = make_update_loss(spec)
    strategy = grads_lib.per_token_grads
    if micro == 1:
        strategy = grads_lib.fused_grads
    elif obj.couples_rows or obj.schedule:
        strategy = grads_lib.cotangent_grads
    data_parallel, micro_sharding = 1, None
    if mesh is not None:
        micro_sharding = sharding_lib.named(mesh, None, sharding_lib.TRAIN_RULES["batch"])
        data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]

    def split(tree):
        out = jax.tree.map(lambda x: grads_lib.split_rows(x, micro), tree)
        if micro_sharding is not None:  # keep each micro-batch's rows spread over the data axes
            out = jax.lax.with_sharding_constraint(out, micro_sharding)
        return out

    def grads_with(base) -> grads_lib.Grads:
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

        return grads_lib.Grads(logp_fn, update_loss, micro, split, spec.entropy.active)

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
        return grads_lib.by_micro_batch(grads_with(base), params, batch)

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
