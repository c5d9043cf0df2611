"""Clip-Cov, KL-Cov, CISPO, SAPO, α-DPG and TPO against float64 transcriptions of their
reference code (verl's core_algos, naver/alpha-dpg, JeanKaddour/tpo), value and gradient, in
the references' own layout (rows [B, T], B = P·G, rows grouped by prompt) and autograd (torch);
the covariance selection's draw, the exact token counts, the config blocks, and one training step
of each objective."""

import dataclasses
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from loss_testing import jitted_loss_and_grad
from test_micro_batches import G, P, _assert_same, _batch, _step

from apo_jax import objectives
from apo_jax.objectives import alpha_dpg, cispo, clip_cov, kl_cov, sapo, tpo
from apo_jax.objectives import batch as batch_lib
from apo_jax.trainer import build
from apo_jax.trainer import loop as train
from configs import base, toy

NEW = ("clip_cov", "kl_cov", "cispo", "sapo", "alpha_dpg", "tpo")
MODULES = {m.OBJECTIVE.name: m for m in (clip_cov, kl_cov, cispo, sapo, alpha_dpg, tpo)}
LOSSES = {
    "clip_cov": clip_cov.clip_cov_loss,
    "kl_cov": kl_cov.kl_cov_loss,
    "cispo": cispo.cispo_loss,
    "sapo": sapo.sapo_loss,
    "alpha_dpg": alpha_dpg.alpha_dpg_loss,
    "tpo": tpo.tpo_loss,
}
# Options that steer Python control flow or host-side counts: fixed at trace time.
_STATIC = ("scale_adv", "clip_cov_ratio", "kl_cov_ratio", "use_baseline", "pseudo_reward_clip",
           "max_len", "length_normalize")  # fmt: skip


@pytest.fixture(autouse=True)
def _x64():
    """float64 against float64 references (scoped: other modules keep float32)."""
    with jax.enable_x64(True):
        yield


def _run(name, logp, logp_old, mask, rewards, **kw):
    """(LossOutput, ∂loss_sum/∂logp) of the JAX loss, float64."""
    static = tuple(sorted((k, kw.pop(k)) for k in _STATIC if k in kw))
    out, grad = jitted_loss_and_grad(LOSSES[name], static)(logp, logp_old, mask, rewards, kw)
    return out, np.asarray(grad)


def _case(p=3, g=4, t=7, seed=0, spread=0.3, depth=3.0):
    """[P, G, T] float64 with ragged lengths, binary rewards (one all-wrong group at p >= 3),
    token log-probs in [−depth, 0] moved by N(0, spread²)."""
    r = np.random.default_rng(seed)
    lengths = r.integers(2, t + 1, size=(p, g))
    mask = (np.arange(t) < lengths[..., None]).astype(np.float64)
    logp_old = -r.uniform(0.1, depth, size=(p, g, t))
    logp = logp_old + r.normal(scale=spread, size=logp_old.shape)
    rewards = (r.uniform(size=(p, g)) < 0.5).astype(np.float64)
    rewards[0, :2] = (1.0, 0.0)  # mixed
    if p >= 3:
        rewards[2] = 0.0  # no correct answer: zero advantages, α-DPG's Ẑ = 0 (z_default)
    return logp, logp_old, mask, rewards


# ------------------------------------------------------------------ references (torch, float64)


def _rows(x):
    return torch.tensor(np.asarray(x, np.float64).reshape(-1, x.shape[-1]))


def _ref_grpo_adv(rewards, mask):
    """verl's GRPO outcome advantage: (r − group mean)/(unbiased group std + 1e-6), on tokens."""
    r = torch.tensor(rewards)
    a = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-6)
    return a.reshape(-1, 1) * mask


def _token_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def _seq_mean_token_mean(x, mask):
    n = mask.sum(-1)
    per_row = (x * mask).sum(-1) / (n + 1e-8)  # verl's denominator
    keep = (n > 0).double()
    return (per_row * keep).sum() / keep.sum()


