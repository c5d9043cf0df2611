"""GRPO, DAPO, Dr.GRPO and GSPO against independent numpy loops and the properties of spec §5
(items 14–17). Losses run jitted, once per static option and shape (see test_losses.py)."""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from loss_testing import jitted_loss_and_grad
from numerics import assert_close_to_scale

from apo_jax.objectives import common, dapo, dr_grpo, grpo, gspo
from apo_jax.tasks import rewards as rewards_lib
from apo_jax.trainer import loop

_STATIC = (
    "agg_mode",
    "agg_rows",
    "max_len",
    "dual_clip",
    "kl_coef",
    "kl_type",
    "token_level",
    "scale_adv",
)


def _run(fn, logp, logp_old, mask, rewards, **kw):
    """(LossOutput, ∂loss_sum/∂logp). Defaults are filled in so that calls differing only in
    traced values share one compilation."""
    params = inspect.signature(fn).parameters.values()
    kw = {
        p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
    } | kw
    static = tuple(sorted((k, kw.pop(k)) for k in _STATIC if k in kw))
    return jitted_loss_and_grad(fn, static)(logp, logp_old, mask, rewards, kw)


def _case(p=2, seed=0, spread=0.3):
    """[P, 4, 6] with ragged lengths; ratios e^{±spread} so clipping is active at ε = 0.2."""
    r = np.random.default_rng(seed)
    lengths = r.integers(1, 7, size=(p, 4))
    mask = (np.arange(6) < lengths[..., None]).astype(np.float32)
    logp_old = -r.uniform(0.2, 3.0, size=(p, 4, 6))
    logp = logp_old + r.normal(scale=spread, size=logp_old.shape)
    rewards = r.uniform(size=(p, 4))
    return tuple(x.astype(np.float32) for x in (logp, logp_old, mask, rewards))


def _adv(rewards, scale):
    a = rewards - rewards.mean(-1, keepdims=True)
    return a / (rewards.std(-1, ddof=1, keepdims=True) + 1e-6) if scale else a


