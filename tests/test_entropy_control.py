"""Entropy control (objectives/entropy.py, `loss.entropy_*`): the kernel's token entropy against a
float64 full-softmax reference (value and gradient), the bonus on the update's loss, the adaptive
coefficient against a numpy transcription of Skywork-OR1's controller, and the train step: the
bonus's parameter gradient, micro-batch invariance and the state carried in the train state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_loss_keys import BATCH, ENTROPY, LOGP, _config, device
from test_micro_batches import CFG, _assert_grads_close, _batch
from test_micro_batches import _config as _step_config

from apo_jax.objectives import entropy as ent
from apo_jax.trainer import build, logprobs, records
from apo_jax.trainer import step as ts


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


# --- the kernel's entropy ------------------------------------------------------------------------


def _np_entropy(h, w):
    """float64 H = −Σ_v π_v log π_v of softmax(h·Wᵀ), full vocabulary."""
    z = np.einsum("ntd,vd->ntv", h.astype(np.float64), w.astype(np.float64))
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


def test_kernel_entropy_and_its_gradient_match_a_float64_full_softmax(x64):
    r = np.random.default_rng(0)
    b, t, d, v = 2, 3, 16, 1000
    h = r.normal(size=(b, t, d)).astype(np.float32)
    w = (0.5 * r.normal(size=(v, d))).astype(np.float32)
    ids = r.integers(0, v, size=(b, t)).astype(np.int32)
    c = r.normal(size=(b, t))

    def fused(h, w):  # float32 kernel, chunks of 256 (a ragged tail)
        _, e = logprobs.token_logprobs(h, w, ids, chunk_size=256, return_entropy=True)
        return (c * e).sum(), e

    def naive(h, w):  # float64, every logit at once
        logp = jax.nn.log_softmax(jnp.einsum("btd,vd->btv", h, w), axis=-1)
        e = -(jnp.exp(logp) * logp).sum(-1)
        return (c * e).sum(), e

    (gh, gw), e = jax.grad(fused, argnums=(0, 1), has_aux=True)(h, w)
    (rh, rw), e64 = jax.grad(naive, argnums=(0, 1), has_aux=True)(
        h.astype(np.float64), w.astype(np.float64)
    )
    np.testing.assert_allclose(np.asarray(e64), _np_entropy(h, w), rtol=1e-12)
    assert e.dtype == jnp.float32
    # float32 logits: each is a 16-term dot product of O(1) terms (error ~16 eps), H ≈ log V.
    np.testing.assert_allclose(np.asarray(e, np.float64), np.asarray(e64), rtol=2e-6)
    for got, want in ((gh, rh), (gw, rw)):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=1e-5 * scale)


# --- the bonus on the update's loss --------------------------------------------------------------


def _update(c):
    spec = build.step_spec(build.plan(c), 1000)
    fn = ts.make_update_loss(spec)
    states = (
        ts.schedule_lib.init_schedule_state(spec.schedule),
        ent.init_entropy_state(spec.entropy),
    )
    (loss_sum, (denom, new, metrics)), grads = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
        *device((LOGP, ENTROPY, BATCH)), states
    )
    return float(loss_sum / denom), [np.asarray(g) / float(denom) for g in grads], new, metrics


@pytest.mark.parametrize("name", ["apo", "grpo"])
def test_bonus_is_minus_coef_times_the_token_mean_entropy(x64, name):
    coef = 0.03
    loss0, (g0, ge0), _, m0 = _update(_config(name))
    loss1, (g1, ge1), _, m1 = _update(_config(name, entropy_coef=coef))
    mask = BATCH["completion_mask"]
    h_mean = (ENTROPY * mask).sum() / mask.sum()
    # H̄ is a float32 mean of 72 same-sign terms (the kernel's entropies are float32).
    np.testing.assert_allclose(loss1 - loss0, -coef * h_mean, rtol=1e-6)
    # exact but for c held in float32 (relative 3e-8)
    np.testing.assert_allclose(ge1, -coef * mask / mask.sum(), rtol=1e-7, atol=1e-18)
    assert not ge0.any()
    np.testing.assert_array_equal(g1, g0)  # the objective's log-prob gradient is untouched
    np.testing.assert_allclose(float(m1["policy/entropy"]), h_mean, rtol=1e-6)
    assert float(m1["policy/entropy_coef"]) == pytest.approx(coef)
    assert "policy/entropy_coef" not in m0


# --- the adaptive coefficient --------------------------------------------------------------------


class _SkyworkController:
    """Skywork-OR1's EntController (verl/trainer/ppo/core_algos.py), transcribed in numpy."""

    def __init__(self, init, lo, hi, delta, target):
        self.value, self.lo, self.hi, self.delta, self.target = init, lo, hi, delta, target
        self.enabled = 1

    def update(self, current):
        self.value += self.delta if current < self.target else -self.delta
        self.value = float(np.clip(self.value, self.lo, self.hi))
        self.enabled = int(current < self.target)


