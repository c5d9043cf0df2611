"""`--dry_run` (issue 16's contract): one JSON line, nothing written, `fits` from
--device_memory_gib, on fake CPU devices in a fresh process; every phase a run executes counted
(the evaluation too); the rollout weights it counts are the loop's; the GPU budget."""

import json
import os
import subprocess
import sys

import jax
import pytest

from apo_jax.rollout import sampler as sampler_lib
from apo_jax.trainer import build, dry_run
from configs import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("peak_gib", "state_gib", "rollout_gib", "train_step_gib", "eval_gib", "compile_s")


def test_dry_run_prints_one_json_line_and_says_when_it_does_not_fit(tmp_path):
    workdir = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    cmd = [
        sys.executable,
        "-m",
        "apo_jax.main",
        f"--config={ROOT}/configs/base.py:debug",
        f"--workdir={workdir}",
        "--dry_run",
        "--device_memory_gib=0.0001",  # 100 KiB: the tiny model's state alone is more
        "--config.task.name=toy",
        "--config.mesh.fsdp=2",
        "--config.model.remat=block",
        # The rollout samples 2 prompts x G 2 per call; the evaluation's greedy pass 8 prompts
        # per call and its sampled pass 4 prompts x 2: its KV cache is twice the rollout's.
        "--config.rollout.engine=static",  # its cache is rows_per_chunk rows
        "--config.rollout.rows_per_chunk=4",
        "--config.eval.num_prompts=8",
        "--config.eval.rows_per_chunk=8",
    ]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1, out.stdout
    report = json.loads(lines[0])
    assert all(k in report for k in KEYS), report
    assert report["fits"] is False
    assert report["devices"] == 4 and report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}
    assert report["rollout_rows"] == 4 and report["eval_rows"] == {"greedy": 8, "sampled": 8}
    # Rows split over the 4 devices: 2 per device in the evaluation's calls, 1 in the rollout's.
    assert report["eval_kv_cache_gib"] > 1.5 * report["kv_cache_gib"] > 0
    assert report["eval_gib"] > report["rollout_gib"] > 0
    calls = report["eval_calls_gib"]
    assert abs(report["eval_gib"] - report["rollout_weights_gib"] - max(calls.values())) <= 3e-6
    # The peak is the resident state plus the largest phase (each rounded to 1e-6 GiB).
    phases = ("rollout_gib", "train_step_gib", "scoring_gib", "eval_gib")
    phases = max(report[k] for k in phases)
    assert abs(report["peak_gib"] - (report["state_gib"] + phases)) <= 3e-6
    assert report["peak_gib"] > 0.0001 and report["state_gib"] > 0
    assert not workdir.exists()  # nothing written: no workdir, no checkpoint, no metrics


def test_dry_run_counts_the_loops_own_rollout_weights():
    """`sampler.rollout_weights` on the abstract state (what --dry_run compiles with) is the
    concrete call's result in shapes: same dtypes (float32 parameters cast to the bfloat16
    compute dtype where gathered), same shardings, and the same parameters shared with the
    train state (not copied) on an FSDP mesh where ROLLOUT_RULES differ from TRAIN_RULES."""
    c = toy.get_config("debug")
    c.mesh.data, c.mesh.fsdp, c.model.dtype = 2, 2, "bfloat16"
    p = build.plan(c)
    task = build.task(p)
    cfg = build.model_config(p, task.vocab_size)
    mesh = build.mesh(p)
    _, params = build.model(p, cfg, mesh)
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params
    )
    real = jax.tree.leaves(sampler_lib.rollout_weights(params, mesh, p.model.dtype))
    fake = jax.tree.leaves(sampler_lib.rollout_weights(abstract, mesh, p.model.dtype))
    train, train_abstract = jax.tree.leaves(params), jax.tree.leaves(abstract)
    assert len(real) == len(fake) == len(train)
    copied = 0
    for r, f, t, ta in zip(real, fake, train, train_abstract, strict=True):
        assert (r.shape, r.dtype) == (f.shape, f.dtype)
        assert r.sharding.is_equivalent_to(f.sharding, r.ndim)
        assert (r is t) == (f is ta)  # shared with the train state in both, or copied in both
        copied += r is not t
    assert 0 < copied < len(train)  # both cases occur on this mesh
    assert any(f.dtype == jax.numpy.bfloat16 for f in fake)


@pytest.mark.parametrize(
    "env, platform, want",
    [
        ({}, "gpu", 0.75),  # JAX preallocates 75% of each GPU
        ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}, "gpu", 0.9),
        ({"XLA_CLIENT_MEM_FRACTION": "0.5"}, "gpu", 0.5),
        ({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}, "gpu", 1.0),
        ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}, "tpu", 1.0),  # GPU allocator only
        ({}, "cpu", 1.0),
    ],
)
def test_a_gpu_budget_given_by_hand_is_jax_memory_fraction_of_it(monkeypatch, env, platform, want):
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert dry_run.budget(24.0, platform) == pytest.approx((24.0 * want, want))


def test_dry_run_counts_the_continuous_engines_slots():
    """rollout.engine=continuous: one call takes the whole step (16 prompts × 8), and the cache
    counted is the engine's: the slots' cache (slots × (prompt + new tokens)), every prompt's
    prefilled cache once (prompts × prompt) and the output rows, far below the static call's
    cache of all 128 rows."""
    from apo_jax.rollout import kv_cache as kv_cache_lib

    c = toy.get_config()
    c.mesh.data, c.eval.num_prompts = 1, 0
    static = dry_run.estimate(c)
    c.rollout.engine, c.rollout.slots = "continuous", 16
    cont = dry_run.estimate(c)
    r = c.rollout
    assert static["rollout_rows"] == cont["rollout_rows"] == r.prompts_per_step * r.group_size
    p = build.plan(c)
    cfg = build.model_config(p, build.task(p).vocab_size)
    dtype = build.cache_dtype(p)
    slots = kv_cache_lib.nbytes(cfg, 16, r.max_prompt_len + r.max_new_tokens, dtype)
    prompts = kv_cache_lib.nbytes(cfg, r.prompts_per_step, r.max_prompt_len, dtype)
    rows = r.prompts_per_step * r.group_size * r.max_new_tokens * 4 * 3  # tokens, 2 log-probs
    everything = kv_cache_lib.nbytes(
        cfg, r.prompts_per_step * r.group_size, r.max_prompt_len + r.max_new_tokens, dtype
    )
    got = cont["kv_cache_gib"] * dry_run.GIB
    assert slots + prompts + rows <= got + dry_run.GIB * 1e-6 <= 1.2 * (slots + prompts + rows)
    assert static["kv_cache_gib"] * dry_run.GIB >= everything > 2 * got
