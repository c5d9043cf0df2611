"""Issue 13: objectives as their definitions and the author's code state them, each against an
independent float64 numpy reference (or brute force): APO's regulariser with the on-policy fix,
the author's per-micro-batch token-mean, the reachable α range (spec §5.13), Dr.GRPO's length
scaling (spec §5.17) and the linear (DMPO) target on the anchored simplex."""

import itertools
import math

import jax
import numpy as np
import pytest
from loss_testing import jitted_loss_and_grad

from apo_jax.objectives import apo, common, dapo, dr_grpo, fdiv, grpo, simplex
from apo_jax.objectives import schedule as sched


@pytest.fixture(autouse=True)
def _x64():
    """float64 references need float64 losses (scoped: other modules keep float32 defaults)."""
    with jax.enable_x64(True):
        yield


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _lse(x):
    return np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)


def _grad(fn, logp, logp_old, mask, rewards, static=(), **dyn):
    out, g = jitted_loss_and_grad(fn, tuple(sorted(static)))(logp, logp_old, mask, rewards, dyn)
    return out, np.asarray(g)


# --------------------------------------------------------- item 2: regulariser after the fix


def _np_author_apo(logp, logp_old, mask, rewards, alpha, tau, coef, fix, beta_r=0.3):
    """The reference code's per-group loss, transcribed in float64 with its gradient w.r.t. the
    token log-probs (w and ŵ are detached there, the entropy is not)."""
    n = mask.sum(-1)  # [P, G]
    ell = (logp * mask).sum(-1) / n
    d = ell - (logp_old * mask).sum(-1) / n
    u = d / tau  # no clamp binds in these cases (|d| < 5, |u| < 10)
    p = _softmax(u)
    q = _softmax((rewards - rewards.mean(-1, keepdims=True)) / beta_r)
    w = q if alpha >= 1 else (q + 1e-10) ** alpha * p ** (1 - alpha)
    loss = -(w * np.log(p)).sum(-1) / alpha  # [P]
    d_u = -(w - p * w.sum(-1, keepdims=True)) / alpha  # ∂/∂u
    d_ell = np.zeros_like(u)
    if fix:
        fires = (np.abs(d).mean(-1) < 0.01) & (u.std(-1, ddof=1) < 0.01)
        w_hat = w / w.sum(-1, keepdims=True)
        ent = -(p * np.log(p)).sum(-1)
        loss = np.where(fires, -(w_hat * ell).sum(-1) - 0.01 * ent, loss)
        d_u = np.where(fires[:, None], 0.01 * p * (np.log(p) + ent[:, None]), d_u)
        d_ell = np.where(fires[:, None], -w_hat, 0.0)
    loss = loss + coef * _lse(u) ** 2  # the reference adds it last, in every group
    d_u = d_u + coef * 2 * _lse(u)[:, None] * p
    grad = ((d_ell + d_u / tau) / n)[..., None] * mask  # [P, G, T]
    return loss.sum(), grad


@pytest.mark.parametrize("alpha", [0.6, 1.0])
@pytest.mark.parametrize("coef,fix", [(0.01, True), (0.01, False), (0.0, True)])
def test_logit_regulariser_is_added_after_the_on_policy_fix(alpha, coef, fix):
    r = np.random.default_rng(0)
    p_n, g, t = 3, 6, 5
    lengths = r.integers(1, t + 1, size=(p_n, g))
    mask = (np.arange(t) < lengths[..., None]).astype(np.float64)
    logp_old = -r.uniform(0.5, 3.0, size=(p_n, g, t))
    logp = logp_old.copy()
    logp[0] += 1e-4 * r.normal(size=(g, t))  # fires: within 0.01 of the anchor
    logp[1] += 0.3 * r.normal(size=(g, t))  # does not fire
    rewards = r.uniform(size=(p_n, g))
    static = (("logit_reg_coef", coef), ("on_policy_fix", fix))
    out, grad = _grad(apo.apo_loss, logp, logp_old, mask, rewards, static, alpha=alpha, tau=0.5)
    ref_loss, ref_grad = _np_author_apo(logp, logp_old, mask, rewards, alpha, 0.5, coef, fix)
    np.testing.assert_allclose(float(out.loss_sum), ref_loss, rtol=1e-10)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-8, atol=1e-12)
    if fix and coef:  # the number: 0.01·(ln 6)² per on-policy group of 6
        plain, _ = _grad(
            apo.apo_loss, logp, logp_old, mask, rewards, (("on_policy_fix", True),), alpha=alpha,
            tau=0.5,
        )  # fmt: skip
        gap = float(out.loss_sum - plain.loss_sum)
        u = ((logp - logp_old) * mask).sum(-1) / mask.sum(-1) / 0.5
        np.testing.assert_allclose(gap, coef * (_lse(u) ** 2).sum(), rtol=1e-10)
        np.testing.assert_allclose(coef * _lse(u[2]) ** 2, 0.01 * math.log(6) ** 2, rtol=1e-12)


