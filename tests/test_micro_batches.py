"""Micro-batches of any rows give the whole-batch gradient and metrics for every objective (also on
a (2, 2, 2) mesh), a row's log-probs do not depend on its batch, and the sampler/trainer mismatch
correction (truncated / masked IS) against a numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from apo_jax import objectives
from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import qwen3 as model_lib
from apo_jax.objectives import common
from apo_jax.trainer import build, records
from apo_jax.trainer import rollout_correction as rc
from apo_jax.trainer import step as ts
from configs import base

CFG = model_lib.Qwen3Config.tiny()
EPS32 = float(np.finfo(np.float32).eps)


def _config(loss, micro, p, g, **over):
    c = base.get_config("debug")
    c.rollout.group_size, c.rollout.prompts_per_step = g, p
    c.optim.micro_batches, c.optim.mini_batches = micro, 1
    c.optim.grad_clip = 0.0
    c.loss.name = loss
    for k, v in over.items():
        c.loss[k] = v
    return c


def _batch(p, g, seed=0, tp=5, tc=6):
    rng = np.random.RandomState(seed)
    b = p * g
    cmask = np.ones((b, tc), np.float32)
    cmask[1, 3:] = 0  # a short completion
    cmask[b - 1, 2:] = 0
    pmask = np.ones((b, tp), np.int32)
    pmask[2, :2] = 0  # a left-padded prompt
    old = -4.0 + 0.3 * rng.randn(b, tc)
    batch = dict(
        prompt_ids=rng.randint(0, CFG.vocab_size, (b, tp)).astype(np.int32),
        prompt_mask=pmask,
        completion_ids=rng.randint(0, CFG.vocab_size, (b, tc)).astype(np.int32),
        completion_mask=cmask,
        rewards=rng.randint(0, 2, (b,)).astype(np.float32),
        old_logp=old.astype(np.float32),
        ref_logp=(old + 0.1 * rng.randn(b, tc)).astype(np.float32),
        sampler_logp=(old + 0.2 * rng.randn(b, tc)).astype(np.float32),
    )
    batch["correct"] = batch["rewards"].copy()  # binary rewards: the verified answers (α-DPG)
    return batch


def _step(loss, micro, p, g, batch, mesh=None, **over):
    """One SGD(lr = 1) update: the parameter change is minus the gradient itself."""
    c = _config(loss, micro, p, g, **over)
    graphdef, params = nnx.split(model_lib.init_model(CFG, seed=0), nnx.Param)
    tx = optax.sgd(1.0)
    spec = build.step_spec(build.plan(c), CFG.vocab_size)
    state = ts.init_train_state(params, tx, 0, spec.schedule)
    if mesh is None:
        fns = ts.build(graphdef, spec, tx)
        batch = {k: jnp.asarray(v) for k, v in batch.items()}
    else:
        shardings = sharding_lib.tree_shardings(state, mesh)
        state = jax.device_put(state, shardings)
        fns = ts.build(graphdef, spec, tx, mesh, shardings)
        batch = jax.device_put(batch, sharding_lib.batch_sharding(mesh))
    old = jax.tree.map(np.asarray, jax.device_get(state.params))
    new, metrics = fns.train_step(state, records.Batch(**batch))
    grads = jax.tree.map(lambda a, b: a - np.asarray(b), old, jax.device_get(new.params))
    # (the gradient as old - new carries rounding of ~eps·|param| per entry)
    return jax.device_get(metrics), (grads, old)


def _assert_same(ref, got):
    (m1, g1), (m2, g2) = ref, got
    assert m1.keys() == m2.keys()
    for k in m1:
        # Metrics are means of O(1) terms over <= 48 tokens: rounding is a few eps of the scale.
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, atol=64 * EPS32, err_msg=k)
    _assert_grads_close(g1, g2)


def _assert_grads_close(want, got):
    (g1, params), (g2, _) = want, got
    leaves = zip(jax.tree.leaves(g1), jax.tree.leaves(g2), jax.tree.leaves(params), strict=True)
    for a, b, w in leaves:
        # Gradients are sums over <= 48 tokens reordered across micro-batches: error <= ~n·eps
        # relative to the leaf's scale; reading them as old - new adds 2 eps·|param| per entry.
        tol = 1e-5 * float(np.abs(a).max()) + 2 * EPS32 * np.abs(w) + 1e-12
        assert np.all(np.abs(b - a) <= tol), float(np.max(np.abs(b - a) - tol))


P, G = 2, 3  # rows = 6: micro-batches of 6, 3 (splits groups), 2 and 1 rows


# apo (row-coupled, cotangent path) and grpo (per-token path) run by default; the CPU compiles of
# the other objectives' four programs are slow.
_FAST = ("apo", "grpo")


@pytest.mark.parametrize(
    "loss",
    [n if n in _FAST else pytest.param(n, marks=pytest.mark.slow) for n in objectives.names()],
)
def test_every_objective_is_micro_batch_invariant(loss):
    batch = _batch(P, G)
    ref = _step(loss, 1, P, G, batch)
    for micro in (2, P * G // 2, P * G):
        _assert_same(ref, _step(loss, micro, P, G, batch))


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["apo", "grpo"])
def test_micro_batches_on_a_2x2x2_mesh(loss):
    if jax.device_count() < 8:
        pytest.skip("needs 8 fake devices")
    p, g = 4, 2  # rows = 8; data * fsdp = 4 must divide each micro-batch
    batch = _batch(p, g, seed=1)
    ref = _step(loss, 1, p, g, batch)
    mesh = sharding_lib.make_mesh(2, 2, 2)
    for micro in (1, 2):
        _assert_same(ref, _step(loss, micro, p, g, batch, mesh=mesh))
    with pytest.raises(ValueError, match=r"config.optim.micro_batches=4: .*data-parallel"):
        _step(loss, 4, p, g, batch, mesh=mesh)


def test_rollout_correction_under_micro_batches():
    batch = _batch(P, G)
    for mode in ("tis_token", "mis_sequence", "reject_sequence"):
        over = dict(rollout_correction=mode, rollout_correction_cap=1.5)
        ref = _step("apo", 1, P, G, batch, **over)
        _assert_same(ref, _step("apo", P * G, P, G, batch, **over))


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("optim.micro_batches", 4, r"config.optim.micro_batches=4: must divide the 6 rows"),
        ("loss.rollout_correction", "tis", r"config.loss.rollout_correction='tis'"),
        ("loss.rollout_correction_cap", 1.0, r"config.loss.rollout_correction_cap=1.0"),
        ("model.logprob_precision", "float64", r"config.model.logprob_precision='float64'"),
    ],
)
def test_bad_values_name_their_key(key, value, match):
    c = _config("apo", 1, P, G)
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(ValueError, match=match):
        build.plan(c)


# --- batch invariance of log-probs ---------------------------------------------------------------


def _row_alone_vs_in_batch(dtype, precision):
    """Max |Δ| over completion tokens between 8 rows scored alone (unpadded, their own lengths)
    and the same rows inside one left/right-padded batch of 8 rows of other lengths."""
    model = model_lib.init_model(CFG, seed=0, dtype=dtype)
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.RandomState(0)
    tp_max, tc_max = 9, 7
    lp = rng.randint(1, tp_max + 1, 8)
    lc = rng.randint(1, tc_max + 1, 8)
    lp[0], lc[0] = tp_max, tc_max
    score = jax.jit(
        lambda prm, b: ts.completion_logprobs(graphdef, prm, b, chunk=48, precision=precision)
    )
    b = dict(
        prompt_ids=np.zeros((8, tp_max), np.int32),
        prompt_mask=np.zeros((8, tp_max), np.int32),
        completion_ids=np.zeros((8, tc_max), np.int32),
        completion_mask=np.zeros((8, tc_max), np.float32),
    )
    rows = []
    for i in range(8):
        pr = rng.randint(0, CFG.vocab_size, lp[i]).astype(np.int32)
        co = rng.randint(0, CFG.vocab_size, lc[i]).astype(np.int32)
        b["prompt_ids"][i, tp_max - lp[i] :], b["prompt_mask"][i, tp_max - lp[i] :] = pr, 1
        b["completion_ids"][i, : lc[i]], b["completion_mask"][i, : lc[i]] = co, 1
        rows.append((pr, co))
    together = np.asarray(score(params, b))
    worst = 0.0
    for i, (pr, co) in enumerate(rows):
        alone = dict(
            prompt_ids=pr[None],
            prompt_mask=np.ones((1, len(pr)), np.int32),
            completion_ids=co[None],
            completion_mask=np.ones((1, len(co)), np.float32),
        )
        one = np.asarray(score(params, alone))[0]
        worst = max(worst, float(np.abs(one - together[i, : lc[i]]).max()))
    return worst


def test_row_logprobs_do_not_depend_on_the_batch_float32():
    assert _row_alone_vs_in_batch(jnp.float32, "default") <= 1e-6


def test_bf16_compute_scored_in_float32_is_batch_invariant():
    # logprob_precision=float32 scores a bf16-compute model with float32 activations and the
    # highest matmul precision: measured max |Δ| here 0 to ~5e-7 (CPU), bound 1e-6. With bf16
    # activations the same rows differ by up to ~1e-2 (padding changes bf16 rounding).
    assert _row_alone_vs_in_batch(jnp.bfloat16, "float32") <= 1e-6


# --- rollout correction --------------------------------------------------------------------------


def _np_correction(old, samp, mask, mode, cap):
    """Plain numpy: token weights (ones where masked), the loss mask, masked fraction."""
    delta = (old.astype(np.float64) - samp) * mask
    seq = delta.sum(-1, keepdims=True)
    w = np.ones_like(delta)
    new_mask = mask.copy()
    frac = 0.0
    if mode == "tis_token":
        w = np.minimum(np.exp(delta), cap)
    elif mode == "tis_sequence":
        w = np.minimum(np.exp(seq), cap) * np.ones_like(delta)
    elif mode in ("mis_sequence", "reject_sequence"):
        keep = (np.exp(seq) >= 1.0 / cap) & (np.exp(seq) <= cap)
        new_mask = mask * keep
        # Seq-MIS weights the kept sequences by min(ρ, C); rejection alone leaves them at 1.
        rho = np.minimum(np.exp(seq), cap) if mode == "mis_sequence" else 1.0
        w = keep * rho * np.ones_like(delta)
        valid = mask.sum(-1) > 0
        frac = (~keep[:, 0] & valid).sum() / valid.sum()
    mean = (w * mask).sum() / mask.sum()
    return w, new_mask, mean, frac


@pytest.mark.parametrize("mode", ["tis_token", "tis_sequence", "mis_sequence", "reject_sequence"])
def test_correction_matches_numpy(mode):
    b = _batch(4, 2, seed=3)
    old, samp, mask = b["old_logp"], b["sampler_logp"], b["completion_mask"]
    cap = 1.3
    w, new_mask, metrics = rc.correction(old, samp, mask, mode, cap)
    w_np, mask_np, mean_np, frac_np = _np_correction(old, samp, mask, mode, cap)
    np.testing.assert_array_equal(np.asarray(new_mask), mask_np)
    if mode in ("mis_sequence", "reject_sequence"):
        assert 0 < frac_np < 1  # the data exercise both sides
    if mode == "reject_sequence":
        assert w is None
    else:
        np.testing.assert_allclose(np.asarray(w) * mask, w_np * mask, rtol=1e-5)
        kept = (w_np * mask)[new_mask > 0]
        assert kept.min() < 1 and (kept.max() == pytest.approx(cap) or mode == "mis_sequence")
    np.testing.assert_allclose(metrics["rollout/is_weight_mean"], mean_np, rtol=1e-5)
    np.testing.assert_allclose(metrics["rollout/masked_frac"], frac_np, rtol=1e-6)


@pytest.mark.parametrize("mode", rc.MODES[1:])
def test_identical_log_probs_make_every_mode_the_identity(mode):
    b = _batch(4, 2, seed=3)
    w, new_mask, metrics = rc.correction(
        b["old_logp"], b["old_logp"], b["completion_mask"], mode, 2
    )
    assert w is None or np.all(np.asarray(w) == 1.0)
    np.testing.assert_array_equal(np.asarray(new_mask), b["completion_mask"])
    assert float(metrics["rollout/is_weight_mean"]) == 1.0
    assert float(metrics["rollout/masked_frac"]) == 0.0


def test_identity_correction_leaves_the_update_unchanged():
    batch = _batch(P, G)
    batch["sampler_logp"] = batch["old_logp"]
    m0, g0 = _step("grpo", 1, P, G, batch)
    m1, g1 = _step("grpo", 1, P, G, batch, rollout_correction="tis_sequence")
    assert m1.pop("rollout/is_weight_mean") == 1.0 and m1.pop("rollout/masked_frac") == 0.0
    _assert_same((m0, g0), (m1, g1))


def test_scale_grad_is_identity_forward_and_scales_the_cotangent():
    x = jnp.asarray([1.0, -2.0, 3.0])
    w = jnp.asarray([0.5, 2.0, 0.0])
    c = jnp.asarray([3.0, 5.0, 7.0])
    np.testing.assert_array_equal(common.scale_grad(x, w), x)
    np.testing.assert_array_equal(jax.grad(lambda x: (common.scale_grad(x, w) * c).sum())(x), w * c)


@pytest.mark.slow
def test_tis_sequence_scales_each_rows_gradient():
    # GRPO's gradient is a sum of per-row terms: with a constant ratio per row, TIS-sequence's
    # gradient equals the gradient of the same loss with each row's token loss times w_i, i.e.
    # the gradient with the uncorrected update's per-row log-prob cotangents scaled by w_i.
    batch = _batch(P, G)
    shift = np.linspace(-0.3, 0.3, P * G).astype(np.float32)[:, None]
    n_tok = batch["completion_mask"].sum(-1, keepdims=True)
    batch["sampler_logp"] = batch["old_logp"] - shift / n_tok * batch["completion_mask"]
    cap = 1.2
    w = np.minimum(np.exp(shift), cap)[:, 0]  # [B]
    got = _step(
        "grpo", 1, P, G, batch, rollout_correction="tis_sequence", rollout_correction_cap=cap
    )
    # Reference: the sum of per-row gradients (one row's completion kept at a time) times w_i.
    parts = []
    for i in range(P * G):
        only = dict(
            batch, completion_mask=batch["completion_mask"] * (np.arange(P * G) == i)[:, None]
        )
        _, (gi, params) = _step("grpo", 1, P, G, only)
        # Keeping only row i changes GRPO's seq-mean denominator from #valid to 1.
        parts.append((gi, w[i] / (batch["completion_mask"].sum(-1) > 0).sum()))
    want = jax.tree.map(
        lambda *gs: sum(g * c for g, (_, c) in zip(gs, parts, strict=True)), *[g for g, _ in parts]
    )
    # Each part carries ~2 eps·|param| of rounding (read as old - new); the sum of six, 12.
    leaves = zip(
        jax.tree.leaves(want), jax.tree.leaves(got[1][0]), jax.tree.leaves(params), strict=True
    )
    for a, b, prm in leaves:
        tol = 1e-5 * float(np.abs(a).max()) + 14 * EPS32 * np.abs(prm) + 1e-12
        assert np.all(np.abs(b - a) <= tol), float(np.max(np.abs(b - a) - tol))
