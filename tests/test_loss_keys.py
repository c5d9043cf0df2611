"""Every loss key takes effect: for every registered objective and every key of its block
`config.loss.<name>.*`, perturbing the key (through the real path: config -> `build.plan` ->
`build.step_spec` -> the update's loss function) on a fixed random batch changes the loss, its
gradient w.r.t. the token log-probs or entropies, a metric or the carried state, unless the
objective declares the key inert under those settings (`Objective.inert`, with the reason), and a
key declared inert does change nothing. A new objective is covered without editing this file.
The shared keys (`loss.rollout_correction*`, `loss.entropy_*`) are covered by a table that must
name every `loss.*` key outside the objectives' blocks.

Values compare in float64 (the loss path keeps float64 log-probs): a no-op key reproduces the
same program, so "changed" means a change far above rounding (1e-7 of the scale).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from apo_jax import objectives
from apo_jax.trainer import build
from apo_jax.trainer import step as step_lib
from configs import base

P, G, T = 3, 4, 6


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _batch(seed=0):
    """Group 0 on-policy (APO's on-policy fix fires there), groups 1-2 far off-policy (clips of
    every width, and the dual clip, bind somewhere), ragged lengths, continuous rewards and one
    binary group, a sampler that differs; a token of group 2's worst row in Clip-Cov's
    covariance band (1, 5) beyond 2.5, unclipped; a correct row the reference model makes far
    likelier (α-DPG's pseudo-reward reaches its clip of 10)."""
    r = np.random.default_rng(seed)
    b = P * G
    lengths = r.integers(1, T + 1, size=b)
    lengths[0] = T
    mask = (np.arange(T) < lengths[:, None]).astype(np.float64)
    old = -r.uniform(0.5, 3.0, size=(b, T))
    # Per-sequence log-ratio offsets; both signs of the advantage meet both ends of the ratio.
    offsets = np.asarray([0.0] * G + [-7.0, 5.0, -1.0, 3.0, -3.0, 5.0, 1.0, -5.0])
    logp = old + offsets[:, None] + 0.5 * r.normal(size=(b, T)) * (offsets[:, None] != 0)
    rewards = r.uniform(size=b)
    rewards[G : 2 * G] = [1.0, 0.0, 0.0, 1.0]  # a binary group
    ref = old + 0.3 * r.normal(size=(b, T))
    ref[G, 0] += 5.0
    batch = dict(
        completion_mask=mask,
        old_logp=old,
        ref_logp=ref,
        sampler_logp=old + 0.3 * r.normal(size=(b, T)),
        rewards=rewards,
        correct=(rewards > 0.5).astype(np.float64),
    )
    entropy = r.uniform(0.0, 0.5, size=(b, T))
    return logp, entropy, batch


# numpy float64: turned into JAX arrays inside the tests, where float64 is enabled.
LOGP, ENTROPY, BATCH = _batch()


def device(tree):
    return jax.tree.map(jnp.asarray, tree)


def _config(name: str, **loss_over):
    c = base.get_config("debug")
    c.rollout.group_size, c.rollout.prompts_per_step = G, P
    c.optim.mini_batches = c.optim.micro_batches = 1
    c.loss.name = name
    for key, value in loss_over.items():
        node, leaf = c.loss, key
        if "." in key:
            block, leaf = key.split(".")
            node = c.loss[block]
        node[leaf] = value
    return c


def _evaluate(c):
    """Loss, gradients w.r.t. (logp, entropy), metrics and carried states of one update."""
    spec = build.step_spec(build.plan(c), 1000)
    fn = step_lib.make_update_loss(spec)
    states = (
        step_lib.schedule_lib.init_schedule_state(spec.schedule),
        step_lib.entropy_lib.init_entropy_state(spec.entropy),
    )
    # One fixed key for every setting: objectives that draw tokens (clip_cov) draw the same ones.
    (loss_sum, (denom, new_states, metrics)), grads = jax.value_and_grad(
        fn, argnums=(0, 1), has_aux=True
    )(*device((LOGP, ENTROPY, BATCH)), states, jax.random.key(0))
    assert loss_sum.dtype == jnp.float64
    out = {"loss": loss_sum / jnp.maximum(denom, 1e-8), "grad_logp": grads[0]}
    out["grad_entropy"] = grads[1]
    out.update({f"metric:{k}": v for k, v in metrics.items()})
    for i, leaf in enumerate(jax.tree.leaves(new_states)):
        out[f"state:{i}"] = leaf
    return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _difference(a: dict, b: dict) -> list[str]:
    """The outputs that differ by more than rounding (keys present in only one count)."""
    changed = sorted(a.keys() ^ b.keys())
    for k in a.keys() & b.keys():
        scale = max(np.abs(a[k]).max(initial=0.0), np.abs(b[k]).max(initial=0.0))
        if np.abs(a[k] - b[k]).max(initial=0.0) > 1e-7 * scale + 1e-12:
            changed.append(k)
    return changed


def _valid(c) -> bool:
    try:
        build.plan(c)
    except ValueError:
        return False
    return True


def _choices(obj, params, key):
    """Other valid values of a string key, read from its check's error ("valid: a, b, c")."""
    try:
        obj.check({**params, key: "__not_a_value__"})
    except ValueError as e:
        found = re.search(r"valid: (.*)$", str(e))
        assert found, f"loss.{obj.name}.{key}: its error does not list the valid values: {e}"
        return [v.strip() for v in found.group(1).split(",")]
    raise AssertionError(f"loss.{obj.name}.{key}: any string is accepted (must be checked)")


def _perturbations(name, params, key, every=False):
    """Valid other values of `key`: all of them for strings; else the first valid candidate (with
    `every`, all valid candidates in order)."""
    obj, v = objectives.get(name), params[key]
    if isinstance(v, bool):
        cands = [not v]
    elif isinstance(v, str):
        return [x for x in _choices(obj, params, key) if x != v]
    elif isinstance(v, int):
        cands = [2 * v, v + 1, v - 1, 1]
    else:
        cands = [2 * v, v / 2, v + 1.0, v + 3.0, 0.5, 0.1, 1e-3]
    out = []
    for x in dict.fromkeys(cands):
        if x != v and _valid(_config(name, **{f"{name}.{k}": y for k, y in params.items()}
                                     | {f"{name}.{key}": x})):  # fmt: skip
            out.append(x)
            if not every:
                break
    return out


def _run(name, params):
    return _evaluate(_config(name, **{f"{name}.{k}": v for k, v in params.items()}))


@pytest.mark.parametrize("name", objectives.names())
def test_every_key_of_every_objective_changes_the_update(name):
    obj = objectives.get(name)
    defaults = dict(obj.defaults)
    # Settings to try a key under: the defaults, then each single other key perturbed.
    bases = [defaults] + [
        {**defaults, other: x} for other in defaults for x in _perturbations(name, defaults, other)
    ]
    cache = {}

    def run(params):
        key = tuple(sorted(params.items()))
        if key not in cache:
            cache[key] = _run(name, params)
        return cache[key]

    for key in defaults:
        # A key inert at its default value (a lower clip of 1 is none) is tried from its others.
        own = [{**defaults, key: x} for x in _perturbations(name, defaults, key, every=True)]
        where = next((b for b in bases + own if key not in obj.inert(b)), None)
        assert where is not None, (
            f"loss.{name}.{key} is declared inert under the defaults, under every setting "
            "one other key away and at every other value of its own: nothing could show it working"
        )
        alternatives = _perturbations(name, where, key, every=True)
        assert alternatives, f"loss.{name}.{key}: no valid other value to try"
        # A string: each other value must change the update. A number: some valid other value
        # (a fraction of the tokens moves a count only in steps of 1/N on this small batch).
        tries = [[x] for x in alternatives] if isinstance(where[key], str) else [alternatives]
        for xs in tries:
            changed = any(_difference(run(where), run({**where, key: x})) for x in xs)
            assert changed, (
                f"loss.{name}.{key}: {where[key]!r} -> any of {xs!r} changes neither the loss, "
                f"its gradient, a metric nor the state (settings: {where}). If that is right "
                "under these settings, declare it in the objective's `inert` with the reason."
            )


@pytest.mark.parametrize("name", objectives.names())
def test_keys_declared_inert_change_nothing(name):
    obj = objectives.get(name)
    defaults = dict(obj.defaults)
    inert = obj.inert(defaults)
    assert all(k in defaults and why for k, why in inert.items()), inert
    ref = _run(name, defaults) if inert else None
    for key in inert:
        # Every other value under which the key stays inert (a lower clip of 1 or 2 is none).
        for x in _perturbations(name, defaults, key, every=True):
            if key not in obj.inert({**defaults, key: x}):
                continue
            assert not _difference(ref, _run(name, {**defaults, key: x})), (name, key, x)


# Shared loss keys: (settings, key, perturbed value). Settings are chosen where the key acts:
# the cap needs a correction on; the adaptive entropy keys need the adaptive mode and, for the
# clips, a coefficient at the clip (entropy 0.25 on this batch: below a target of 1, above 0.1).
SHARED = [
    ({}, "rollout_correction", "tis_token"),
    ({}, "rollout_correction", "tis_sequence"),
    ({}, "rollout_correction", "mis_sequence"),
    ({}, "rollout_correction", "reject_sequence"),
    ({"rollout_correction": "tis_token"}, "rollout_correction_cap", 1.5),
    ({"rollout_correction": "mis_sequence"}, "rollout_correction_cap", 3.0),
    ({}, "entropy_coef", 0.01),
    ({}, "entropy_target", 1.0),
    ({"entropy_target": 1.0}, "entropy_coef_delta", 2e-4),
    ({"entropy_target": 1.0, "entropy_coef": 5e-3}, "entropy_coef_max", 1e-2),
    ({"entropy_target": 0.1}, "entropy_coef_min", 1e-3),
]


# Declared in apo_jax/settings.py ahead of the code that reads them (issue 25): whoever wires one
# moves it into SHARED, where it must change the update.
NOT_YET_WIRED = {"anchor"}


def test_the_shared_table_names_every_shared_key():
    loss = base.get_config().loss
    shared = {k for k in loss if k != "name" and k not in objectives.names()}
    assert shared - NOT_YET_WIRED == {key for _, key, _ in SHARED}


@pytest.mark.parametrize("name", ["apo", "grpo"])
@pytest.mark.parametrize("settings,key,value", SHARED, ids=[f"{k}={v}" for _, k, v in SHARED])
def test_every_shared_key_changes_the_update(name, settings, key, value):
    before = _evaluate(_config(name, **settings))
    after = _evaluate(_config(name, **{**settings, key: value}))
    assert _difference(before, after), (name, settings, key, value)