def test_q_centred_logit_regulariser_matches_the_reference_form():
    """`logit_reg_center="q"`: coef·(lse(u) − sg[Σ q u])² per group (the reference trainer's
    use_q_center subtracts the detached Σ q u from u before its logsumexp), value and gradient
    against float64 numpy; "none" is coef·lse(u)²; both coincide on-policy (u = 0)."""
    r = np.random.default_rng(3)
    p_n, g, t, tau, coef = 3, 6, 4, 0.5, 0.01
    mask = (np.arange(t) < r.integers(1, t + 1, size=(p_n, g))[..., None]).astype(np.float64)
    logp_old = -r.uniform(0.5, 3.0, size=(p_n, g, t))
    logp = logp_old + 0.4 * r.normal(size=(p_n, g, t))
    rewards = r.uniform(size=(p_n, g))
    n = mask.sum(-1)
    u = ((logp - logp_old) * mask).sum(-1) / n / tau  # no clamp binds (|d| < 5, |u| < 10)
    p, q = _softmax(u), _softmax((rewards - rewards.mean(-1, keepdims=True)) / 0.3)
    plain, g_plain = _grad(apo.apo_loss, logp, logp_old, mask, rewards, alpha=1.0, tau=tau)
    for center, shift in (("none", 0.0), ("q", (q * u).sum(-1))):
        static = (("logit_reg_coef", coef), ("logit_reg_center", center))
        out, grad = _grad(apo.apo_loss, logp, logp_old, mask, rewards, static, alpha=1.0, tau=tau)
        z = _lse(u) - shift  # [P]
        gap = float(out.loss_sum - plain.loss_sum)
        np.testing.assert_allclose(gap, coef * (z**2).sum(), rtol=1e-9)
        d_u = 2 * coef * z[:, None] * p  # the centre is a constant: no q term in the gradient
        np.testing.assert_allclose(grad, g_plain + (d_u / tau / n)[..., None] * mask, rtol=1e-9)
    on = dict(alpha=1.0, tau=tau)
    a, _ = _grad(apo.apo_loss, logp_old, logp_old, mask, rewards, static, **on)
    b, _ = _grad(apo.apo_loss, logp_old, logp_old, mask, rewards, (("logit_reg_coef", coef),), **on)
    np.testing.assert_allclose(float(a.loss_sum), float(b.loss_sum), rtol=1e-12)


def _np_dual_clip_token_loss(logp, logp_old, mask, rewards, lo, hi, c):
    """PPO token loss with the dual clip (A < 0: capped at −c·A), token-mean, float64."""
    std = rewards.std(-1, ddof=1, keepdims=True)
    adv = ((rewards - rewards.mean(-1, keepdims=True)) / (std + 1e-6))[..., None]
    ratio = np.exp(logp - logp_old)
    loss = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - lo, 1 + hi))
    if c:
        loss = np.where(adv < 0, np.minimum(loss, -adv * c), loss)
    return (loss * mask).sum() / mask.sum()


