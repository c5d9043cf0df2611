"""APO and f-divergence losses against closed forms and the properties of spec §5 (items 1–12, 18).

Most checks feed scores directly: with one token per completion, logp_old = 0 and τ = 1 the
anchored score is u = logp, so ∂loss_sum/∂logp is the per-group gradient g = ∂L/∂u. References
are numpy (float64) or jitted autodiff of the closed forms; the losses run jitted, once per
static option, shape and dtype, since eager dispatch compiles every op on this 2-core box.
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from loss_testing import jitted_loss_and_grad
from numerics import assert_close_to_scale

from apo_jax.objectives import apo, fdiv, simplex

BETA_R = 0.3
_STATIC = (
    "divergence",
    "logit_reg_center",
    "logit_reg_coef",
    "on_policy_fix",
    "scale_rewards",
    "target",
)


def _run(fn, logp, logp_old, mask, rewards, **kw):
    """(LossOutput, ∂loss_sum/∂logp). Defaults are filled in and scalar α, τ broadcast to [P]
    (the per-prompt path) so that calls differing only in values share one compilation."""
    params = inspect.signature(fn).parameters.values()
    kw = {
        p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
    } | kw
    static = tuple(sorted((k, kw.pop(k)) for k in _STATIC if k in kw))
    dt = np.float64 if np.asarray(logp).dtype == np.float64 else np.float32
    for k in ("alpha", "tau"):
        kw[k] = np.broadcast_to(np.asarray(kw[k], dt), rewards.shape[:1])
    return jitted_loss_and_grad(fn, static)(logp, logp_old, mask, rewards, kw)


def _run_u(u, rewards, fn=apo.apo_loss, **kw):
    """Loss of u [P, G] (one token per completion, anchor 0, τ = 1 so u = logp) and ∂/∂u."""
    z = np.zeros_like(u)[..., None]
    kw.setdefault("tau", 1.0)
    out, grad = _run(fn, u[..., None], z, np.ones_like(z), rewards, **kw)
    return out, np.asarray(grad[..., 0])


def _apo_u(u, rewards, alpha, **kw):
    return _run_u(u, rewards, alpha=alpha, **kw)[0]


def _grad_u(u, rewards, alpha, **kw):
    return _run_u(u, rewards, alpha=alpha, **kw)[1]


# numpy references ------------------------------------------------------------------------------


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _q(rewards, beta_r=BETA_R):
    return _softmax((rewards - rewards.mean(-1, keepdims=True)) / beta_r)


def _kl(a, b):
    return (a * (np.log(a) - np.log(b))).sum(-1)


def _closed_grad(u, q, a):  # −(1/α)(w − pW), spec §1.5
    p = _softmax(u)
    w = q**a * p ** (1 - a)
    return -(w - p * w.sum(-1, keepdims=True)) / a


def _f_closed(name, q, p, a, xp=np):
    """Closed-form divergences of q and p (spec §1.4, §4.5); `xp` is numpy or jax.numpy."""
    kl = lambda x, y: (x * (xp.log(x) - xp.log(y))).sum(-1)
    if name == "forward_kl":
        return kl(q, p)
    if name == "reverse_kl":
        return kl(p, q)
    if name == "js":
        return kl(p, 0.5 * (p + q)) + kl(q, 0.5 * (p + q))
    if name == "hellinger":
        return 1.0 - xp.sqrt(p * q).sum(-1)
    return (1.0 - (q**a * p ** (1 - a)).sum(-1)) / (a * (1 - a))  # "alpha"


@functools.partial(jax.jit, static_argnums=0)
def _auto_grad(name, u, q, a):
    """Autodiff of Σ_prompts D(q ‖ softmax(u)) w.r.t. u."""
    return jax.grad(lambda x: _f_closed(name, q, jax.nn.softmax(x, -1), a, jnp).sum())(u)


def _inputs(p=3, g=6, seed=0, dtype=np.float64):
    r = np.random.default_rng(seed)
    return r.normal(size=(p, g)).astype(dtype), r.uniform(size=(p, g)).astype(dtype)


def _token_case(seed=3, dtype=np.float32):
    """P = 2, G = 4, T = 5 with ragged lengths; logp near the anchor (no clamps)."""
    r = np.random.default_rng(seed)
    lengths = np.asarray([[1, 3, 5, 2], [4, 5, 1, 3]])
    mask = (np.arange(5)[None, None, :] < lengths[..., None]).astype(dtype)
    logp_old = -r.uniform(0.5, 3.0, size=(2, 4, 5))
    logp = logp_old + r.normal(scale=0.3, size=(2, 4, 5))
    return tuple(x.astype(dtype) for x in (logp, logp_old, mask, r.uniform(size=(2, 4))))


def _rel(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


# ------------------------------------------------------------------- gradient identities (1–5)


@pytest.mark.parametrize("alpha", [0.35, 0.5, 0.9])
def test_gradient_identity_and_closed_form(alpha):
    with jax.enable_x64(True):
        u, rewards = _inputs()
        q = _q(rewards)
        grad = _grad_u(u, rewards, alpha)
        assert grad.dtype == np.float64
        assert _rel(grad, np.asarray(_auto_grad("alpha", u, q, alpha))) < 1e-6
        assert _rel(grad, _closed_grad(u, q, alpha)) < 1e-6
        np.testing.assert_allclose(grad.sum(-1), 0.0, atol=1e-12)


def test_forward_kl_limit():
    with jax.enable_x64(True):
        u, rewards = _inputs()
        p, q = _softmax(u), _q(rewards)
        # α = 1 is special-cased (w = q), so the gradient is exactly softmax cross-entropy.
        np.testing.assert_allclose(_grad_u(u, rewards, 1.0), p - q, atol=1e-14)
        np.testing.assert_allclose(_grad_u(u, rewards, 1.0 - 1e-7), p - q, atol=1e-6)
        kl = _kl(q, p).mean()
        np.testing.assert_allclose(_apo_u(u, rewards, 1.0).metrics["divergence"], kl, rtol=1e-6)
        near = _apo_u(u, rewards, 1.0 - 1e-6).metrics["divergence"]
        np.testing.assert_allclose(near, kl, rtol=1e-4)


def test_reverse_kl_limit_is_finite():
    with jax.enable_x64(True):
        u, rewards = _inputs()
        p, q = _softmax(u), _q(rewards)
        out, grad = _run_u(u, rewards, alpha=1e-6)
        assert _rel(grad, np.asarray(_auto_grad("reverse_kl", u, q, 0.5))) < 1e-5
        np.testing.assert_allclose(out.metrics["divergence"], _kl(p, q).mean(), rtol=1e-4)
    # float32 with a very sharp target: still no NaN/Inf (w − pW form, no log-space division).
    sharp = np.tile(np.asarray([[10.0, 0, 0, 0, 0, 0]], np.float32), (3, 1))
    assert np.isfinite(_grad_u(np.zeros((3, 6), np.float32), sharp, 1e-6)).all()


@pytest.mark.parametrize("alpha", [0.35, 0.5, 0.9, 1.0])
def test_common_fixed_point(alpha):
    with jax.enable_x64(True):
        u, rewards = _inputs()
        u_star = np.log(_q(rewards)) + 0.7  # u = log q + c
        np.testing.assert_allclose(_grad_u(u_star, rewards, alpha), 0.0, atol=1e-9)


def test_gradient_descent_converges_to_q():
    # One group copied three times, each with its own α (per-prompt α array).
    rewards = np.tile(_inputs(p=1, seed=1, dtype=np.float32)[1], (3, 1))
    alphas = np.asarray([0.35, 0.6, 0.9], np.float32)

    @jax.jit
    def descend(u):
        def step(_, x):
            z = jnp.zeros_like(x)[..., None]
            f = lambda y: apo.apo_loss(y, z, z + 1, rewards, alpha=alphas, tau=1.0).loss_sum
            return x - 2.0 * jax.grad(f)(x[..., None])[..., 0]

        return jax.lax.fori_loop(0, 1500, step, u)

    p = np.asarray(jax.nn.softmax(descend(jnp.zeros((3, 6))), -1))
    np.testing.assert_allclose(p, _q(rewards), atol=1e-4)


# ------------------------------------------------------------------ divergence value (6), metrics


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), alpha=st.floats(0.05, 0.95))
def test_alpha_divergence_duality_and_range(seed, alpha):
    r = np.random.default_rng(seed)
    log_p, log_q = (np.log(_softmax(2 * r.normal(size=(1, 6)))).astype(np.float32) for _ in "pq")
    d = simplex.alpha_divergence(log_q, log_p, alpha)
    # D = (1 − Σ wᵢ)/(α(1−α)) cancels as p → q: its error is relative to Σ|terms|, each wᵢ
    # = exp(α log q + (1−α) log p) off by ≈ eps·(2 + |exponent|) relative (tests/README.md).
    lq, lp = log_q.astype(np.float64), log_p.astype(np.float64)
    expo = np.abs(alpha * lq) + np.abs((1 - alpha) * lp)
    terms = np.append(1.0, np.exp(alpha * lq + (1 - alpha) * lp) * (2 + expo)) / (
        alpha * (1 - alpha)
    )
    dual = simplex.alpha_divergence(log_p, log_q, 1 - alpha)
    assert_close_to_scale(d, dual, terms, k=2 * terms.size)  # two float32 sides
    ref = _f_closed("alpha", np.exp(lq), np.exp(lp), alpha)
    assert_close_to_scale(d, ref, terms)
    assert float(d[0]) > 0.0
    np.testing.assert_allclose(simplex.alpha_divergence(log_q, log_q, alpha), 0.0, atol=1e-5)


def test_divergence_metric_duality_and_hellinger():
    with jax.enable_x64(True):
        u, rewards = _inputs()
        p, q = _softmax(u), _q(rewards)

        def metric(u_, r_, a):
            return _apo_u(u_, r_, a).metrics["divergence"]

        # Swap the roles: q is reached with rewards = β_r log q, p with u = log p.
        swapped = metric(np.log(q), BETA_R * np.log(p), 0.3)
        np.testing.assert_allclose(metric(u, rewards, 0.7), swapped, rtol=1e-5)
        hellinger = 4.0 * (1.0 - np.sqrt(p * q).sum(-1)).mean()
        np.testing.assert_allclose(metric(u, rewards, 0.5), hellinger, rtol=1e-5)
        np.testing.assert_allclose(metric(np.log(q), rewards, 0.5), 0.0, atol=1e-7)


def test_metrics_match_definitions():
    u, rewards = _inputs(dtype=np.float32)
    out = _apo_u(u, rewards, 0.6)
    p, q = _softmax(u), _q(rewards)
    w = q**0.6 * p**0.4
    w_hat = w / w.sum(-1, keepdims=True)
    np.testing.assert_allclose(out.metrics["ess"], (1 / (w_hat**2).sum(-1)).mean(), rtol=1e-5)
    np.testing.assert_allclose(out.metrics["abs_log_ratio"], np.abs(u).mean(), rtol=1e-5)
    np.testing.assert_allclose(out.metrics["alpha"], 0.6)
    assert 1.0 <= float(out.metrics["ess"]) <= 6.0
    assert float(out.metrics["kl_old_new"]) > 0.0
    assert all(v.dtype == jnp.float32 and v.shape == () for v in out.metrics.values())


# ------------------------------------------------------------------------------ invariances (7)


def test_shift_and_reward_invariances():
    u, rewards = _inputs(dtype=np.float32)
    base, g0 = _run_u(u, rewards, alpha=0.6)
    shift = np.asarray([[1.3], [-0.4], [2.0]], np.float32)
    for u2, r2, kw in [
        (u + shift, rewards, {}),  # shift u per group
        (u, rewards + shift, {}),  # shift rewards per group
        (u, rewards * 3.0, {"beta_r": BETA_R * 3.0}),  # scale rewards by k ≡ β_r·k
    ]:
        out, grad = _run_u(u2, r2, alpha=0.6, **kw)
        np.testing.assert_allclose(out.loss_sum, base.loss_sum, rtol=1e-5)
        np.testing.assert_allclose(grad, g0, atol=1e-6)


def test_permutation_equivariance_and_group_independence():
    u, rewards = _inputs(dtype=np.float32)
    out, g0 = _run_u(u, rewards, alpha=0.5)
    perm = np.asarray([3, 0, 5, 1, 4, 2])
    np.testing.assert_allclose(_grad_u(u[:, perm], rewards[:, perm], 0.5), g0[:, perm], atol=1e-7)
    # Changing group 1 leaves the other groups' gradients unchanged.
    u2, r2 = u.copy(), rewards.copy()
    u2[1], r2[1] = 0.0, 1.0
    g2 = _grad_u(u2, r2, 0.5)
    np.testing.assert_allclose(g2[[0, 2]], g0[[0, 2]], atol=1e-7)
    # The batch loss is the mean of the single-group losses (group i tiled 3× sums to 3·L_i).
    tile = lambda x, i: np.tile(x[i : i + 1], (3, 1))
    single = [_apo_u(tile(u, i), tile(rewards, i), 0.5).loss_sum / 3 for i in range(3)]
    np.testing.assert_allclose(out.mean(), np.mean(single), rtol=1e-6)


# ------------------------------------------------- on-policy point: no-op, push, temperature (8–10)


@pytest.mark.parametrize("alpha", [0.35, 1.0])
def test_uniform_target_is_a_no_op(alpha):
    logp, _, mask, rewards = _token_case()
    rewards = np.full_like(rewards, 0.5)
    _, grad = _run(apo.apo_loss, logp, logp, mask, rewards, alpha=alpha, tau=0.5)
    np.testing.assert_allclose(grad, 0.0, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.35, 0.7, 1.0])
def test_monotone_push_at_on_policy_point(alpha):
    rewards = np.tile(np.asarray([[0.1, 0.9, 0.4, 0.0, 0.6, 0.3]], np.float32), (3, 1))
    push = -_grad_u(np.zeros((3, 6), np.float32), rewards, alpha)[0]
    q_a = _q(rewards)[0] ** alpha
    np.testing.assert_array_equal(np.sign(push), np.sign(q_a - q_a.mean()))
    order = np.argsort(rewards[0])
    assert (np.diff(push[order]) > 0).all()  # higher reward, larger increase of ℓ


@pytest.mark.parametrize("alpha", [0.35, 0.9, 1.0])
def test_high_temperature_is_advantage_policy_gradient(alpha):
    with jax.enable_x64(True):
        _, rewards = _inputs()
        beta_r = 1e4
        grad = _grad_u(np.zeros_like(rewards), rewards, alpha, beta_r=beta_r)
        assert _rel(6 * beta_r * grad, -(rewards - rewards.mean(-1, keepdims=True))) < 1e-3


# ----------------------------------------------------------------- token chain rule, clamps (11)


def test_token_chain_rule():
    with jax.enable_x64(True):
        logp, logp_old, mask, rewards = _token_case(dtype=np.float64)
        tau, alpha = 0.7, 0.6
        n = mask.sum(-1)
        u = ((logp - logp_old) * mask).sum(-1) / n / tau
        g = _closed_grad(u, _q(rewards), alpha)  # [P, G]
        _, grad = _run(apo.apo_loss, logp, logp_old, mask, rewards, alpha=alpha, tau=tau)
        np.testing.assert_allclose(grad, (g / (tau * n))[..., None] * mask, atol=1e-12)


@pytest.mark.parametrize("bump,tau", [(6.0, 1.0), (3.0, 0.2)])  # |ℓ − ℓ_ref| > 5, |u| > 10
def test_clamped_sample_gets_zero_gradient(bump, tau):
    logp, _, mask, rewards = _token_case()
    logp_old = logp - 0.01
    logp = logp.copy()
    logp[0, 1] += bump
    out, grad = _run(apo.apo_loss, logp, logp_old, mask, rewards, alpha=0.6, tau=tau)
    assert float(jnp.abs(grad[0, 1]).max()) == 0.0
    assert float(jnp.abs(grad[0, 0]).max()) > 0.0
    np.testing.assert_allclose(out.metrics["clamp_frac"], 1 / 8)


def test_doubling_tau_halves_token_gradients_at_on_policy_point():
    logp, _, mask, rewards = _token_case()

    def grad(tau):
        return _run(apo.apo_loss, logp, logp, mask, rewards, alpha=0.6, tau=tau)[1]

    np.testing.assert_allclose(grad(1.0), 0.5 * grad(0.5), atol=1e-7)


# --------------------------------------------------------------------------- stop-gradients (12)


@pytest.mark.parametrize("divergence", [None, "js"])
def test_stop_gradients(divergence):
    logp, logp_old, mask, rewards = _token_case()
    alpha, tau = np.full((2,), 0.6, np.float32), np.full((2,), 0.8, np.float32)

    def loss(rew, a, t, old):
        if divergence is None:
            return apo.apo_loss(logp, old, mask, rew, alpha=a, tau=t).loss_sum
        out = fdiv.f_divergence_loss(logp, old, mask, rew, divergence=divergence, alpha=a, tau=t)
        return out.loss_sum

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(rewards, alpha, tau, logp_old)
    for grad in grads:
        assert float(jnp.abs(grad).max()) == 0.0


def test_validation():
    args = _token_case()
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            apo.apo_loss(*args, alpha=bad, tau=1.0)
    with pytest.raises(ValueError, match="tau"):
        apo.apo_loss(*args, alpha=0.5, tau=0.0)
    with pytest.raises(ValueError, match="divergence"):
        fdiv.f_divergence_loss(*args, divergence="tv", tau=1.0)


# ------------------------------------------------------------------ (sum, denom), extras, dtypes


def test_sum_denom_accumulation_matches_whole_batch():
    r = np.random.default_rng(4)
    logp = -r.uniform(0.1, 2, size=(4, 4, 5)).astype(np.float32)
    logp_old = logp + r.normal(scale=0.2, size=logp.shape).astype(np.float32)
    mask = (r.uniform(size=logp.shape) < 0.7).astype(np.float32)
    mask[3] = 0.0  # an all-padding prompt
    rewards = r.uniform(size=(4, 4)).astype(np.float32)
    alpha = np.asarray([0.4, 0.9, 0.6, 0.5], np.float32)

    def run(sl):
        return _run(
            apo.apo_loss, logp[sl], logp_old[sl], mask[sl], rewards[sl], alpha=alpha[sl], tau=0.7
        )

    (whole, g_whole), parts = run(slice(None)), [run(slice(0, 2)), run(slice(2, 4))]
    assert float(whole.denom) == 3.0  # the all-padding prompt is not counted
    denom = sum(o.denom for o, _ in parts)
    np.testing.assert_allclose(sum(o.loss_sum for o, _ in parts) / denom, whole.mean(), rtol=1e-6)
    g_acc = jnp.concatenate([g for _, g in parts]) / denom
    np.testing.assert_allclose(g_acc, g_whole / whole.denom, atol=1e-7)


def test_scalar_and_per_prompt_hyperparameters_agree():
    logp, logp_old, mask, rewards = _token_case()
    scalar = jax.jit(lambda x: apo.apo_loss(x, logp_old, mask, rewards, alpha=0.6, tau=0.8))
    per_prompt, _ = _run(apo.apo_loss, logp, logp_old, mask, rewards, alpha=0.6, tau=0.8)
    np.testing.assert_allclose(scalar(logp).loss_sum, per_prompt.loss_sum, rtol=1e-6)


def test_logit_regulariser():
    u, rewards = _inputs(dtype=np.float32)
    coef = 0.01
    zero = np.zeros_like(u)
    base = _apo_u(zero, rewards, 0.6).loss_sum
    reg = _apo_u(zero, rewards, 0.6, logit_reg_coef=coef).loss_sum
    # A difference of two float32 losses: its error is relative to |base| + |reg|, not to the
    # small difference (3 groups, 6 terms each, both sides: k = 2·18).
    assert_close_to_scale(reg - base, 3 * coef * np.log(6) ** 2, [base, reg], k=2 * 18)  # at u = 0
    extra = _grad_u(u, rewards, 0.6, logit_reg_coef=coef) - _grad_u(u, rewards, 0.6)
    lse = np.log(np.exp(u).sum(-1, keepdims=True))
    np.testing.assert_allclose(extra, coef * 2 * lse * _softmax(u), atol=1e-6)


def test_on_policy_fix():
    logp, _, mask, rewards = _token_case()
    out, _ = _run(apo.apo_loss, logp, logp, mask, rewards, alpha=0.6, tau=1.0, on_policy_fix=True)
    ell = (logp * mask).sum(-1) / mask.sum(-1)
    q_a = _q(rewards) ** 0.6  # p is uniform at u = 0
    w_hat = q_a / q_a.sum(-1, keepdims=True)
    expected = (-(w_hat * ell).sum(-1) - 0.01 * np.log(4)).sum()
    np.testing.assert_allclose(out.loss_sum, expected, rtol=1e-5)
    np.testing.assert_allclose(out.metrics["on_policy_fix_frac"], 1.0)
    # Far from the anchor it does not fire: same as the plain loss.
    off = logp + np.random.default_rng(5).normal(size=logp.shape).astype(np.float32)
    fixed, _ = _run(apo.apo_loss, off, logp, mask, rewards, alpha=0.6, tau=1.0, on_policy_fix=True)
    plain, _ = _run(apo.apo_loss, off, logp, mask, rewards, alpha=0.6, tau=1.0)
    np.testing.assert_allclose(fixed.loss_sum, plain.loss_sum, rtol=1e-6)


def test_bfloat16_inputs_give_float32_loss():
    logp, logp_old, mask, rewards = _token_case()
    bf = lambda x: jnp.asarray(x, jnp.bfloat16)
    out, _ = _run(apo.apo_loss, bf(logp), bf(logp_old), mask, rewards, alpha=0.6, tau=1.0)
    assert out.loss_sum.dtype == jnp.float32 and bool(jnp.isfinite(out.loss_sum))


# --------------------------------------------------------------------- f-divergence family (18)


def _f_u(u, rewards, name, alpha=0.5):
    return _run_u(u, rewards, fdiv.f_divergence_loss, divergence=name, alpha=alpha)


@pytest.mark.parametrize("name", fdiv.F_DIVERGENCES)
def test_f_divergence_gradient_and_value_match_closed_form(name):
    with jax.enable_x64(True):
        u, rewards = _inputs()
        p, q = _softmax(u), _q(rewards)
        out, grad = _f_u(u, rewards, name)
        assert _rel(grad, np.asarray(_auto_grad(name, u, q, 0.5))) < 1e-6
        value = _f_closed(name, q, p, 0.5).mean()  # metrics are float32
        np.testing.assert_allclose(out.metrics["divergence"], value, rtol=1e-6)


def test_f_divergence_special_cases():
    with jax.enable_x64(True):
        u, rewards = _inputs()
        p, q = _softmax(u), _q(rewards)
        grad = {name: _f_u(u, rewards, name)[1] for name in fdiv.F_DIVERGENCES}
        # α member is APO exactly (value and gradient); α = 1/2 is 4× Hellinger.
        f_out, f_grad = _f_u(u, rewards, "alpha", 0.7)
        apo_out, apo_grad = _run_u(u, rewards, alpha=0.7)
        np.testing.assert_allclose(f_out.loss_sum, apo_out.loss_sum, rtol=1e-12)
        np.testing.assert_allclose(f_grad, apo_grad, atol=1e-12)
        np.testing.assert_allclose(grad["alpha"], 4.0 * grad["hellinger"], atol=1e-12)
        # Forward KL (DPG): −E_q[∇ log p] = p − q.
        np.testing.assert_allclose(grad["forward_kl"], p - q, atol=1e-12)
        # Reverse KL: REINFORCE over the G candidates with reward log q − log p − 1.
        reward = np.log(q) - np.log(p) - 1.0
        score = np.eye(6)[None] - p[:, None, :]  # ∂ log p_i / ∂u_j, [P, i, j]
        reinforce = -(p[..., None] * reward[..., None] * score).sum(1)
        np.testing.assert_allclose(grad["reverse_kl"], reinforce, atol=1e-12)