def _ref(name, logp, logp_old, mask, rewards, **kw):
    """(loss, ∂loss/∂logp [P, G, T], extras) of the reference, float64 autograd."""
    x = _rows(logp).requires_grad_(True)
    old, m = _rows(logp_old), _rows(mask)
    loss, extras = _REFERENCES[name](x, old, m, rewards, **kw)
    loss.backward()
    return loss.item(), x.grad.numpy().reshape(logp.shape), extras


def _ref_clip_cov(x, old, m, rewards, *, cut, eps_low, eps_high, ratio_c, lb, ub):
    """verl compute_policy_loss_clip_cov; `cut(idx, k)` stands for torch.randperm(len(idx))[:k]
    and returns the chosen (row, t) pairs."""
    adv = _ref_grpo_adv(rewards, m)
    ratio = torch.exp(x - old)
    pg1 = -adv * ratio
    pg2 = -adv * torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
    by_clip = (pg2 > pg1) & (m > 0)
    mean_adv = (adv * m).sum() / m.sum()
    mean_logp = (x.detach() * m).sum() / m.sum()
    cov = (adv - mean_adv) * (x.detach() - mean_logp)
    cov = torch.where((m == 0) | by_clip, -torch.inf, cov)
    k = max(int(ratio_c * m.sum().item()), 1)
    eligible = (cov < ub) & (cov > lb) & (m > 0)
    chosen = cut(torch.nonzero(eligible), k)
    keep = torch.ones_like(adv)
    keep[chosen[:, 0], chosen[:, 1]] = 0.0
    return _token_mean(torch.maximum(pg1, pg2) * keep, m), dict(eligible=eligible, k=k)


def _ref_kl_cov(x, old, m, rewards, *, ratio_k, coef):
    """verl compute_policy_loss_kl_cov (torch.topk over the valid tokens' covariance)."""
    adv = _ref_grpo_adv(rewards, m)
    log_ratio = x - old
    pg1 = -adv * torch.exp(log_ratio)
    pg_kl = pg1 + coef * log_ratio.abs()
    valid = (m > 0).reshape(-1)
    flat_idx = torch.nonzero(valid)[:, 0]
    a, lp = adv.reshape(-1)[valid], x.detach().reshape(-1)[valid]
    cov = (a - a.mean()) * (lp - lp.mean())
    top = flat_idx[torch.topk(cov, max(1, int(len(cov) * ratio_k))).indices]
    sel = torch.zeros(valid.shape, dtype=torch.bool)
    sel[top] = True
    pg = torch.where(sel.reshape(m.shape), pg_kl, pg1)
    return _token_mean(pg, m), dict(selected=sel.reshape(m.shape))


def _ref_cispo(x, old, m, rewards, *, eps_low, eps_high):
    """verl compute_policy_loss_cispo, token-mean."""
    adv = _ref_grpo_adv(rewards, m)
    ratio = torch.exp(torch.clamp(x - old, -20.0, 20.0))
    w = torch.clamp(ratio, 1 - eps_low, 1 + eps_high).detach()
    return _token_mean(-w * adv * x, m), {}


def _ref_sapo(x, old, m, rewards, *, tau_pos, tau_neg):
    """verl compute_policy_loss_sapo (seq-mean-token-mean, verl's 1e-8 in the denominator)."""
    adv = _ref_grpo_adv(rewards, m)
    ratio = torch.exp(torch.clamp(x - old, -20.0, 20.0))
    tau = torch.where(
        adv > 0, torch.tensor(tau_pos, dtype=adv.dtype), torch.tensor(tau_neg, dtype=adv.dtype)
    )
    gate = torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau)
    return _seq_mean_token_mean(-gate * adv, m), {}


