"""The config and its build boundary: every key is read, each loss and task is a plug-in with its
own canonical defaults, and a loss registered from this file alone trains."""

import copy
import glob
import importlib.util
import inspect
import json
import pathlib

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from apo_jax import objectives, settings, tasks
from apo_jax.infra import checkpoint as checkpoint_lib
from apo_jax.objectives import apo, dapo, dr_grpo, fdiv, grpo, gspo
from apo_jax.objectives import schedule as schedule_lib
from apo_jax.objectives.common import LossOutput, masked_mean, sequence_logp
from apo_jax.trainer import build
from apo_jax.trainer import loop as train
from configs import base, toy

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(
    f
    for f in glob.glob(str(ROOT / "configs" / "*.py"))
    + glob.glob(str(ROOT / "experiments" / "*.py"))
    if not f.endswith("__init__.py")
)


class _Recorder:
    """A read-only view of a ConfigDict that records the path of every leaf read."""

    def __init__(self, cd, log, prefix=""):
        self._cd, self._log, self._prefix = cd, log, prefix

    def _get(self, name):
        value = self._cd[name]
        path = self._prefix + name
        if isinstance(value, ml_collections.ConfigDict):
            return _Recorder(value, self._log, path + ".")
        self._log.add(path)
        return value

    __getitem__ = _get

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return self._get(name)

    def keys(self):
        return self._cd.keys()

    def __iter__(self):
        return iter(self._cd.keys())

    def to_dict(self):  # the plain record: not a read of any key
        return self._cd.to_dict()


def _load(path):
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_key_is_read_by_the_build():
    """The union over config files, losses and tasks of the keys `build.plan` reads covers every
    key (a key nothing reads fails); plan is the only reader of the config."""
    read: set[str] = set()
    for path in CONFIG_FILES:
        c = _load(path).get_config(None)
        build.plan(_Recorder(c, read))
    for name in objectives.names():
        c = base.get_config()
        c.loss.name = name
        build.plan(_Recorder(c, read))
    for name in tasks.names():
        c = base.get_config()
        c.task.name = name
        build.plan(_Recorder(c, read))
    keys = checkpoint_lib.flatten_config(base.get_config().to_dict())
    unread = sorted(set(keys) - read)
    assert not unread, f"config keys nothing reads: {unread}"


@pytest.mark.parametrize(
    "module", [apo, fdiv, grpo, gspo, dapo, dr_grpo], ids=lambda m: m.OBJECTIVE.name
)
def test_loss_signature_defaults_cannot_disagree_with_the_config(module):
    obj = module.OBJECTIVE
    fn = {"apo": apo.apo_loss, "fdiv": fdiv.f_divergence_loss, "grpo": grpo.grpo_loss}.get(
        obj.name, getattr(module, f"{obj.name}_loss", None)
    )
    params = inspect.signature(fn).parameters
    block = base.get_config().loss[obj.name].to_dict()
    assert block == dict(obj.defaults)
    for key, value in block.items():
        if key in params and params[key].default is not inspect.Parameter.empty:
            assert params[key].default == value, (obj.name, key)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("gspo", dict(clip_eps_low=3e-4, clip_eps_high=4e-4)),  # GSPO paper §5.1
        ("dapo", dict(clip_eps_low=0.2, clip_eps_high=0.28)),  # clip-higher
        ("grpo", dict(clip_eps_low=0.2, clip_eps_high=0.2, kl_coef=0.0)),
        ("dr_grpo", dict(clip_eps=0.2)),
        ("apo", dict(beta_r=0.3, clip_log_ratio=5.0, clip_score=10.0, logit_reg_coef=0.0)),
    ],
)
def test_each_loss_runs_with_its_canonical_defaults_when_chosen_by_name(name, expected):
    c = base.get_config()
    c.loss.name = name
    p = build.plan(c)
    assert p.objective.name == name
    for key, value in expected.items():
        assert p.loss_params[key] == value, key


def test_every_task_builds_from_its_block():
    for name in ("toy", "toy_sorted"):
        c = toy.get_config()
        c.task.name = name
        c.task[name].prompt_len = 4
        task = build.task(build.plan(c))
        assert all(len(e.prompt_ids) == 5 for e in task.train_examples()[:8])  # 4 values + "="


@pytest.fixture
def reinforce_loss():
    """A sequence-level REINFORCE loss with a leave-one-out baseline, defined only here."""

    def loss(logp, b, ctx, *, baseline_weight):
        r = b["rewards"]  # [P, G]
        g = r.shape[-1]
        loo = (r.sum(-1, keepdims=True) - r) / (g - 1)  # leave-one-out mean
        adv = r - baseline_weight * loo
        ell = sequence_logp(logp, b["completion_mask"])  # [P, G]
        per_seq = -adv * ell
        valid = (b["completion_mask"].sum(-1) > 0).astype(jnp.float32)
        return LossOutput(
            (per_seq * valid).sum(), valid.sum(), {"adv_mean": masked_mean(adv, valid)}
        )

    obj = objectives.Objective(name="test_reinforce", loss=loss, defaults=dict(baseline_weight=1.0))
    objectives.OBJECTIVES[obj.name] = obj  # the one line a new loss adds
    yield obj
    objectives.OBJECTIVES.pop(obj.name)