def _np_ppo(logp, logp_old, mask, rewards, *, eps_low, eps_high, agg, scale=True, dual_clip=None,
            max_len=None, kl_coef=0.0, logp_ref=None, kl_type="k3", magnitude=False):  # fmt: skip
    """Naive loop over prompts, completions and tokens (spec §4.1, §4.3, §4.4). `magnitude`:
    the same aggregation of |per-token loss|, i.e. Σ|weighted terms| (the rounding scale)."""
    adv = _adv(rewards.astype(np.float64), scale)
    tok_total, n_total, seq, rows = 0.0, 0, [], []
    for i, j in np.ndindex(*rewards.shape):
        a, s, n = adv[i, j], 0.0, 0
        for t in np.flatnonzero(mask[i, j]):
            rho = math.exp(logp[i, j, t] - logp_old[i, j, t])
            loss = max(-a * rho, -a * min(max(rho, 1 - eps_low), 1 + eps_high))
            if dual_clip is not None and a < 0:
                loss = min(loss, -a * dual_clip)
            if kl_coef:
                x = float(logp_ref[i, j, t] - logp[i, j, t])
                loss += kl_coef * {"k1": -x, "k2": x * x / 2, "k3": math.exp(x) - 1 - x}[kl_type]
            loss = abs(loss) if magnitude else loss
            s, n = s + loss, n + 1
        tok_total, n_total = tok_total + s, n_total + n
        rows.append((s, n))
        if n and agg not in ("token-mean", "token-mean-per-micro"):
            seq.append(s / n if agg == "seq-mean-token-mean" else s / max_len)
    if agg == "token-mean-per-micro":  # verl: token-mean per micro-batch of 6 rows, summed,
        # divided by the gradient-accumulation count floor(rows / 6) (at least 1), not the chunks
        chunks = [rows[k : k + 6] for k in range(0, len(rows), 6)]
        means = [sum(s for s, _ in c) / max(sum(n for _, n in c), 1) for c in chunks]
        return float(np.sum(means)) / max(len(rows) // 6, 1)
    return tok_total / n_total if agg == "token-mean" else float(np.mean(seq))


def _np_gspo(logp, logp_old, mask, rewards, eps_low, eps_high, magnitude=False):
    adv, vals = _adv(rewards.astype(np.float64), True), []
    for i, j in np.ndindex(*rewards.shape):
        valid = mask[i, j] > 0
        s = math.exp(float(np.mean(logp[i, j, valid] - logp_old[i, j, valid])))
        a = adv[i, j]
        vals.append(max(-a * s, -a * min(max(s, 1 - eps_low), 1 + eps_high)))
        vals[-1] = abs(vals[-1]) if magnitude else vals[-1]
    return float(np.mean(vals))


def _k(mask, sides=1):
    """k for scale_atol of a loss over `mask`'s tokens (tests/README.md): n for the sums, + 32
    for each term's own rounding (exp/clip, and the advantage's centring, whose error is ~G·eps
    relative to r/std ≈ 4/0.3), per float32 side (the numpy references are float64)."""
    return sides * (float(np.sum(mask)) + 32)


def _max_term(logp, logp_old, mask, rewards):
    """Bound of every aggregation's Σ|weighted terms| (weights sum to ≤ 1): max|A|·max(ρ, 1.2)."""
    rho = np.where(mask > 0, np.exp(logp.astype(np.float64) - logp_old), 0.0)
    return np.abs(_adv(rewards.astype(np.float64), True)).max() * max(rho.max(), 1.2)


# -------------------------------------------------------------------- values vs naive loops (14)


@pytest.mark.parametrize("agg", common.AGG_MODES)
def test_grpo_matches_naive_loop(agg):
    case = _case()
    out, _ = _run(grpo.grpo_loss, *case, agg_mode=agg, max_len=9)
    ref = _np_ppo(*case, eps_low=0.2, eps_high=0.2, agg=agg, max_len=9)
    scale = _np_ppo(*case, eps_low=0.2, eps_high=0.2, agg=agg, max_len=9, magnitude=True)
    assert_close_to_scale(out.mean(), ref, [scale], k=_k(case[2]))
    assert 0.0 < float(out.metrics["clip_frac"]) < 1.0


@pytest.mark.parametrize("kl_type", common.KL_TYPES)
def test_grpo_kl_term_matches_naive_loop(kl_type):
    logp, logp_old, mask, rewards = _case()
    logp_ref = logp_old - 0.1
    kl = dict(kl_coef=0.04, logp_ref=logp_ref, kl_type=kl_type)
    out, _ = _run(grpo.grpo_loss, logp, logp_old, mask, rewards, **kl)
    kw = dict(eps_low=0.2, eps_high=0.2, agg="seq-mean-token-mean", **kl)
    ref = _np_ppo(logp, logp_old, mask, rewards, **kw)
    scale = _np_ppo(logp, logp_old, mask, rewards, magnitude=True, **kw)
    assert_close_to_scale(out.mean(), ref, [scale], k=_k(mask))


def test_dual_clip_matches_naive_loop():
    case = _case(spread=1.5)  # large ratios so the dual clip binds for A < 0
    out, _ = _run(grpo.grpo_loss, *case, agg_mode="token-mean", dual_clip=3.0)
    kw = dict(eps_low=0.2, eps_high=0.2, agg="token-mean", dual_clip=3.0)
    ref, scale = _np_ppo(*case, **kw), _np_ppo(*case, magnitude=True, **kw)
    assert_close_to_scale(out.mean(), ref, [scale], k=_k(case[2]))
    plain, _ = _run(grpo.grpo_loss, *case, agg_mode="token-mean")
    assert float(out.mean()) < float(plain.mean())


def test_dapo_and_dr_grpo_match_naive_loop():
    case = _case()
    dapo_out, _ = _run(dapo.dapo_loss, *case)
    kw = dict(eps_low=0.2, eps_high=0.28, agg="token-mean")
    ref, scale = _np_ppo(*case, **kw), _np_ppo(*case, magnitude=True, **kw)
    assert_close_to_scale(dapo_out.mean(), ref, [scale], k=_k(case[2]))
    dr, _ = _run(dr_grpo.dr_grpo_loss, *case, max_len=8)
    kw = dict(eps_low=0.2, eps_high=0.2, agg="seq-mean-token-sum-norm", scale=False, max_len=8)
    ref, scale = _np_ppo(*case, **kw), _np_ppo(*case, magnitude=True, **kw)
    assert_close_to_scale(dr.mean(), ref, [scale], k=_k(case[2]))


def test_token_mean_differs_from_seq_mean_only_for_ragged_lengths():
    logp, logp_old, mask, rewards = _case()
    args = (logp, logp_old)
    tok, _ = _run(grpo.grpo_loss, *args, mask, rewards, agg_mode="token-mean")
    seq, _ = _run(grpo.grpo_loss, *args, mask, rewards, agg_mode="seq-mean-token-mean")
    assert abs(float(tok.mean()) - float(seq.mean())) > 1e-4
    full = np.ones_like(mask)
    tok, _ = _run(grpo.grpo_loss, *args, full, rewards, agg_mode="token-mean")
    seq, _ = _run(grpo.grpo_loss, *args, full, rewards, agg_mode="seq-mean-token-mean")
    scale = _max_term(logp, logp_old, full, rewards)
    assert_close_to_scale(tok.mean(), seq.mean(), [scale], k=_k(full, sides=2))


# ------------------------------------------------------------------------- gradients (14, 16, 17)


@pytest.mark.parametrize(
    "fn,kw,agg,scale",
    [
        (grpo.grpo_loss, {"agg_mode": "seq-mean-token-mean"}, "seq-mean-token-mean", True),
        (grpo.grpo_loss, {"agg_mode": "token-mean"}, "token-mean", True),
        (dapo.dapo_loss, {}, "token-mean", True),
        (dr_grpo.dr_grpo_loss, {"max_len": 8}, "seq-mean-token-sum-norm", False),
    ],
)
def test_on_policy_gradient_is_advantage_weighted(fn, kw, agg, scale):
    """At ρ = 1 the clipped loss has the gradient of −Â·log π under the same aggregation: DAPO
    weights every token equally; Dr.GRPO's per-sequence gradient grows with length."""
    logp, _, mask, rewards = _case()
    out, grad = _run(fn, logp, logp, mask, rewards, **kw)
    adv = _adv(rewards, scale)[..., None]  # [P, G, 1]
    n = mask.sum(-1, keepdims=True)  # [P, G, 1]
    # ∂loss_sum/∂log π per token, and the denominator that turns the sum into the mean.
    per_token, denom = {
        "token-mean": (1.0, mask.sum()),
        "seq-mean-token-mean": (1.0 / n, (n > 0).sum()),
        "seq-mean-token-sum-norm": (1.0 / 8, (n > 0).sum()),
    }[agg]
    np.testing.assert_allclose(grad, -adv * per_token * mask, atol=1e-6)
    assert float(out.denom) == denom
    np.testing.assert_allclose(out.metrics["kl_old_new"], 0.0, atol=1e-7)


def test_all_equal_rewards_give_zero_gradient():
    logp, logp_old, mask, _ = _case()
    equal = np.full((2, 4), 0.7, np.float32)
    for fn, kw in [
        (grpo.grpo_loss, {}),
        (dr_grpo.dr_grpo_loss, {"max_len": 8}),
        (gspo.gspo_loss, {}),
    ]:
        _, grad = _run(fn, logp, logp_old, mask, equal, **kw)
        assert np.abs(np.asarray(grad)).max() == 0.0


def test_clipped_tokens_get_zero_gradient():
    logp_old = np.full((1, 4, 6), -1.0, np.float32)
    mask = np.ones_like(logp_old)
    rewards = np.asarray([[1.0, 0.0, 0.5, 0.5]], np.float32)  # A > 0, A < 0, A = 0, A = 0
    logp = logp_old.copy()
    logp[0, 0, :3] += 0.5  # A > 0 and ρ > 1 + ε: clipped
    logp[0, 1, :3] -= 0.5  # A < 0 and ρ < 1 − ε: clipped
    logp[0, :2, 3:] += 0.05  # inside the trust region
    _, grad = _run(grpo.grpo_loss, logp, logp_old, mask, rewards)
    assert float(jnp.abs(grad[0, :2, :3]).max()) == 0.0
    assert float(jnp.abs(grad[0, :2, 3:]).min()) > 0.0


def test_dr_grpo_has_no_std_scaling():
    case = _case()
    double = (*case[:3], 2.0 * case[3])
    _, g1 = _run(dr_grpo.dr_grpo_loss, *case, max_len=8)
    _, g2 = _run(dr_grpo.dr_grpo_loss, *double, max_len=8)
    np.testing.assert_allclose(g2, 2.0 * g1, atol=1e-6)
    _, g1 = _run(grpo.grpo_loss, *case)
    _, g2 = _run(grpo.grpo_loss, *double)
    np.testing.assert_allclose(g2, g1, atol=1e-5)  # std-normalised: scale-free


def test_k3_estimator():
    r = np.random.default_rng(1)
    a, b = r.normal(size=1000).astype(np.float32), r.normal(size=1000).astype(np.float32)
    assert float(common.kl_estimate(a, b, "k3").min()) > 0.0
    assert float(jnp.abs(common.kl_estimate(a, a, "k3")).max()) == 0.0
    # Samples from π: mean k3 (and k1) → KL(π‖π_ref).
    log_pi = np.log(np.asarray([0.5, 0.2, 0.15, 0.1, 0.05]))
    log_ref = np.log(np.asarray([0.2, 0.2, 0.2, 0.2, 0.2]))
    kl = float((np.exp(log_pi) * (log_pi - log_ref)).sum())
    y = r.choice(5, size=200_000, p=np.exp(log_pi))
    for kind in ("k1", "k3"):
        est = float(
            common.kl_estimate(
                log_pi[y].astype(np.float32), log_ref[y].astype(np.float32), kind
            ).mean()
        )
        np.testing.assert_allclose(est, kl, atol=5e-3)


# ------------------------------------------------------------------------------------ GSPO (15)


def test_gspo_sequence_ratio_and_naive_loop():
    logp, logp_old, mask, rewards = _case()
    rho = 1.0002  # inside [1 − 3e-4, 1 + 4e-4]
    same = np.where(mask > 0, logp_old + np.log(rho), logp).astype(np.float32)
    out, _ = _run(gspo.gspo_loss, same, logp_old, mask, rewards)
    terms = -_adv(rewards.astype(np.float64), True) * rho / rewards.size  # Σ = 0: centred
    assert_close_to_scale(out.mean(), terms.sum(), terms, k=_k(mask))
    lo, hi = gspo.AUTHOR_CLIP[0], gspo.AUTHOR_CLIP[1]
    out, _ = _run(gspo.gspo_loss, logp, logp_old, mask, rewards, clip_eps_low=lo, clip_eps_high=hi)
    ref = _np_gspo(logp, logp_old, mask, rewards, lo, hi)
    scale = _np_gspo(logp, logp_old, mask, rewards, lo, hi, magnitude=True)
    assert_close_to_scale(out.mean(), ref, [scale], k=_k(mask))


def test_gspo_clips_whole_sequences():
    logp_old = np.full((1, 4, 6), -1.0, np.float32)
    mask = np.ones_like(logp_old)
    rewards = np.asarray([[1.0, 0.0, 0.0, 0.0]], np.float32)
    logp = logp_old.copy()
    logp[0, 0, 0] += 6 * 1e-3  # s_0 = e^{1e-3} > 1 + 4e-4 with A > 0: whole sequence clipped
    logp[0, 1, 0] += 6 * 1e-4  # s_1 = e^{1e-4}: inside
    _, grad = _run(gspo.gspo_loss, logp, logp_old, mask, rewards)
    assert float(jnp.abs(grad[0, 0]).max()) == 0.0
    adv = _adv(rewards, True)[0, 1]
    np.testing.assert_allclose(grad[0, 1], -adv * np.exp(1e-4) / 6, rtol=1e-4)  # ∂ loss_sum


def test_gspo_token_equals_gspo():
    case = _case(spread=0.5)
    kw = dict(clip_eps_low=gspo.AUTHOR_CLIP[0], clip_eps_high=gspo.AUTHOR_CLIP[1])
    seq, g_seq = _run(gspo.gspo_loss, *case, **kw)
    tok, g_tok = _run(gspo.gspo_loss, *case, token_level=True, **kw)
    assert_close_to_scale(tok.mean(), seq.mean(), [_max_term(*case)], k=_k(case[2], sides=2))
    np.testing.assert_allclose(g_tok / tok.denom, g_seq / seq.denom, atol=1e-7)
    assert 0.0 < float(seq.metrics["clip_frac"]) < 1.0


# -------------------------------------------------------------------------- DAPO extras (16)


def test_dapo_overlong_penalty():
    lengths = np.asarray([100, 16384, 18432, 20480, 25000])
    np.testing.assert_allclose(
        rewards_lib.overlong_penalty(lengths, max_len=20480, cache_len=4096), [0, 0, -0.5, -1, -1]
    )


def test_dynamic_sampling_keeps_mixed_groups():
    rewards = np.asarray([[0, 0, 0], [1, 0, 1], [1, 1, 1], [0, 1, 0]], np.float32)
    np.testing.assert_array_equal(loop.dynamic_sampling_keep(rewards), [False, True, False, True])


# ----------------------------------------------------------- (sum, denom), stop-grads, validation


@pytest.mark.parametrize(
    "fn,kw",
    [
        (grpo.grpo_loss, {"agg_mode": "token-mean"}),
        (grpo.grpo_loss, {"agg_mode": "seq-mean-token-mean"}),
        (dr_grpo.dr_grpo_loss, {"max_len": 8}),
        (gspo.gspo_loss, {}),
    ],
)
def test_sum_denom_accumulation_matches_whole_batch(fn, kw):
    logp, logp_old, mask, rewards = _case(p=4, seed=2)
    whole, g_whole = _run(fn, logp, logp_old, mask, rewards, **kw)
    parts = [
        _run(fn, logp[s], logp_old[s], mask[s], rewards[s], **kw)
        for s in (slice(0, 2), slice(2, 4))
    ]
    denom = sum(o.denom for o, _ in parts)
    acc = sum(o.loss_sum for o, _ in parts) / denom
    scale = _max_term(logp, logp_old, mask, rewards)
    assert_close_to_scale(acc, whole.mean(), [scale], k=_k(mask, sides=2))
    g_acc = jnp.concatenate([g for _, g in parts]) / denom
    np.testing.assert_allclose(g_acc, g_whole / whole.denom, atol=1e-7)


def test_stop_gradients():
    logp, logp_old, mask, rewards = _case()

    def loss(rew, old, ref):
        a = grpo.grpo_loss(logp, old, mask, rew, kl_coef=0.1, logp_ref=ref)
        b = gspo.gspo_loss(logp, old, mask, rew, token_level=True)
        return a.loss_sum + b.loss_sum

    for grad in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(rewards, logp_old, logp_old - 0.1):
        assert np.abs(np.asarray(grad)).max() == 0.0


def test_validation():
    case = _case()
    with pytest.raises(ValueError, match="agg_mode"):
        grpo.grpo_loss(*case, agg_mode="sum")
    with pytest.raises(ValueError, match="max_len"):
        grpo.grpo_loss(*case, agg_mode="seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="logp_ref"):
        grpo.grpo_loss(*case, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_type"):
        grpo.grpo_loss(*case, kl_coef=0.1, logp_ref=case[1], kl_type="k4")