def _ref_alpha_dpg(x, old, m, rewards, *, ref, alpha, clip, use_baseline, z_default, max_len):
    """naver/alpha-dpg: seq_level_scores (exponential_ebm false: log p̃ = Σ log π_ref + log R),
    compute_partition_function (reset_z: the group's mean, clamped at 1; z_default where 0),
    compute_fcdpg_advantage ("alpha"), apply_leave_one_out_baseline, compute_policy_loss_fcdpg
    (seq-mean-token-sum-norm over max_len)."""
    g = rewards.shape[-1]
    r = torch.tensor(rewards).reshape(-1)
    target = (_rows(ref) * m).sum(-1) + torch.log(r)
    policy = (old * m).sum(-1)
    z_point = torch.exp(target - policy)
    z = z_point.reshape(-1, g).mean(-1, keepdim=True).expand(-1, g).reshape(-1)
    z = torch.clamp(z, max=1.0)
    z = torch.where(z == 0, z + z_default, z)
    log_t = policy - (target - torch.log(z))
    f_prime = -torch.expm1(log_t * (alpha - 1.0))
    pr = -f_prime
    if clip:
        pr = torch.clamp(pr, max=clip)
    adv = pr.clone()
    if use_baseline:
        groups = pr.reshape(-1, g)
        adv = (groups - (groups.sum(-1, keepdim=True) - groups) / (g - 1)).reshape(-1)
    loss = (-adv * (m * x).sum(-1)).mean() / max_len
    return loss, dict(pseudo_reward=pr.reshape(-1, g).numpy())


def _ref_tpo(x, old, m, rewards, *, eta, length_normalize):
    """JeanKaddour/tpo tpo_skill / tpo_target and the cross-entropy -(q·log p).sum(-1).mean()."""
    g = rewards.shape[-1]
    n = m.sum(-1) if length_normalize else torch.ones(m.shape[0], dtype=torch.float64)
    ell = ((x * m).sum(-1) / n).reshape(-1, g)
    ell_old = ((old * m).sum(-1) / n).reshape(-1, g)
    s = torch.tensor(rewards)
    centred = s - s.mean(-1, keepdim=True)
    std = centred.std(-1, keepdim=True, correction=0)
    skill = torch.where(std > 1e-6, centred / torch.where(std > 1e-6, std, 1.0), centred)
    q = torch.softmax(torch.log_softmax(ell_old, -1) + skill / eta, -1).detach()
    log_p = torch.log_softmax(ell, -1)
    return -(q * log_p).sum(-1).mean(), dict(q=q.numpy(), p=torch.exp(log_p).detach().numpy())


_REFERENCES = {
    "clip_cov": _ref_clip_cov,
    "kl_cov": _ref_kl_cov,
    "cispo": _ref_cispo,
    "sapo": _ref_sapo,
    "alpha_dpg": _ref_alpha_dpg,
    "tpo": _ref_tpo,
}


def _assert_matches(out, grad, ref_loss, ref_grad, rtol=1e-11):
    """Value (the mean) and gradient (of the mean) against the reference, float64 both."""
    scale = max(abs(ref_loss), float(np.abs(ref_grad).max()), 1e-3)
    np.testing.assert_allclose(float(out.mean()), ref_loss, rtol=0, atol=rtol * scale)
    got = grad / float(out.denom)
    np.testing.assert_allclose(got, ref_grad, rtol=0, atol=rtol * np.abs(ref_grad).max())


# ------------------------------------------------------------------------------------ clip-cov


def _cut_as_torch(cut):
    """A `cut(idx, k)` for the reference that returns our draw, after checking that it is a
    draw the reference could have made: min(k, #eligible) distinct eligible tokens."""
    ours = {tuple(i) for i in np.argwhere(np.asarray(cut).reshape(-1, cut.shape[-1]))}

    def pick(idx, k):
        eligible = {tuple(i) for i in idx.tolist()}
        assert ours <= eligible and len(ours) == min(k, len(eligible))
        return torch.tensor(sorted(ours), dtype=torch.long).reshape(-1, 2)

    return pick