def test_a_loss_registered_from_a_test_file_trains(reinforce_loss, tmp_path):
    c = toy.get_config("debug")  # built after registration: has config.loss.test_reinforce
    c.mesh.data, c.total_steps = 1, 1
    c.loss.name = "test_reinforce"
    c.loss.test_reinforce.baseline_weight = 0.5
    last = train.run(c, str(tmp_path))
    assert last["step"] == 1 and np.isfinite(last["loss/value"])
    assert "loss/adv_mean" in last and "schedule/alpha" not in last


# --- one schema: apo_jax/settings.py declares every core key once ------------------------------

NEW_KEYS = ("rollout.engine", "rollout.slots", "optim.packing", "optim.pack_len", "loss.anchor")


def test_every_core_key_is_declared_once_with_a_meaning():
    """configs/base.py's keys are the schema's plus the plug-ins' blocks (loss.name, loss.<obj>.*,
    task.*), each declared key has a doc, and its default passes its own checks."""
    flat = checkpoint_lib.flatten_config(base.get_config().to_dict())
    plugins = ("task.", "loss.name", *(f"loss.{n}." for n in objectives.names()))
    assert {k for k in flat if not k.startswith(plugins)} == set(settings.defaults())
    for path, cls in settings.BLOCKS.items():
        for f in settings.keys(cls):
            assert f.metadata["key"].doc, f"{path}.{f.name}"
        cls()  # defaults pass the block's checks


def test_a_record_written_before_a_key_existed_resumes_and_evaluates():
    """A run saved before the newer keys existed: its record lacks them, which means their
    defaults. Resuming it compares equal (checkpoint.check_resume) unless the current config
    sets another value; its record builds a plan (evaluation, export)."""
    current = build.plan(toy.get_config("debug")).record
    old = copy.deepcopy(current)
    for k in NEW_KEYS:
        block, name = k.split(".")
        del old[block][name]
    checkpoint_lib.check_resume(1, old, current, "W")
    changed = copy.deepcopy(current)
    changed["rollout"]["engine"] = "static"
    with pytest.raises(ValueError, match=r"rollout\.engine: 'continuous' -> 'static'"):
        checkpoint_lib.check_resume(1, old, changed, "W")
    p = build.plan(ml_collections.ConfigDict(old))
    # (a run recorded before rollout.engine existed decoded statically: the engines' samples are
    # the same, so it resumes under today's default)
    assert (p.rollout.engine, p.rollout.slots, p.loss.anchor) == ("continuous", 0, "recompute")
    # The evaluation CLI reads the record with the keys filled in, so it can override them.
    assert settings.with_defaults(old) == current and "engine" not in old["rollout"]
    assert (p.optim.packing, p.optim.pack_len) == ("none", 0)


def test_new_keys_are_set_from_the_command_line_and_checked():
    from apo_jax import sweep

    flags = ["--config.rollout.engine=continuous", "--config.rollout.slots=8"]
    flags += ["--config.optim.packing=packed", "--config.optim.pack_len=128"]
    # loss.anchor=sampler needs sampler and trainer computing alike (trainer/validate.py)
    flags += ["--config.model.logprob_precision=float32", "--config.rollout.cache_dtype=float32"]
    p = build.plan(
        sweep.load_config("configs/toy.py:debug", [*flags, "--config.loss.anchor=sampler"])
    )
    assert (p.rollout.engine, p.rollout.slots, p.optim.packing, p.optim.pack_len) == (
        "continuous",
        8,
        "packed",
        128,
    )
    assert p.loss.anchor == "sampler"
    for key, bad, match in [
        ("rollout.engine", "paged", r"valid: static, continuous"),
        ("rollout.slots", -1, r"must lie in \[0, inf\)"),
        ("optim.packing", "dense", r"valid: none, packed"),
        ("optim.pack_len", 1.5, r"must be a int"),
        ("loss.anchor", "old", r"valid: recompute, sampler"),
    ]:
        c = toy.get_config("debug")
        block, name = key.split(".")
        with c.ignore_type():
            c[block][name] = bad
        with pytest.raises(ValueError, match=rf"^config\.{key}={bad!r}: {match}"):
            build.plan(c)


def test_schedule_config_built_directly_is_checked_naming_the_key():
    with pytest.raises(ValueError, match=r"^config\.schedule\.mode='cosine': valid: legacy"):
        schedule_lib.ScheduleConfig(mode="cosine")
    with pytest.raises(ValueError, match=r"^config\.schedule\.alpha_min=0\.95: must be <="):
        schedule_lib.ScheduleConfig(alpha_min=0.95)


def test_a_sweep_accepts_a_finished_run_recorded_before_a_key_existed(tmp_path):
    """sweep.check_existing compares a finished run's config.json with what the sweep asks:
    keys the old record lacks are their defaults, so the run counts as done; a non-default
    value of such a key is another run."""
    from apo_jax import sweep

    record = json.loads(build.plan(toy.get_config("debug")).to_json())
    old = copy.deepcopy(record)
    for k in NEW_KEYS:
        block, name = k.split(".")
        del old[block][name]
    (tmp_path / "config.json").write_text(json.dumps(old))
    (tmp_path / sweep.DONE_MARKER).write_text("{}")
    run = lambda rec: sweep.Run("arm", 0, (), str(tmp_path), rec["total_steps"], "", rec)
    sweep.check_existing(run(record))
    record["optim"]["packing"] = "packed"
    with pytest.raises(sweep.SweepError, match=r"optim\.packing='none', now 'packed'"):
        sweep.check_existing(run(record))