def test_adaptive_coefficient_matches_the_reference_controller():
    cfg = ent.EntropyConfig(coef=1e-3, target=0.2, delta=4e-4, coef_min=0.0, coef_max=2e-3)
    ref = _SkyworkController(cfg.coef, cfg.coef_min, cfg.coef_max, cfg.delta, cfg.target)
    # Below, at and above the target; runs long enough to hit both clips.
    entropies = [0.1, 0.15, 0.1, 0.05, 0.3, 0.2, 0.5, 0.4, 0.3, 0.25, 0.1, 0.19]
    state = ent.init_entropy_state(cfg)
    update = jax.jit(ent.update, static_argnums=0)
    hit = set()
    for h in entropies:
        applied = float(ent.applied_coef(cfg, state))
        assert applied == pytest.approx(ref.value * ref.enabled, abs=1e-9)  # used this update
        state = update(cfg, state, jnp.float32(h))
        ref.update(h)
        assert float(state.coef) == pytest.approx(ref.value, abs=1e-9)
        assert float(state.enabled) == ref.enabled
        hit.add(ref.value)
    assert cfg.coef_min in hit and cfg.coef_max in hit
    fixed = ent.EntropyConfig(coef=0.01)  # fixed mode: the coefficient never moves
    s = ent.update(fixed, ent.init_entropy_state(fixed), jnp.float32(0.0))
    assert float(ent.applied_coef(fixed, s)) == pytest.approx(0.01) and not fixed.adaptive


# --- the train step ------------------------------------------------------------------------------

P, G = 2, 3


def _train(loss, micro, batch, **over):
    c = _step_config(loss, micro, P, G, **over)
    graphdef, params = nnx.split(jax.tree.map(lambda x: x, _model()), nnx.Param)
    spec = build.step_spec(build.plan(c), CFG.vocab_size)
    tx = optax.sgd(1.0)
    state = ts.init_train_state(params, tx, 0, spec.schedule, spec.entropy)
    old = jax.tree.map(np.asarray, jax.device_get(state.params))
    new, metrics = ts.build(graphdef, spec, tx).train_step(state, records.Batch(**batch))
    grads = jax.tree.map(lambda a, b: a - np.asarray(b), old, jax.device_get(new.params))
    return jax.device_get(metrics), (grads, old), jax.device_get(new.entropy), graphdef


def _model():
    from apo_jax.models import qwen3

    return qwen3.init_model(CFG, seed=0)


@pytest.mark.parametrize(
    "loss", ["apo", pytest.param("grpo", marks=pytest.mark.slow)]
)  # apo: the cotangent path (entropy's vjp); grpo: the per-token path
def test_train_step_bonus_gradient_and_micro_batches(loss):
    coef = 0.5
    batch = {k: jnp.asarray(v) for k, v in _batch(P, G).items()}
    _, (g0, params), _, graphdef = _train(loss, 1, batch)
    m1, (g1, _), state, _ = _train(loss, 1, batch, entropy_coef=coef)

    def mean_entropy(prm):  # the same kernel, differentiated on its own
        _, e = ts.completion_logprobs(graphdef, prm, batch, chunk=8192, with_entropy=True)
        m = batch["completion_mask"]
        return (e * m).sum() / m.sum()

    _, prm = nnx.split(_model(), nnx.Param)
    dh = jax.grad(mean_entropy)(prm)
    want = jax.tree.map(lambda a, d: a - coef * np.asarray(d), g0, dh)
    _assert_grads_close((want, params), (g1, params))
    assert float(m1["policy/entropy_coef"]) == coef and float(state.coef) == coef
    mp, (gp, _), _, _ = _train(loss, P * G, batch, entropy_coef=coef)
    _assert_grads_close((g1, params), (gp, params))
    np.testing.assert_allclose(mp["policy/entropy"], m1["policy/entropy"], rtol=1e-5)


def test_adaptive_state_is_carried_in_the_train_state():
    batch = {k: jnp.asarray(v) for k, v in _batch(P, G).items()}
    over = dict(entropy_target=100.0, entropy_coef=1e-3, entropy_coef_delta=1e-3)
    m, _, state, _ = _train("grpo", 1, batch, **over)  # entropy < target: c grows by Δ
    assert float(m["policy/entropy_coef"]) == pytest.approx(1e-3)  # c_0·e_0 used
    assert float(state.coef) == pytest.approx(2e-3) and float(state.enabled) == 1.0