@pytest.mark.parametrize(
    "kw,partial",
    [
        # some tokens PPO-clipped (hence not eligible); 4 of 5 eligible tokens cut
        (dict(clip_eps_low=0.2, clip_eps_high=0.2, clip_cov_ratio=0.08, clip_cov_lb=0.3), True),
        (dict(clip_eps_low=1.0, clip_eps_high=1.0, clip_cov_ratio=2e-4), True),  # the recipe's
        # k = 25 > 8 eligible tokens: all of them are cut
        (dict(clip_eps_low=0.2, clip_eps_high=0.28, clip_cov_ratio=0.5, clip_cov_lb=0.2), False),
    ],
)
def test_clip_cov_matches_verl(kw, partial):
    case = _case(spread=0.6, depth=8.0)
    kw = dict(clip_cov.DEFAULTS, **kw)
    key = jax.random.key(3)
    cut, eligible, clipped = clip_cov.cut_mask(*case, key, **kw)
    out, grad = _run("clip_cov", *case, key=key, **kw)
    ref_loss, ref_grad, extras = _ref(
        "clip_cov",
        *case,
        cut=_cut_as_torch(cut),
        eps_low=kw["clip_eps_low"],
        eps_high=kw["clip_eps_high"],
        ratio_c=kw["clip_cov_ratio"],
        lb=kw["clip_cov_lb"],
        ub=kw["clip_cov_ub"],
    )
    np.testing.assert_array_equal(np.asarray(eligible).reshape(-1, 7), extras["eligible"].numpy())
    n_cut, n_eligible = int(np.asarray(cut).sum()), int(np.asarray(eligible).sum())
    assert n_cut >= 1 and (n_eligible > n_cut) == partial
    _assert_matches(out, grad, ref_loss, ref_grad)
    assert np.all(grad[np.asarray(cut)] == 0.0)  # cut tokens: no gradient
    assert float(out.metrics["clip_frac"]) == pytest.approx(np.asarray(cut).sum() / case[2].sum())
    if kw["clip_eps_low"] < 1.0:
        assert np.asarray(clipped).any()  # the ratio clip binds, and its tokens are not eligible


def test_clip_cov_draw_is_keyed_and_uniform():
    case = _case(spread=0.6, depth=8.0)
    kw = dict(clip_cov.DEFAULTS, clip_cov_ratio=0.05, clip_cov_lb=0.1)
    draw = jax.jit(jax.vmap(lambda k: clip_cov.cut_mask(*case, k, **kw)[0]))
    keys = jax.random.split(jax.random.key(0), 2000)
    cuts = np.asarray(draw(keys))  # [2000, P, G, T]
    eligible = np.asarray(clip_cov.cut_mask(*case, keys[0], **kw)[1])
    n_el, k = int(eligible.sum()), int(cuts[0].sum())
    assert 1 < k < n_el and np.all(cuts.sum((1, 2, 3)) == k) and not cuts[:, ~eligible].any()
    np.testing.assert_array_equal(cuts[0], np.asarray(draw(keys[:1]))[0])  # same key, same cut
    assert len({c.tobytes() for c in cuts[:50]}) > 40  # other keys, other cuts
    # Each eligible token is cut with probability k/n_el: binomial counts within 5 σ.
    freq, p = cuts[:, eligible].sum(0), k / n_el
    assert np.all(np.abs(freq - 2000 * p) < 5 * math.sqrt(2000 * p * (1 - p)))


@pytest.mark.parametrize("ratio", [2e-4, 2e-3, 0.1, 1 / 3, 0.3, 0.77])
def test_fraction_count_is_verls_float64_count(ratio):
    n_max = 6000
    n = jnp.arange(n_max + 1)
    got = np.asarray(jax.vmap(lambda x: clip_cov.fraction_count(x, ratio, n_max))(n))
    want = np.asarray([max(int(ratio * i), 1) for i in range(n_max + 1)])
    np.testing.assert_array_equal(got, want)


# -------------------------------------------------------------------------------------- kl-cov


@pytest.mark.parametrize("ratio,coef", [(2e-3, 1.0), (0.2, 0.1), (0.5, 1.0)])
def test_kl_cov_matches_verl(ratio, coef):
    case = _case(spread=0.4)
    out, grad = _run("kl_cov", *case, kl_cov_ratio=ratio, ppo_kl_coef=coef)
    ref_loss, ref_grad, extras = _ref("kl_cov", *case, ratio_k=ratio, coef=coef)
    _assert_matches(out, grad, ref_loss, ref_grad)
    n_sel = int(extras["selected"].sum())
    assert n_sel == max(1, int(case[2].sum() * ratio))
    assert float(out.metrics["kl_cov_frac"]) == pytest.approx(n_sel / case[2].sum())


