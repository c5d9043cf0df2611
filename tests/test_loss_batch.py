"""The batch a loss sees (objectives/batch.py `LossBatch`) and what the rollout correction weights:
a field an objective reads reaches it or the build fails naming the field; the correction scales
the policy-gradient term only (GRPO's KL to the reference is not reweighted, as in verl)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_loss_keys import BATCH, ENTROPY, LOGP, _config, device

from apo_jax.models import qwen3 as model_lib
from apo_jax.objectives import batch as batch_lib
from apo_jax.objectives import common, registry
from apo_jax.trainer import build, records
from apo_jax.trainer import rollout_correction as rc
from apo_jax.trainer import step as step_lib


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _grads(c, objective=None):
    spec = build.step_spec(build.plan(c), 1000)
    if objective is not None:
        spec = dataclasses.replace(spec, objective=objective)
    fn = step_lib.make_update_loss(spec)
    states = (
        step_lib.schedule_lib.init_schedule_state(spec.schedule),
        step_lib.entropy_lib.init_entropy_state(spec.entropy),
    )
    (loss_sum, (denom, _, metrics)), g = jax.value_and_grad(fn, argnums=0, has_aux=True)(
        *device((LOGP, ENTROPY, BATCH)), states
    )
    return float(loss_sum / denom), np.asarray(g) / float(denom), metrics


@pytest.mark.parametrize("mode", ["tis_token", "tis_sequence", "mis_sequence"])
def test_correction_weights_grpos_policy_term_not_its_kl(mode):
    """∇ = w·∇(surrogate) + β·∇(KL): the surrogate's gradient with the correction (β = 0), plus
    the KL's gradient without it (β > 0 minus β = 0, both uncorrected), on the corrected mask."""
    beta = 0.5
    on = dict(rollout_correction=mode, rollout_correction_cap=3.0)
    _, g, _ = _grads(_config("grpo", **on, **{"grpo.kl_coef": beta}))
    _, g_pg, _ = _grads(_config("grpo", **on))
    # The KL's gradient on the same (possibly rejected) rows: the uncorrected loss on the mask
    # the correction leaves (its weights are 1 there with the identity sampler).
    w, mask, _ = rc.correction(
        *device((BATCH["old_logp"], BATCH["sampler_logp"], BATCH["completion_mask"])), mode, 3.0
    )
    assert w is not None and float(jnp.abs(w * mask - mask).max()) > 0.1  # weights bind
    same = dict(BATCH, completion_mask=mask)
    spec_batch = {k: v for k, v in same.items() if k != "sampler_logp"}

    def uncorrected(beta_):
        spec = build.step_spec(build.plan(_config("grpo", **{"grpo.kl_coef": beta_})), 1000)
        fn = step_lib.make_update_loss(spec)
        states = (
            step_lib.schedule_lib.init_schedule_state(spec.schedule),
            step_lib.entropy_lib.init_entropy_state(spec.entropy),
        )
        (_, (denom, _, _)), gr = jax.value_and_grad(fn, has_aux=True)(
            *device((LOGP, ENTROPY, spec_batch)), states
        )
        return np.asarray(gr) / float(denom)

    g_kl = uncorrected(beta) - uncorrected(0.0)
    np.testing.assert_allclose(g, g_pg + g_kl, rtol=1e-9, atol=1e-12)
    # ... which is not the old behaviour (the weights on the whole loss, KL included).
    assert np.abs(g - (g_pg + np.asarray(w) * g_kl)).max() > 1e-4


def test_correction_weights_every_log_prob_of_an_objective_without_kl():
    """APO has no KL term: its corrected gradient is the uncorrected one times w, and the value
    and metrics are unchanged (tis_token keeps every row)."""
    loss0, g0, m0 = _grads(_config("apo"))
    loss1, g1, m1 = _grads(_config("apo", rollout_correction="tis_token"))
    w, _, _ = rc.correction(
        *device((BATCH["old_logp"], BATCH["sampler_logp"], BATCH["completion_mask"])),
        "tis_token",
        2.0,
    )
    assert loss1 == loss0
    np.testing.assert_allclose(g1, np.asarray(w) * g0, rtol=1e-12, atol=1e-15)


def _reader(seen):
    """An objective that reads LossBatch.correct: loss = Σ correct·ℓ over the group."""

    def loss(logp, b, ctx, **params):
        seen.append(b.correct)
        ell = common.sequence_logp(logp, b.completion_mask)  # [P, G]
        return common.LossOutput(-(b["correct"] * ell).sum(), jnp.asarray(1.0), {})

    return registry.Objective(
        name="reads_correct", loss=loss, defaults={}, reads=("completion_mask", "correct")
    )


def test_a_field_the_loss_reads_reaches_it():
    seen = []
    _grads(_config("grpo"), objective=_reader(seen))
    want = np.asarray(BATCH["correct"]).reshape(-1, 4)
    np.testing.assert_array_equal(np.asarray(seen[-1]), want)


def test_a_field_the_loss_reads_but_is_not_sent_fails_the_build_naming_it():
    # The train step checks at trace time, before the model is traced or anything compiled.
    cfg = model_lib.Qwen3Config.tiny()
    graphdef, params = nnx.split(model_lib.init_model(cfg, seed=0), nnx.Param)
    spec = build.step_spec(build.plan(_config("grpo")), cfg.vocab_size)
    spec = dataclasses.replace(spec, objective=_reader([]), group_size=4)
    tx = optax.sgd(1.0)
    state = step_lib.init_train_state(params, tx, 0, spec.schedule)
    fns = step_lib.build(graphdef, spec, tx)
    batch = {k: jnp.asarray(v, jnp.float32) for k, v in BATCH.items() if k != "correct"}
    batch.update(
        prompt_ids=jnp.zeros((12, 3), jnp.int32),
        prompt_mask=jnp.ones((12, 3), jnp.int32),
        completion_ids=jnp.zeros((12, 6), jnp.int32),
    )
    with pytest.raises(ValueError, match=r"LossBatch\.correct, which the train step's batch"):
        fns.train_step(state, records.Batch(**batch))
    # The loop sends it, and an undeclared field the batch lacks is an error naming it too.
    assert "correct" in records.DEVICE_FIELDS
    lb = batch_lib.LossBatch(completion_mask=LOGP, old_logp=LOGP, rewards=BATCH["rewards"])
    with pytest.raises(KeyError, match=r"LossBatch\.correct was not sent"):
        lb["correct"]


def test_an_objective_cannot_declare_a_field_that_does_not_exist():
    with pytest.raises(ValueError, match="not LossBatch fields"):
        dataclasses.replace(_reader([]), reads=("answers",))
