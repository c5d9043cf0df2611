"""α/τ schedule (spec §2, Appendix A; property group 13) against worked examples and a naive
numpy re-implementation. The schedule runs jitted with the config static."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apo_jax.objectives import schedule as sched

LN_V = math.log(151936)
_schedule = jax.jit(sched.schedule, static_argnums=0)


def _call(cfg, ell, ell_ref, rewards, state=None):
    state = sched.init_schedule_state(cfg) if state is None else state
    f32 = lambda x: np.asarray(x, np.float32)
    return _schedule(cfg, state, f32(ell), f32(ell_ref), f32(rewards))


def _np_legacy(cfg, ell, ell_ref, rewards):
    """Naive loop: one statistics scope at a time (each group, or the whole batch)."""
    p_n = ell.shape[0]
    adv = rewards - rewards.mean(-1, keepdims=True)
    scopes = [[i] for i in range(p_n)] if cfg.scope == "group" else [list(range(p_n))]
    alpha, tau = np.zeros(p_n), np.zeros(p_n)
    for rows in scopes:
        h_dyn = np.clip(-ell[rows] / LN_V, 0, 1).mean()
        h_stat = np.clip(-ell_ref[rows] / LN_V, 0, 1).mean()
        c = 1 - h_dyn
        a = adv[rows]
        a_bar = ((a - a.min()) / max(a.max() - a.min(), 1e-6)).mean()
        s = 2 * a_bar - 1
        alpha[rows] = cfg.alpha_max - (cfg.alpha_max - cfg.alpha_min) * c * max(s, 0.0)
        t = cfg.tau0 * (1 + cfg.a_tau * h_stat + cfg.b_tau * c * (-s))
        tau[rows] = np.clip(t, cfg.tau_min, cfg.tau_max) if cfg.adaptive_tau else cfg.tau0
    return alpha, tau


# Groups: 5 of 6 correct, 1 of 6 correct, all equal; c = 1 (ℓ = 0) and H_stat = 0.3.
REWARDS = np.asarray([[1, 1, 1, 1, 1, 0], [0, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], np.float64)
ELL = np.zeros((3, 6))
ELL_REF = np.full((3, 6), -0.3 * LN_V)


def test_worked_examples():
    alpha, tau, _, metrics = _call(sched.ScheduleConfig(), ELL, ELL_REF, REWARDS)
    # 5 correct: ā = 5/6, s = 2/3, α = 0.9 − 0.55·(2/3); τ = 0.5·(1 + 0.2·0.3 − 0.5·(2/3)).
    np.testing.assert_allclose(alpha, [0.9 - 0.55 * 2 / 3, 0.9, 0.9], rtol=1e-6)
    np.testing.assert_allclose(alpha[0], 0.53333, atol=1e-5)
    # 1 correct: s = −2/3; all equal: A ≡ 0, ā = 0, s = −1.
    expected_tau = [0.5 * (1.06 - 1 / 3), 0.5 * (1.06 + 1 / 3), 0.5 * (1.06 + 0.5)]
    np.testing.assert_allclose(tau, expected_tau, rtol=1e-6)
    np.testing.assert_allclose(metrics["alpha"], np.mean(alpha), rtol=1e-6)


def test_batch_scope_shares_one_value():
    cfg = sched.ScheduleConfig(scope="batch")
    alpha, tau, _, _ = _call(cfg, ELL, ELL_REF, REWARDS)
    ref_alpha, ref_tau = _np_legacy(cfg, ELL, ELL_REF, REWARDS)
    np.testing.assert_allclose(alpha, ref_alpha, rtol=1e-6)
    np.testing.assert_allclose(tau, ref_tau, rtol=1e-6)
    assert np.ptp(np.asarray(alpha)) == 0.0 and np.ptp(np.asarray(tau)) == 0.0


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    scope=st.sampled_from(sched.SCOPES),
    binary=st.booleans(),
)
def test_matches_naive_loop_and_stays_in_bounds(seed, scope, binary):
    r = np.random.default_rng(seed)
    ell = -r.uniform(0, 1.5 * LN_V, size=(3, 6))  # past ln V too, so the clip is exercised
    ell_ref = ell + r.normal(size=(3, 6))
    rewards = r.integers(0, 2, size=(3, 6)) if binary else r.normal(size=(3, 6))
    cfg = sched.ScheduleConfig(scope=scope)
    alpha, tau, _, _ = _call(cfg, ell, ell_ref, rewards)
    ref_alpha, ref_tau = _np_legacy(cfg, ell, ell_ref, rewards.astype(np.float64))
    np.testing.assert_allclose(alpha, ref_alpha, atol=1e-5)
    np.testing.assert_allclose(tau, ref_tau, atol=1e-5)
    assert np.all((cfg.alpha_min <= alpha) & (alpha <= cfg.alpha_max))
    assert np.all((cfg.tau_min <= tau) & (tau <= cfg.tau_max))


def test_alpha_is_non_increasing_in_signal_and_confidence():
    cfg = sched.ScheduleConfig()
    n_correct = np.arange(7)  # s grows with the number correct
    rewards = (np.arange(6)[None, :] < n_correct[:, None]).astype(np.float64)
    alpha, _, _, _ = _call(cfg, np.zeros((7, 6)), np.zeros((7, 6)), rewards)
    assert np.all(np.diff(np.asarray(alpha[:6])) <= 0)
    np.testing.assert_allclose(alpha[:4], 0.9)  # s ≤ 0 (at most half correct): gate closed
    np.testing.assert_allclose(alpha[6], 0.9)  # all correct is an all-equal group: s = −1
    # Same 5-of-6 groups with growing NLL, i.e. falling confidence c.
    ell = -np.linspace(0, LN_V, 7)[:, None] * np.ones((1, 6))
    alpha, _, _, _ = _call(cfg, ell, ell, np.tile(REWARDS[:1], (7, 1)))
    assert np.all(np.diff(np.asarray(alpha)) >= 0)
    np.testing.assert_allclose(alpha[-1], 0.9, rtol=1e-6)  # c = 0


def test_fixed_mode_and_constant_tau():
    cfg = sched.ScheduleConfig(mode="fixed", alpha=0.6, adaptive_tau=False)
    alpha, tau, _, _ = _call(cfg, ELL, ELL_REF, REWARDS)
    np.testing.assert_allclose(alpha, 0.6)
    np.testing.assert_allclose(tau, 0.5)


def test_ema_smoothing():
    cfg = sched.ScheduleConfig(use_ema=True)
    state = sched.ScheduleState(jnp.float32(0.4), jnp.int32(3))
    alpha, _, new_state, _ = _call(cfg, ELL, ELL_REF, REWARDS, state)
    raw, _ = _np_legacy(cfg, ELL, ELL_REF, REWARDS)
    np.testing.assert_allclose(alpha, 0.9 * 0.4 + 0.1 * raw, rtol=1e-6)
    np.testing.assert_allclose(new_state.alpha_ema, np.mean(alpha), rtol=1e-6)
    assert int(new_state.calls) == 4


def _np_ess_alpha_star(cfg, ell, ell_ref, rewards):
    _, tau = _np_legacy(cfg, ell, ell_ref, rewards)
    d = np.clip(ell - ell_ref, -cfg.clip_log_ratio, cfg.clip_log_ratio)
    u = np.clip(d / tau[:, None], -cfg.clip_score, cfg.clip_score)
    log_p = u - np.log(np.exp(u).sum(-1, keepdims=True))
    z = (rewards - rewards.mean(-1, keepdims=True)) / cfg.beta_r
    log_q = z - np.log(np.exp(z).sum(-1, keepdims=True))
    best, best_gap = None, np.inf
    for a in np.linspace(cfg.alpha_min, cfg.alpha_max, cfg.ess_candidates):
        w = np.exp(a * log_q + (1 - a) * log_p)
        w /= w.sum(-1, keepdims=True)
        gap = abs((1 / (w**2).sum(-1)).mean() - cfg.ess_target_frac * ell.shape[1])
        if gap < best_gap:
            best, best_gap = a, gap
    return best


def test_ess_mode_warmup_and_smoothing():
    cfg = sched.ScheduleConfig(mode="ess", ess_warmup_calls=2)
    r = np.random.default_rng(7)
    ell_ref = -r.uniform(0.5, 2.0, size=(3, 6))
    ell = ell_ref + r.normal(scale=0.5, size=(3, 6))
    rewards = r.integers(0, 2, size=(3, 6)).astype(np.float64)
    state = sched.init_schedule_state(cfg)
    for _ in range(2):  # warm-up: α frozen at α_max and the smoothing state reset to it
        alpha, _, state, _ = _call(
            cfg, ell, ell_ref, rewards, state._replace(alpha_ema=jnp.float32(0.5))
        )
        np.testing.assert_allclose(alpha, 0.9)
        np.testing.assert_allclose(state.alpha_ema, 0.9)
    alpha_star = _np_ess_alpha_star(cfg, ell, ell_ref, rewards)
    alpha, _, state, metrics = _call(cfg, ell, ell_ref, rewards, state)
    np.testing.assert_allclose(metrics["ess_alpha_star"], alpha_star, rtol=1e-5)
    expected = np.clip(0.9 * 0.9 + 0.1 * alpha_star, 0.85, 0.95)
    np.testing.assert_allclose(alpha, expected, rtol=1e-5)
    np.testing.assert_allclose(state.alpha_ema, expected, rtol=1e-5)
    assert int(state.calls) == 3


def test_rewards_and_group_advantages_give_the_same_schedule():
    r = np.random.default_rng(3)
    rewards = r.normal(size=(3, 6))
    adv = (rewards - rewards.mean(-1, keepdims=True)) / (
        rewards.std(-1, ddof=1, keepdims=True) + 1e-6
    )
    a1, t1, _, _ = _call(sched.ScheduleConfig(), ELL, ELL_REF, rewards)
    a2, t2, _, _ = _call(sched.ScheduleConfig(), ELL, ELL_REF, adv)
    np.testing.assert_allclose(a1, a2, rtol=1e-5)
    np.testing.assert_allclose(t1, t2, rtol=1e-5)


def test_stop_gradient_and_state_is_a_pytree():
    cfg = sched.ScheduleConfig()

    def total(ell, ell_ref, rewards):
        alpha, tau, _, _ = sched.schedule(
            cfg, sched.init_schedule_state(cfg), ell, ell_ref, rewards
        )
        return alpha.sum() + tau.sum()

    args = (
        np.full((3, 6), -1.0, np.float32),
        np.full((3, 6), -2.0, np.float32),
        REWARDS.astype(np.float32),
    )
    for grad in jax.jit(jax.grad(total, argnums=(0, 1, 2)))(*args):
        assert np.abs(np.asarray(grad)).max() == 0.0
    state = sched.init_schedule_state(cfg)
    leaves = jax.tree.leaves(state)
    assert [x.dtype for x in leaves] == [jnp.float32, jnp.int32] and all(
        x.shape == () for x in leaves
    )
    assert int(jax.jit(lambda s: s)(state).calls) == 0


def test_config_validation():
    for bad in (dict(mode="cosine"), dict(scope="token"), dict(alpha_min=0.95), dict(tau_min=0.0)):
        with pytest.raises(ValueError):
            sched.ScheduleConfig(**bad)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.ScheduleConfig().alpha = 0.5  # type: ignore[misc]
