"""The jitted update: exact micro-batch accumulation, NaN guard, log-probs vs the plain forward,
and one optimizer step against a hand-rolled AdamW step on autodiff gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from numerics import assert_close_to_scale, scale_atol

from apo_jax.models import qwen3 as model_lib
from apo_jax.trainer import build, records
from apo_jax.trainer import step as ts
from configs import base

G, P, TP, TC = 2, 4, 5, 6


def _setup(micro=1, loss="apo", seed=0, tx=None, **loss_overrides):
    c = base.get_config("debug")
    c.rollout.group_size, c.rollout.prompts_per_step = G, P
    c.optim.micro_batches, c.optim.mini_batches = micro, 1
    c.optim.grad_clip = 0.0  # keep the update a plain function of the gradient
    c.loss.name = loss
    c.loss[loss].update(loss_overrides)
    model = model_lib.init_model(model_lib.Qwen3Config.tiny(), seed=seed)
    graphdef, params = nnx.split(model, nnx.Param)
    plan = build.plan(c)
    tx = tx or build.optimizer(plan)[0]
    spec = build.step_spec(plan, 128)
    state = ts.init_train_state(params, tx, 0, spec.schedule)
    return c, graphdef, state, ts.build(graphdef, spec, tx), tx


def _batch(fns, state, seed=0):
    rng = np.random.RandomState(seed)
    b = P * G
    cmask = np.ones((b, TC), np.float32)
    cmask[1, 3:] = 0  # a short completion
    pmask = np.ones((b, TP), np.int32)
    pmask[2, :2] = 0  # a left-padded prompt
    batch = records.Batch(
        prompt_ids=jnp.asarray(rng.randint(0, 128, (b, TP)), jnp.int32),
        prompt_mask=jnp.asarray(pmask),
        completion_ids=jnp.asarray(rng.randint(0, 128, (b, TC)), jnp.int32),
        completion_mask=jnp.asarray(cmask),
        rewards=jnp.asarray(rng.randint(0, 2, (b,)), jnp.float32),
    )
    old = fns.logprobs(state.params, batch)
    # Perturb the anchor so that the policy is off the on-policy point (non-trivial ratios).
    return batch.replace(
        old_logp=old + 0.05 * jnp.asarray(rng.randn(b, TC), jnp.float32), ref_logp=old
    )


def _copy(state):
    return jax.tree.map(jnp.copy, state)


def _ppo_terms(fns, state, batch):
    """[B] bounds of a GRPO/GSPO loss's weighted summands, |A_i|·max_t max(ρ_it, 1.2)/B (token
    weights within a row sum to 1), and max|ℓ|: the scale its rounding is relative to."""
    logp = fns.logprobs(state.params, batch)
    ratio = jnp.where(batch["completion_mask"] > 0, jnp.exp(logp - batch["old_logp"]), 0.0)
    r = np.asarray(batch["rewards"], np.float64).reshape(P, G)
    adv = (r - r.mean(-1, keepdims=True)) / (r.std(-1, ddof=1, keepdims=True) + 1e-6)
    bound = np.abs(adv.reshape(-1)) * np.maximum(np.asarray(ratio).max(-1), 1.2) / adv.size
    return bound, float(jnp.abs(logp).max())


def test_completion_logprobs_match_plain_forward():
    c, graphdef, state, fns, _ = _setup()
    batch = _batch(fns, state)
    got = np.asarray(fns.logprobs(state.params, batch))
    model = nnx.merge(graphdef, state.params)
    ids = jnp.concatenate([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = jnp.concatenate([batch["prompt_mask"], batch["completion_mask"]], 1)
    logits = model(ids, attention_mask=mask)
    logp = jax.nn.log_softmax(logits[:, TP - 1 : -1], axis=-1)
    want = np.take_along_axis(np.asarray(logp), np.asarray(batch["completion_ids"])[..., None], -1)
    np.testing.assert_allclose(got, want[..., 0], atol=1e-5)


@pytest.mark.parametrize("loss", ["apo", "grpo", "gspo"])
def test_micro_batch_accumulation_equals_one_batch(loss):
    # Plain SGD with lr 1: the parameter change *is* the gradient (Adam's first step is
    # sign-like and would amplify float rounding in near-zero gradient entries).
    _, _, state, fns1, _ = _setup(micro=1, loss=loss, tx=optax.sgd(1.0))
    _, _, _, fns2, _ = _setup(micro=2, loss=loss, tx=optax.sgd(1.0))
    batch = _batch(fns1, state)
    s1, m1 = fns1.train_step(_copy(state), batch)
    s2, m2 = fns2.train_step(_copy(state), batch)
    # rtol covers APO (a same-sign sum); GRPO/GSPO sum centred advantages, so their error is
    # relative to Σ|terms| (k as in the AdamW test below: two float32 forwards, n tokens).
    terms, max_ell = _ppo_terms(fns1, state, batch)
    atol = scale_atol(terms, k=2 * (P * G * TC + 8 * max_ell))
    np.testing.assert_allclose(m1["loss/value"], m2["loss/value"], rtol=1e-5, atol=atol)
    np.testing.assert_allclose(m1["optim/grad_norm"], m2["optim/grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_update_is_adamw_on_the_autodiff_gradient():
    c, graphdef, state, fns, tx = _setup(loss="grpo")
    batch = _batch(fns, state)

    def loss_of(params):  # the GRPO loss written out naively on the plain forward pass
        model = nnx.merge(graphdef, params)
        ids = jnp.concatenate([batch["prompt_ids"], batch["completion_ids"]], 1)
        mask = jnp.concatenate([batch["prompt_mask"], batch["completion_mask"]], 1)
        logp = jax.nn.log_softmax(model(ids, attention_mask=mask)[:, TP - 1 : -1], -1)
        logp = jnp.take_along_axis(logp, batch["completion_ids"][..., None], -1)[..., 0]
        r = batch["rewards"].reshape(P, G)
        adv = (r - r.mean(-1, keepdims=True)) / (r.std(-1, ddof=1, keepdims=True) + 1e-6)
        adv = adv.reshape(-1, 1)
        ratio = jnp.exp(logp - batch["old_logp"])
        tok = -jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv)
        m = batch["completion_mask"]
        terms = tok * m / m.sum(-1, keepdims=True) / m.shape[0]  # [B, TC], the weighted summands
        return terms.sum(), (terms, logp)

    (ref_loss, (terms, logp)), grads = jax.value_and_grad(loss_of, has_aux=True)(state.params)
    updates, _ = tx.update(grads, tx.init(state.params), state.params)
    want = optax.apply_updates(state.params, updates)
    new, metrics = fns.train_step(_copy(state), batch)
    # The loss is a small difference of O(1) terms (centred advantages): compare to their scale.
    # Both sides are float32 and each term carries the forward pass's log-prob error (≈ eps·|ℓ|
    # relative, through exp), hence k = 2·(n + max|ℓ|·8) rather than n.
    k = 2 * (terms.size + 8 * float(jnp.abs(logp).max()))
    assert_close_to_scale(metrics["loss/value"], ref_loss, terms, k=k)
    # Adam's first step moves each weight by ~lr (1e-3) in the gradient's sign direction; a
    # wrong gradient shows as ~2e-3, float rounding of near-zero entries as a few 1e-5.
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert int(new.step) == 1


def test_non_finite_batch_leaves_state_unchanged():
    _, _, state, fns, _ = _setup()
    batch = _batch(fns, state)
    batch = batch.replace(old_logp=batch.old_logp.at[0, 0].set(jnp.nan))
    before = _copy(state)
    after, metrics = fns.train_step(_copy(state), batch)
    assert not np.isfinite(float(metrics["loss/value"])) or not np.isfinite(
        float(metrics["optim/grad_norm"])
    )
    assert int(after.skipped) == 1 and int(after.step) == 0
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(
        jax.tree.leaves(before.opt_state), jax.tree.leaves(after.opt_state), strict=True
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("lr", [float("nan"), float("inf")])
def test_non_finite_learning_rate_never_writes_params(lr):
    """Loss and gradient are finite, the update is not: the guard must still hold."""
    # The config refuses a non-finite lr (validate.py); the guard must hold without that check.
    _, _, state, fns, _ = _setup(tx=optax.adamw(lr))
    before = _copy(state)
    after, metrics = fns.train_step(_copy(state), _batch(fns, state))
    assert np.isfinite(float(metrics["loss/value"]))
    assert np.isfinite(float(metrics["optim/grad_norm"]))
    assert int(after.skipped) == 1 and int(after.step) == 0
    for a, b in zip(jax.tree.leaves(before.params), jax.tree.leaves(after.params), strict=True):
        np.testing.assert_array_equal(a, b)