def test_kl_cov_penalty_does_not_push_on_policy():
    """At π_θ = π_old every |log ρ| is 0 with subgradient 0 (torch's): the gradient is the plain
    token-mean policy gradient −Â/N on every token, as in verl."""
    logp, _, mask, rewards = _case()
    out, grad = _run("kl_cov", logp, logp, mask, rewards, kl_cov_ratio=0.5)
    adv = _ref_grpo_adv(rewards, _rows(mask)).numpy().reshape(mask.shape)
    np.testing.assert_allclose(grad / float(out.denom), -adv / mask.sum(), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------------- CISPO, SAPO


@pytest.mark.parametrize("low,high", [(1.0, 0.2), (0.2, 0.28), (10.0, 5.0)])
def test_cispo_matches_verl(low, high):
    case = _case(spread=0.5)
    out, grad = _run("cispo", *case, clip_eps_low=low, clip_eps_high=high)
    ref_loss, ref_grad, _ = _ref("cispo", *case, eps_low=low, eps_high=high)
    _assert_matches(out, grad, ref_loss, ref_grad)
    # No token is dropped: every valid token of a sequence with Â != 0 has a gradient.
    adv = _ref_grpo_adv(case[3], _rows(case[2])).numpy().reshape(case[2].shape)
    assert np.all(grad[(case[2] > 0) & (adv != 0)] != 0.0)
    if high < 1.0:
        assert 0.0 < float(out.metrics["clip_frac"]) < 1.0


@pytest.mark.parametrize("tau_pos,tau_neg", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_matches_verl(tau_pos, tau_neg):
    case = _case(spread=0.5)
    out, grad = _run("sapo", *case, tau_pos=tau_pos, tau_neg=tau_neg)
    ref_loss, ref_grad, _ = _ref("sapo", *case, tau_pos=tau_pos, tau_neg=tau_neg)
    # verl divides each row by (|o_i| + 1e-8), here by |o_i|: a relative 1e-8 / |o_i|.
    _assert_matches(out, grad, ref_loss, ref_grad, rtol=1e-8)


def test_sapo_on_policy_is_the_policy_gradient():
    """f_τ'(1) = 1 for every τ: on-policy, SAPO's gradient is −Â_i/|o_i| per token (GRPO's)."""
    logp, _, mask, rewards = _case()
    out, grad = _run("sapo", logp, logp, mask, rewards, tau_pos=0.3, tau_neg=3.0)
    adv = _ref_grpo_adv(rewards, _rows(mask)).numpy().reshape(mask.shape)
    want = -adv / mask.sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, want, rtol=0, atol=1e-14)
    assert float(out.metrics["gate_weight"]) == pytest.approx(1.0, abs=1e-12)


# -------------------------------------------------------------------------------------- α-DPG


@pytest.mark.parametrize(
    "alpha,clip,baseline",
    [(0.25, 10.0, True), (0.0, 10.0, True), (0.9, 2.0, False), (0.5, 0.0, True)],
)
def test_alpha_dpg_matches_naver_alpha_dpg(alpha, clip, baseline):
    logp, logp_old, mask, rewards = _case(p=4, seed=1)
    logp_ref = logp_old + 0.2 * np.random.default_rng(2).normal(size=logp.shape)
    rewards[3] = (1.0, 1.0, 0.0, 1.0)
    logp_ref[3, 0] += 5.0  # Σ_t log π_ref − log π_old ≫ 0: Ẑ capped at 1, the clip binds
    rewards[1] = (0.5, 1.0, 0.0, 1.0)  # a partial reward: p̃ ∝ π_ref·R
    kw = dict(alpha=alpha, pseudo_reward_clip=clip, use_baseline=baseline)
    args = (logp, logp_old, mask, rewards)
    out, grad = _run("alpha_dpg", *args, logp_ref=logp_ref, max_len=9, **kw)
    ref_loss, ref_grad, extras = _ref(
        "alpha_dpg",
        *args,
        ref=logp_ref,
        alpha=alpha,
        clip=clip,
        use_baseline=baseline,
        z_default=1e-4,
        max_len=9,
    )
    _assert_matches(out, grad, ref_loss, ref_grad)
    pr = extras["pseudo_reward"]
    np.testing.assert_array_equal(pr[2], -1.0)  # nothing correct: all outside the filter
    if clip:
        assert pr.max() == clip and float(out.metrics["pseudo_reward_clip_frac"]) > 0
    else:
        assert pr.max() > 10.0  # the case above really needs the clip
    np.testing.assert_allclose(out.metrics["pseudo_reward"], pr.mean(), rtol=1e-6)  # float32


def test_alpha_dpg_filters_on_correctness_not_on_the_shaped_reward():
    """The objective's filter is LossBatch.correct: a shaped reward (wrong answers above 0, a
    penalty on right ones) leaves it as with R = 1[correct], where reading the reward would
    put wrong answers in the target."""
    logp, logp_old, mask, correct = _case(p=4, seed=1)
    r = np.random.default_rng(3)
    logp_ref = logp_old + 0.2 * r.normal(size=logp.shape)
    shaped = correct - 0.3 + 0.2 * r.uniform(size=correct.shape)  # wrong ones in (−0.3, −0.1)
    shaped[correct == 0] += 0.4  # ... now in (0.1, 0.3): inside a filter on the reward
    obj = objectives.get("alpha_dpg")
    assert "correct" in obj.reads and "ref_logp" in obj.reads
    lb = batch_lib.LossBatch(
        **{k: jnp.asarray(v) for k, v in dict(completion_mask=mask, old_logp=logp_old,
                                              rewards=shaped, ref_logp=logp_ref,
                                              correct=correct).items()}
    )  # fmt: skip
    got = obj.loss(jnp.asarray(logp), lb, objectives.Context(max_new_tokens=9), **obj.defaults)
    kw = dict(logp_ref=logp_ref, max_len=9, **obj.defaults)
    want, _ = _run("alpha_dpg", logp, logp_old, mask, correct, **dict(kw))
    other, _ = _run("alpha_dpg", logp, logp_old, mask, shaped, **dict(kw))
    np.testing.assert_allclose(got.loss_sum, want.loss_sum, rtol=1e-12)
    np.testing.assert_allclose(got.metrics["pseudo_reward"], want.metrics["pseudo_reward"])
    assert abs(float(other.loss_sum) - float(want.loss_sum)) > 1e-3 * abs(float(want.loss_sum))


def test_alpha_dpg_needs_the_reference_model():
    assert objectives.get("alpha_dpg").reference(alpha_dpg.DEFAULTS)


# ---------------------------------------------------------------------------------------- TPO


@pytest.mark.parametrize("eta,length_normalize", [(1.0, False), (0.5, True), (2.0, False)])
def test_tpo_matches_the_reference(eta, length_normalize):
    # Shallow log-probs: sequence log-probs within a few nats, so p_old is not one-hot.
    logp, logp_old, mask, rewards = _case(spread=0.1, seed=4, depth=0.5)
    rewards[1] = (0.2, 0.9, 0.4, 0.4)  # graded scores
    kw = dict(eta=eta, length_normalize=length_normalize)
    out, grad = _run("tpo", logp, logp_old, mask, rewards, **kw)
    ref_loss, ref_grad, extras = _ref("tpo", logp, logp_old, mask, rewards, **kw)
    _assert_matches(out, grad, ref_loss, ref_grad)
    # ∂L_prompt/∂ℓ_i = p_i − q_i, spread over the tokens (÷|o_i| with length_normalize).
    n = mask.sum(-1, keepdims=True) if length_normalize else 1.0
    want = (extras["p"] - extras["q"])[..., None] * mask / n
    np.testing.assert_allclose(grad, want, rtol=0, atol=1e-14)


def test_tpo_constant_group_is_neutral_on_policy():
    """Equal rewards: u = 0, q = p_old, so on the rollout snapshot the group's gradient is 0."""
    logp, _, mask, rewards = _case(seed=5, depth=0.5)
    out, grad = _run("tpo", logp, logp, mask, rewards)
    # q = softmax(log p_old + 0) equals p_old up to float64 rounding
    assert np.abs(grad[2]).max() < 1e-14 and np.abs(grad[0]).max() > 1e-2


# ------------------------------------------------------------------------ registration, config


@pytest.mark.parametrize("name", NEW)
def test_block_and_signature_defaults_agree(name):
    obj = objectives.get(name)
    assert obj is MODULES[name].OBJECTIVE
    block = base.get_config().loss[name].to_dict()
    assert block == dict(obj.defaults)
    params = inspect.signature(LOSSES[name]).parameters
    for key, value in block.items():
        assert params[key].default == value, (name, key)


@pytest.mark.parametrize(
    "name,key,value",
    [
        ("clip_cov", "clip_cov_ratio", 0.0),
        ("clip_cov", "clip_cov_lb", 6.0),
        ("clip_cov", "clip_eps_high", -0.1),
        ("kl_cov", "kl_cov_ratio", 1.5),
        ("kl_cov", "ppo_kl_coef", -1.0),
        ("cispo", "clip_eps_low", -0.2),
        ("sapo", "tau_neg", 0.0),
        ("alpha_dpg", "alpha", 1.0),
        ("tpo", "eta", 0.0),
    ],
)
def test_bad_values_name_their_key(name, key, value):
    c = base.get_config()
    c.loss.name = name
    c.loss[name][key] = value
    with pytest.raises(ValueError, match=rf"config\.loss\.{name}\.{key}={value!r}"):
        build.plan(c)


def test_couples_rows_declarations():
    """Losses whose token weights depend on other rows (a softmax over the group, batch-wide
    covariance statistics) declare it; the micro-batch test checks that the declaration is
    needed (below) and sufficient (tests/test_micro_batches.py, every objective)."""
    coupled = {n for n in NEW if objectives.get(n).couples_rows}
    assert coupled == {"clip_cov", "kl_cov", "tpo"}


# ------------------------------------------------------------------------------ the train step


@pytest.mark.parametrize("name", [n if n == "clip_cov" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in NEW])  # fmt: skip
def test_each_objective_trains_one_debug_step(name, tmp_path):
    with jax.enable_x64(False):
        c = toy.get_config("debug")
        c.mesh.data, c.total_steps = 1, 1
        c.eval.num_prompts = 0  # the last step would evaluate: not what this test is about
        c.loss.name = name
        last = train.run(c, str(tmp_path))
    assert last["step"] == 1 and np.isfinite(last["loss/value"])
    assert np.isfinite(last["optim/grad_norm"]) and last["optim/skipped"] == 0


@pytest.mark.slow
def test_clip_cov_cut_is_micro_batch_invariant_only_when_declared_coupled():
    """With a band that takes every token the ratio clip leaves, the cut is the same for every
    micro-batch count (one key per update, batch-wide statistics). Declared per-token instead,
    each micro-batch would see the other rows' log-probs replaced by π_old (ratio 1, never
    clipped, so eligible) and cut other tokens."""
    with jax.enable_x64(False):
        block = dict(clip_cov.DEFAULTS, clip_cov_lb=-1e3, clip_cov_ub=1e3, clip_cov_ratio=0.3)
        block.update(clip_eps_low=0.2, clip_eps_high=0.2)
        batch = _batch(P, G)
        ref = _step("clip_cov", 1, P, G, batch, clip_cov=block)
        assert ref[0]["loss/clip_frac"] > 0.2
        _assert_same(ref, _step("clip_cov", P * G // 2, P, G, batch, clip_cov=block))
        per_token = dataclasses.replace(clip_cov.OBJECTIVE, couples_rows=False)
        objectives.OBJECTIVES["clip_cov"] = per_token
        try:
            wrong = _step("clip_cov", P * G // 2, P, G, batch, clip_cov=block)
        finally:
            objectives.OBJECTIVES["clip_cov"] = clip_cov.OBJECTIVE
        with pytest.raises(AssertionError):
            _assert_same(ref, wrong)