def test_dapo_forwards_dual_clip():
    r = np.random.default_rng(4)
    p_n, g, t = 2, 4, 5
    mask = np.ones((p_n, g, t))
    logp_old = -r.uniform(0.5, 3.0, size=(p_n, g, t))
    logp = logp_old + r.normal(0.0, 1.5, size=(p_n, g, t))  # some ratios above the dual clip
    rewards = np.asarray([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    values = {}
    for c in (0.0, 3.0):
        static = (("dual_clip", c),)
        out, grad = _grad(dapo.dapo_loss, logp, logp_old, mask, rewards, static)
        want = _np_dual_clip_token_loss(logp, logp_old, mask, rewards, 0.2, 0.28, c)
        np.testing.assert_allclose(float(out.mean()), want, rtol=1e-10)
        same = (("agg_mode", "token-mean"), ("clip_eps_low", 0.2), ("clip_eps_high", 0.28))
        ref, ref_grad = _grad(grpo.grpo_loss, logp, logp_old, mask, rewards, (*same, *static))
        np.testing.assert_allclose(float(out.mean()), float(ref.mean()), rtol=1e-12)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-15)
        values[c] = float(out.mean())
    assert values[3.0] < values[0.0] - 0.1  # the cap binds on this batch


# ------------------------------------------------ item 3: token-mean per micro-batch of N rows


def _np_per_micro(tok_loss, mask, n_rows):
    """verl: token-mean of each micro-batch of n_rows sequences, summed and divided by the
    gradient-accumulation count ⌊rows / n_rows⌋ (loss_scale_factor = 1/gradient_accumulation)."""
    flat_l = tok_loss.reshape(-1, tok_loss.shape[-1])
    flat_m = mask.reshape(-1, mask.shape[-1])
    means = []
    for lo in range(0, len(flat_l), n_rows):
        num, den = 0.0, 0.0
        for row in range(lo, min(lo + n_rows, len(flat_l))):
            for t in range(flat_l.shape[1]):
                num += flat_l[row, t] * flat_m[row, t]
                den += flat_m[row, t]
        means.append(num / max(den, 1.0))
    return sum(means) / max(len(flat_l) // n_rows, 1)


@pytest.mark.parametrize("p_n,g,n_rows", [(4, 6, 6), (4, 8, 6), (3, 4, 5), (2, 3, 1), (2, 2, 6)])
def test_token_mean_per_micro_matches_a_loop(p_n, g, n_rows):
    r = np.random.default_rng(p_n * g + n_rows)
    lengths = r.integers(0, 9, size=(p_n, g))  # ragged, some empty
    mask = (np.arange(8) < lengths[..., None]).astype(np.float64)
    tok = r.normal(size=(p_n, g, 8))
    total, denom = common.aggregate(tok, mask, "token-mean-per-micro", agg_rows=n_rows)
    np.testing.assert_allclose(float(total / denom), _np_per_micro(tok, mask, n_rows), rtol=1e-12)


def test_grpo_per_micro_gradient_differs_from_mini_batch_token_mean():
    """On the author's G = 6 with mixed lengths, per-micro weights differ from batch token-mean;
    with agg_rows = P·G the two coincide (one chunk)."""
    r = np.random.default_rng(1)
    p_n, g, t = 4, 6, 10
    lengths = np.where(r.uniform(size=(p_n, g)) < 0.5, 2, 10)
    mask = (np.arange(t) < lengths[..., None]).astype(np.float64)
    logp_old = -r.uniform(0.5, 2.0, size=(p_n, g, t))
    logp = logp_old + 0.05 * r.normal(size=logp_old.shape)
    rewards = r.integers(0, 2, size=(p_n, g)).astype(np.float64)
    run = lambda mode, rows: _grad(
        grpo.grpo_loss, logp, logp_old, mask, rewards, (("agg_mode", mode), ("agg_rows", rows))
    )
    (tm, g_tm), (one, g_one), (pm, g_pm) = (
        run("token-mean", 6),
        run("token-mean-per-micro", p_n * g),
        run("token-mean-per-micro", 6),
    )
    np.testing.assert_allclose(float(one.mean()), float(tm.mean()), rtol=1e-12)
    np.testing.assert_allclose(g_one / float(one.denom), g_tm / float(tm.denom), rtol=1e-10)
    # With zero-mean per-prompt chunks (6 rows = one group), token weights are 1/(group tokens).
    adv = (rewards - rewards.mean(-1, keepdims=True)) / (
        rewards.std(-1, ddof=1, keepdims=True) + 1e-6
    )
    ratio = np.exp(logp - logp_old)
    clipped = ((adv[..., None] > 0) & (ratio > 1.2)) | ((adv[..., None] < 0) & (ratio < 0.8))
    expect = -adv[..., None] * ratio * ~clipped * mask / mask.sum((1, 2), keepdims=True) / p_n
    np.testing.assert_allclose(g_pm / float(pm.denom), expect, rtol=1e-9, atol=1e-14)


def test_per_micro_divisor_is_verls_gradient_accumulation_count():
    """The grpo_author experiment: 64 prompts x G 8 over 2 mini-batches = 256 rows per update,
    chunks of 6: 43 chunks (the last of 4 rows), divisor 256 // 6 = 42."""
    mask = np.ones((32, 8, 3))
    total, denom = common.aggregate(np.ones((32, 8, 3)), mask, "token-mean-per-micro", agg_rows=6)
    assert float(denom) == 42.0 and float(total) == 43.0  # every chunk's token-mean is 1


def test_agg_rows_is_checked():
    with pytest.raises(ValueError, match="grpo.agg_rows"):
        grpo.OBJECTIVE.check({**grpo.DEFAULTS, "agg_rows": 0})


# --------------------------------------------------------- item 5: the reachable α range


@pytest.mark.parametrize("g", [2, 3, 4, 5, 6, 8])
def test_alpha_floor_by_brute_force_over_reward_patterns(g):
    """Every binary pattern, and every pattern over {0, 0.3, 0.5, 1} for G ≤ 6, with c = 1:
    the smallest α the legacy rule gives equals `alpha_floor` and none is below it."""
    cfg = sched.ScheduleConfig()
    levels = (0.0, 1.0) if g > 6 else (0.0, 0.3, 0.5, 1.0)
    rewards = np.asarray(list(itertools.product(levels, repeat=g)), np.float32)  # [P, G]
    zeros = np.zeros_like(rewards)  # ℓ = 0: H_dyn = 0, c = 1 (the most α can fall)
    state = sched.init_schedule_state(cfg)
    alpha, *_ = jax.jit(sched.schedule, static_argnums=0)(cfg, state, zeros, zeros, rewards)
    alpha = np.asarray(alpha, np.float64)
    floor = sched.alpha_floor(cfg.alpha_min, cfg.alpha_max, g)
    # float32 schedule: ā is a mean of G ratios in [0, 1]
    tol = 8 * np.finfo(np.float32).eps * (1 + g)
    assert alpha.min() >= floor - tol
    np.testing.assert_allclose(alpha.min(), floor, atol=tol)
    # attained exactly by G − 1 top rewards and one bottom one
    top = np.ones(g, np.float32)
    top[0] = 0.0
    hit = np.flatnonzero((rewards == top).all(-1))
    np.testing.assert_allclose(alpha[hit], floor, atol=tol)


def test_alpha_floor_worked_values():
    np.testing.assert_allclose(sched.alpha_floor(0.35, 0.9, 6), 0.9 - 0.55 * 2 / 3, rtol=1e-15)
    np.testing.assert_allclose(sched.alpha_floor(0.35, 0.9, 6), 0.5333333333333333)
    assert sched.alpha_floor(0.35, 0.9, 2) == 0.9
    assert sched.alpha_floor(0.35, 0.9, 10**9) == pytest.approx(0.35, abs=1e-8)


# ------------------------------------------------ item 9: Dr.GRPO gradient ∝ sequence length


def test_dr_grpo_sequence_gradient_scales_with_length():
    """Spec §5.17: on-policy, a sequence's total gradient Σ_t ∂L/∂logπ is −A_i·|o_i|/(G·max_len)
    (no 1/|o_i|): doubling a sequence's length doubles it, unlike GRPO's seq-mean-token-mean."""
    r = np.random.default_rng(2)
    g, t = 4, 12
    lengths = np.asarray([[3, 6, 12, 6]])
    mask = (np.arange(t) < lengths[..., None]).astype(np.float64)
    logp = -r.uniform(0.5, 2.0, size=(1, g, t))
    rewards = np.asarray([[1.0, 0.0, 1.0, 0.5]])
    out, grad = _grad(dr_grpo.dr_grpo_loss, logp, logp, mask, rewards, (("max_len", t),))
    per_seq = grad.sum(-1) / float(out.denom)  # [1, G] gradient of the mean loss
    adv = rewards - rewards.mean(-1, keepdims=True)  # no std scaling
    np.testing.assert_allclose(per_seq, -adv * lengths / (g * t), rtol=1e-12, atol=1e-15)
    # sequences 0 and 2 have the same advantage, lengths 3 and 12: the gradient ratio is 4
    np.testing.assert_allclose(per_seq[0, 2] / per_seq[0, 0], 4.0, rtol=1e-12)
    out_g, grad_g = _grad(grpo.grpo_loss, logp, logp, mask, rewards, (("scale_adv", False),))
    seq_g = grad_g.sum(-1) / float(out_g.denom)
    np.testing.assert_allclose(seq_g[0, 2] / seq_g[0, 0], 1.0, rtol=1e-12)  # GRPO: no length


# ------------------------------------------------ item 8: the linear (DMPO) target on the simplex


def _np_linear_q(r, eps=simplex.LINEAR_EPS):
    lo, hi = r.min(-1, keepdims=True), r.max(-1, keepdims=True)
    x = np.zeros_like(r)
    np.divide(r - lo, hi - lo, out=x, where=np.broadcast_to(hi > lo, r.shape))
    return (x + eps) / (x + eps).sum(-1, keepdims=True)


def test_linear_target_definition_and_limits():
    r = np.random.default_rng(3).normal(size=(5, 6))
    log_q = np.asarray(simplex.target_log_q(r, 0.3, False, "linear"))
    np.testing.assert_allclose(np.exp(log_q), _np_linear_q(r), rtol=1e-12)
    # shift and positive scale invariant; β_r and scale_rewards unused
    for r2, beta, scale in ((3.0 * r - 7.0, 0.3, False), (r, 5.0, True)):
        np.testing.assert_allclose(
            simplex.target_log_q(r2, beta, scale, "linear"), log_q, atol=1e-12
        )
    # all equal: uniform
    flat = np.full((2, 6), 0.7)
    np.testing.assert_allclose(np.exp(simplex.target_log_q(flat, 0.3, False, "linear")), 1 / 6)
    # binary with k correct: (1 + ε)/(k + Gε) per correct answer, ε/(k + Gε) per wrong one
    eps, g = simplex.LINEAR_EPS, 6
    for k in range(1, g):
        b = (np.arange(g) < k).astype(np.float64)[None]
        q = np.exp(np.asarray(simplex.target_log_q(b, 0.3, False, "linear")))[0]
        np.testing.assert_allclose(q[:k], (1 + eps) / (k + g * eps), rtol=1e-12)
        np.testing.assert_allclose(q[k:], eps / (k + g * eps), rtol=1e-12)
    # linear in the reward: q_i − q_j ∝ r_i − r_j within a group
    q = _np_linear_q(r)
    ratio = (q[:, 1:] - q[:, :1]) / (r[:, 1:] - r[:, :1])
    np.testing.assert_allclose(ratio, np.broadcast_to(ratio[:, :1], ratio.shape), rtol=1e-10)
    with pytest.raises(ValueError, match="loss.apo.target"):
        apo.OBJECTIVE.check({**apo.DEFAULTS, "target": "sigmoid"})


def _u_grad(fn, u, rewards, static, **dyn):
    """∂loss_sum/∂u with one token per completion, anchor 0, τ = 1 (so u = logp)."""
    z = np.zeros_like(u)[..., None]
    out, g = _grad(fn, u[..., None], z, np.ones_like(z), rewards, static, tau=1.0, **dyn)
    return out, g[..., 0]


@pytest.mark.parametrize("alpha", [0.35, 0.7, 1.0])
def test_linear_target_gradient_matches_float64_closed_form(alpha):
    """APO with q linear: ∇_u = −(1/α)(w − pW), w = q^α p^(1−α) (α = 1: p − q); and the
    forward-KL member with q linear is DMPO's KL(q‖p): gradient p − q, value Σ q log(q/p)."""
    r = np.random.default_rng(4)
    u, rewards = r.normal(size=(3, 6)), r.uniform(size=(3, 6))
    rewards[2] = (rewards[2] > 0.5).astype(np.float64)  # a binary group too
    q, p = _np_linear_q(rewards), _softmax(u)
    w = q if alpha == 1.0 else (q + 1e-10) ** alpha * p ** (1 - alpha)
    expect = -(w - p * w.sum(-1, keepdims=True)) / alpha
    _, g = _u_grad(apo.apo_loss, u, rewards, (("target", "linear"),), alpha=alpha)
    np.testing.assert_allclose(g, expect, rtol=1e-8, atol=1e-12)
    if alpha == 1.0:
        out, g_kl = _u_grad(
            fdiv.f_divergence_loss, u, rewards,
            (("target", "linear"), ("divergence", "forward_kl")), alpha=0.5,
        )  # fmt: skip
        np.testing.assert_allclose(g_kl, p - q, rtol=1e-10, atol=1e-14)
        kl = (q * np.log(q / p)).sum(-1).mean()
        np.testing.assert_allclose(float(out.metrics["divergence"]), kl, rtol=1e-6)  # float32
