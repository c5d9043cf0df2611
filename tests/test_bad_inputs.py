"""Bad input, table-driven (issue 15): each case fails before any model is built or function
compiled, with a message that names the key, file or flag, and leaves a finished run's workdir
byte-for-byte unchanged."""

import json
import math
import pathlib

import pytest

from apo_jax import evaluate as evaluate_cli
from apo_jax.trainer import build
from apo_jax.trainer import evaluate as evaluate_lib
from apo_jax.trainer import loop as train
from configs import base, toy

NAN, INF = math.nan, math.inf


def _set(c, overrides: dict):
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def _toy(**overrides):
    c = toy.get_config("debug")
    c.mesh.data = 1  # the loop itself is single-device here (tests have 8 fake devices)
    c.total_steps = 2
    c.checkpoint.every_steps = 1
    return _set(c, overrides)


def _math(data_dir: pathlib.Path, **overrides):
    """base.py:debug on small MATH-format files (train: levels 2 and 3; test: level 3)."""
    c = base.get_config("debug")
    c.mesh.data = 1
    c.task.math.data_path = str(data_dir / "train.jsonl")
    c.task.math.eval_path = str(data_dir / "test.jsonl")
    return _set(c, overrides)


def _snapshot(root: pathlib.Path) -> dict:
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny toy run (checkpoints, metrics.jsonl, config.json) and its bytes."""
    workdir = tmp_path_factory.mktemp("finished")
    # No in-run evaluation: fewer programs to compile (the cases fail before the resume check).
    train.run(_toy(**{"eval.num_prompts": 0, "eval.every_steps": 0}), str(workdir))
    saved = _snapshot(workdir)
    assert any(k.startswith("checkpoints") for k in saved) and "metrics.jsonl" in saved
    return workdir, saved


@pytest.fixture(scope="module")
def math_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("math")
    row = lambda i, level: dict(problem=f"What is {i} + 1?", answer=str(i + 1), level=level)
    with open(d / "train.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps(row(i, f"Level {2 + i % 2}")) + "\n")
    with open(d / "test.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps(row(i, "Level 3")) + "\n")
    (d / "empty.jsonl").write_text("")
    (d / "a_file").write_text("not a directory")
    return d


@pytest.fixture
def no_compile(monkeypatch, finished):
    """Every builder that allocates weights or compiles raises: the error must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("the error must come before any model is built or compiled")

    monkeypatch.setattr(train.step_lib, "build", forbidden)
    monkeypatch.setattr(build.sampler_lib, "Sampler", forbidden)
    monkeypatch.setattr(build, "model", forbidden)
    monkeypatch.setattr(evaluate_lib, "restore_params", forbidden)
    monkeypatch.setattr(evaluate_lib, "evaluate", forbidden)


# (overrides of toy.py:debug, regex the message must match). Group numbers refer to issue 15.
CONFIG_CASES = [
    # issue 16: the attention and remat selectors name their valid values
    ({"model.attention": "flash"}, r"config\.model\.attention='flash': valid: auto, xla_blockwise"),
    ({"model.remat": "everything"}, r"config\.model\.remat='everything': valid: none, block"),
    # 2: keep >= 1 (keep=0 would delete every checkpoint, the final one too)
    ({"checkpoint.keep": 0}, r"config\.checkpoint\.keep=0: must lie in \[1, inf\)"),
    ({"checkpoint.keep": -1}, r"config\.checkpoint\.keep=-1"),
    # 3: non-finite floats
    ({"optim.lr": NAN}, r"config\.optim\.lr=nan: must be a finite"),
    ({"optim.lr": INF}, r"config\.optim\.lr=inf: must be a finite"),
    ({"optim.lr": -INF}, r"config\.optim\.lr=-inf"),
    ({"schedule.alpha": NAN}, r"config\.schedule\.alpha=nan"),
    ({"schedule.tau0": INF}, r"config\.schedule\.tau0=inf"),
    ({"rollout.temperature": NAN}, r"config\.rollout\.temperature=nan"),
    ({"optim.b1": NAN}, r"config\.optim\.b1=nan"),
    ({"optim.grad_clip": INF}, r"config\.optim\.grad_clip=inf"),
    ({"loss.apo.beta_r": INF}, r"config\.loss\.apo\.beta_r=inf"),
    ({"loss.name": "grpo", "loss.grpo.kl_coef": NAN}, r"config\.loss\.grpo\.kl_coef=nan"),
    # 6: out-of-range values
    ({"rollout.overlong_buffer": 9}, r"config\.rollout\.overlong_buffer=9: must be < rollout"),
    ({"rollout.overlong_buffer": 8}, r"config\.rollout\.overlong_buffer=8"),
    ({"rollout.overlong_buffer": -1}, r"config\.rollout\.overlong_buffer=-1"),
    ({"loss.apo.clip_log_ratio": 0.0}, r"config\.loss\.apo\.clip_log_ratio=0\.0"),
    (
        {"loss.name": "fdiv", "loss.fdiv.clip_log_ratio": 0.0},
        r"config\.loss\.fdiv\.clip_log_ratio=0\.0",
    ),
    ({"checkpoint.every_steps": -1}, r"config\.checkpoint\.every_steps=-1"),
    ({"eval.num_prompts": -5}, r"config\.eval\.num_prompts=-5"),
    ({"loss.name": "grpo", "loss.grpo.clip_eps_low": -0.1}, r"config\.loss\.grpo\.clip_eps_low"),
    ({"loss.name": "dapo", "loss.dapo.clip_eps_low": -0.1}, r"config\.loss\.dapo\.clip_eps_low"),
    ({"loss.name": "gspo", "loss.gspo.clip_eps_high": -1e-4}, r"config\.loss\.gspo\.clip_eps_high"),
    ({"loss.name": "dr_grpo", "loss.dr_grpo.clip_eps": 1.0}, r"config\.loss\.dr_grpo\.clip_eps"),
    ({"loss.name": "grpo", "loss.grpo.dual_clip": 0.5}, r"config\.loss\.grpo\.dual_clip"),
    ({"loss.apo.logit_reg_coef": -0.01}, r"config\.loss\.apo\.logit_reg_coef"),
    ({"optim.b2": 1.0}, r"config\.optim\.b2=1\.0: must lie in \[0, 1\)"),
    ({"optim.b2": 1.5}, r"config\.optim\.b2=1\.5"),
    ({"optim.weight_decay": -0.01}, r"config\.optim\.weight_decay=-0\.01"),
    ({"optim.logprob_chunk": 0}, r"config\.optim\.logprob_chunk=0"),
    ({"optim.warmup_steps": -1}, r"config\.optim\.warmup_steps=-1"),
    ({"optim.grad_clip": -1.0}, r"config\.optim\.grad_clip=-1\.0"),
    ({"eval.every_steps": -1}, r"config\.eval\.every_steps=-1"),
    ({"seed": -1}, r"config\.seed=-1"),
    ({"rollout.max_refill_rounds": -1}, r"config\.rollout\.max_refill_rounds=-1"),
    ({"rollout.top_p": 0.0}, r"config\.rollout\.top_p=0\.0"),
    ({"rollout.top_k": -1}, r"config\.rollout\.top_k=-1"),
    ({"total_steps": 0}, r"config\.total_steps=0"),
    ({"model.vocab_size": -2}, r"config\.model\.vocab_size=-2"),
    ({"mesh.data": 0}, r"config\.mesh\.data=0"),
    ({"mesh.fsdp": 0}, r"config\.mesh\.fsdp=0"),
    ({"schedule.ema_momentum": 1.0}, r"config\.schedule\.ema_momentum=1\.0"),
    ({"schedule.ess_candidates": 1}, r"config\.schedule\.ess_candidates=1"),
    ({"schedule.alpha_min": 0.95}, r"config\.schedule\.alpha_min=0\.95: must be <= "),
    ({"task.toy.prompt_len": 11}, r"config\.task\.toy\.prompt_len=11"),
    ({"task.toy.num_values": 2.5}, r"config\.task\.toy\.num_values=2\.5: must be a int"),
    # keys declared before their code lands (issues 20, 21): checked like every key
    ({"rollout.engine": "paged"}, r"^config\.rollout\.engine='paged': valid: static, continuous"),
    ({"optim.pack_len": -1}, r"^config\.optim\.pack_len=-1: must lie in \[0, inf\)"),
    # 7: unknown names, caught by plan, blaming only their key
    ({"loss.name": "fdiv", "loss.fdiv.divergence": "kl"}, r"config\.loss\.fdiv\.divergence='kl'"),
    ({"loss.name": "grpo", "loss.grpo.agg_mode": "mean"}, r"^config\.loss\.grpo\.agg_mode='mean'"),
    ({"loss.name": "grpo", "loss.grpo.kl_type": "k4"}, r"^config\.loss\.grpo\.kl_type='k4'"),
    ({"loss.name": "ppo"}, r"config\.loss\.name='ppo': unknown loss"),
    ({"task.name": "chess"}, r"config\.task\.name='chess': unknown task"),
    ({"task.name": "math", "task.math.level": 9}, r"config\.task\.math\.level=9"),
    ({"task.name": "math", "task.math.eval_set": "aime"}, r"config\.task\.math\.eval_set"),
    ({"task.name": "math", "task.math.reward": "f1"}, r"config\.task\.math\.reward='f1'"),
]


@pytest.mark.parametrize("overrides, match", CONFIG_CASES, ids=lambda x: str(x)[:60])
def test_bad_config_fails_first_and_changes_nothing(finished, no_compile, overrides, match):
    workdir, saved = finished
    c = _toy()
    with c.ignore_type():  # e.g. a float where an int is expected, as a hand-written config may
        _set(c, overrides)
    with pytest.raises(ValueError, match=match) as err:
        train.run(c, str(workdir))
    if "loss.grpo.agg_mode" in overrides:
        assert "kl_type" not in str(err.value)  # blame only the key that is wrong
    if "loss.grpo.kl_type" in overrides:
        assert "agg_mode" not in str(err.value)
    # The evaluation CLI goes through the same plan.
    with pytest.raises(ValueError, match=match):
        evaluate_cli.run(c, workdir=str(workdir), out=str(workdir.parent / "r.json"))
    assert _snapshot(workdir) == saved


LATE_CASES = [  # (math overrides, regex): errors found by building the task, before the model
    ({"task.math.data_path": "{d}/empty.jsonl"}, r"config\.task\.math\.data_path: .*empty\.jsonl"),
    ({"task.math.level": 4}, r"data_path: .*train\.jsonl has no problems of level 4 .*level=4"),
    ({"task.math.eval_path": "{d}/empty.jsonl"}, r"config\.task\.math\.eval_path: .*empty\.jsonl"),
    ({"task.math.level": 2}, r"eval_path: .*test\.jsonl has no problems of level 2"),
    ({"task.math.data_path": "{d}/missing.jsonl"}, r"missing\.jsonl: no such file"),
]


@pytest.mark.parametrize("overrides, match", LATE_CASES, ids=lambda x: str(x)[:60])
def test_bad_data_fails_before_the_model(math_files, tmp_path, no_compile, overrides, match):
    overrides = {
        k: v.format(d=math_files) if isinstance(v, str) else v for k, v in overrides.items()
    }
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        train.run(_math(math_files, **overrides), str(tmp_path / "run"))
    c = _math(math_files, **overrides)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        evaluate_cli.run(c, out=str(tmp_path / "r.json"))


def test_lengths_beyond_the_model_fail_before_the_model(tmp_path, no_compile):
    c = _toy(**{"rollout.max_new_tokens": 100_000})
    match = r"config\.rollout\.max_new_tokens=100000: .*exceeds the model's max_position"
    with pytest.raises(ValueError, match=match):
        train.run(c, str(tmp_path / "run"))
    with pytest.raises(ValueError, match=match):
        evaluate_cli.run(c, out=str(tmp_path / "r.json"))


def test_unwritable_workdir_fails_before_the_model(finished, math_files, no_compile):
    # Under a regular file: unwritable even for root, which ignores permission bits.
    bad = math_files / "a_file" / "run"
    with pytest.raises(PermissionError, match=r"workdir .*a_file/run.* not a writable"):
        train.run(_toy(), str(bad))
    with pytest.raises(PermissionError, match=r"workdir .*a_file"):
        train.run(_toy(), str(math_files / "a_file"))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"out": "{d}/a_file/r.json"}, r"--out=.*a_file/r\.json: cannot write"),
        ({"out": "{d}"}, r"--out=.*: cannot write there \(is a directory\)"),
        ({"k": 0}, r"--k=0: must be >= 1"),
        ({"num_prompts": -1}, r"--num_prompts=-1"),
        ({"prompts_per_call": 0}, r"--prompts_per_call=0"),
    ],
    ids=lambda x: str(x)[:40],
)
def test_evaluation_cli_flags_fail_first(finished, math_files, no_compile, kwargs, match):
    workdir, saved = finished
    kwargs = {k: v.format(d=math_files) if isinstance(v, str) else v for k, v in kwargs.items()}
    kwargs.setdefault("out", str(math_files / "r.json"))
    with pytest.raises((ValueError, PermissionError), match=match):
        evaluate_cli.run(_toy(), workdir=str(workdir), **kwargs)
    assert _snapshot(workdir) == saved


def test_empty_eval_set_with_evaluation_fails_before_the_model(tmp_path, no_compile):
    class NoEval:
        def __init__(self, task):
            self._task = task

        def __getattr__(self, name):
            return getattr(self._task, name)

        def eval_examples(self):
            return []

    real = build.task
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "task", lambda p: NoEval(real(p)))
        with pytest.raises(ValueError, match=r"config\.eval\.num_prompts=4: .* no held-out"):
            train.run(_toy(), str(tmp_path / "run"))
        with pytest.raises(ValueError, match=r"held-out set is empty"):
            evaluate_cli.run(_toy(), out=str(tmp_path / "r.json"))


# --- issue 24, groups 1, 2, 3, 6, 8: workdir lock, sweep reruns, resume horizons, the evaluation
# CLI's bounds, the distributed heartbeat ------------------------------------------------------


def _finished_config(**overrides):
    """The config the `finished` run was made with, plus `overrides`."""
    return _toy(**{"eval.num_prompts": 0, "eval.every_steps": 0, **overrides})


@pytest.mark.parametrize(
    "overrides, match",
    [
        # 3: a checkpoint beyond total_steps (the run is past where it would end)
        ({"total_steps": 1}, r"config\.total_steps=1: .* checkpoint at step 2, beyond it"),
        # 3: a schedule change is not a resumable change, whatever total_steps says
        ({"total_steps": 4, "optim.decay": "cosine"}, r"incompatible config.*optim\.decay"),
        ({"optim.warmup_steps": 2}, r"incompatible config.*optim\.warmup_steps: 0 -> 2"),
    ],
    ids=lambda x: str(x)[:60],
)
def test_resume_beyond_or_across_a_schedule_fails_first(finished, no_compile, overrides, match):
    workdir, saved = finished
    with pytest.raises(ValueError, match=match):
        train.run(_finished_config(**overrides), str(workdir))
    assert _snapshot(workdir) == saved


def test_cosine_horizon_change_is_refused_naming_both_totals():
    from apo_jax.infra import checkpoint as checkpoint_lib

    saved = {"total_steps": 4, "optim": {"decay": "cosine", "lr": 1e-3}}
    longer = {"total_steps": 8, "optim": {"decay": "cosine", "lr": 1e-3}}
    with pytest.raises(ValueError, match=r"total_steps=4 and optim\.decay='cosine'.*=8 would"):
        checkpoint_lib.check_resume(2, saved, longer, "W")
    constant = lambda n: {"total_steps": n, "optim": {"decay": "constant", "lr": 1e-3}}
    checkpoint_lib.check_resume(2, constant(4), constant(8), "W")  # no horizon: may grow


def test_finished_run_started_again_trains_nothing(finished, no_compile, capsys):
    workdir, saved = finished
    last = train.run(_finished_config(), str(workdir))
    assert last["step"] == 2 and "loss/value" in last  # the run's last line, for the summary
    assert "already at step 2 = total_steps; nothing to train" in capsys.readouterr().out
    assert _snapshot(workdir) == saved


def test_locked_workdir_refused_naming_the_holder(finished, no_compile):
    import os
    import socket
    import subprocess
    import sys

    from apo_jax.infra import workdir_lock

    workdir, saved = finished
    script = "import sys, time\nfrom apo_jax.infra import workdir_lock\n"
    script += "with workdir_lock.hold(sys.argv[1]):\n    print('held', flush=True)\n"
    script += "    time.sleep(600)\n"
    root = pathlib.Path(__file__).resolve().parents[1]
    holder = subprocess.Popen([sys.executable, "-c", script, str(workdir)], cwd=root,
                              env={**os.environ, "PYTHONPATH": str(root)}, stdout=subprocess.PIPE,
                              text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        held = _snapshot(workdir)
        match = rf"in use by PID {holder.pid} on host {socket.gethostname()}"
        with pytest.raises(workdir_lock.WorkdirLocked, match=match):
            train.run(_finished_config(), str(workdir))
        assert _snapshot(workdir) == held  # the holder's record included
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock.hold(str(workdir)):  # take over the killed holder's record, end cleanly
        pass
    assert _snapshot(workdir) == saved


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"optim.lr": 0.01}, r"finished run made with other settings.*optim\.lr=.*, now 0\.01"),
        ({"total_steps": 1}, r"total_steps=2, now 1"),
        ({"eval.num_prompts": 4}, r"eval\.num_prompts=0, now 4"),  # its results would lie
        ({"loss.apo.beta_r": 0.5}, r"loss\.apo\.beta_r=0\.3, now 0\.5"),
        ({"total_steps": 3, "optim.decay": "cosine"}, r"optim\.decay='constant', now 'cosine'"),
        ({"total_steps": 3}, None),  # continues the run (a constant lr has no horizon)
        ({"logging.progress": True, "checkpoint.keep": 5}, None),  # outputs, not results
    ],
    ids=lambda x: str(x)[:60],
)
def test_sweep_rerun_of_a_finished_run_checks_its_record(finished, overrides, match):
    from apo_jax import sweep

    workdir, saved = finished
    c = _finished_config(**overrides)
    record = json.loads(build.plan(c).to_json())
    run = sweep.Run("arm", 0, (), str(workdir), c.total_steps, sweep.config_hash(record), record)
    if match is None:
        sweep.check_existing(run)
    else:
        with pytest.raises(sweep.SweepError, match=match):
            sweep.check_existing(run)
    assert _snapshot(workdir) == saved


@pytest.mark.parametrize("k", [10**9, 2**40])
def test_evaluation_k_beyond_memory_fails_first(finished, math_files, no_compile, k):
    workdir, saved = finished
    match = rf"--k={k} × --prompts_per_call=\d+: one sampler call of \d+ rows needs at least"
    with pytest.raises(ValueError, match=match):
        evaluate_cli.run(_toy(), workdir=str(workdir), k=k, out=str(math_files / "r.json"))
    assert _snapshot(workdir) == saved


def test_heartbeat_timeout_reaches_jax_and_is_bounded(monkeypatch, tmp_path):
    import os
    import subprocess
    import sys

    import jax

    from apo_jax.infra import distributed

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **kw: calls.append((a, kw)))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    distributed.initialize("localhost:1234", 2, 0, heartbeat_timeout_s=7)
    distributed.initialize("localhost:1234", 2, 0)
    assert calls == [
        (("localhost:1234", 2, 0), {"heartbeat_timeout_seconds": 7}),
        (("localhost:1234", 2, 0), {}),  # JAX's own default
    ]
    root = pathlib.Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "apo_jax.main", "--config=configs/toy.py:debug"]
    argv += [f"--workdir={tmp_path / 'run'}", "--heartbeat_timeout_s=0"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "heartbeat_timeout_s" in proc.stderr
    assert not (tmp_path / "run").exists()


# --- issue 24, groups 4, 5, 7: ignored settings, data that cannot train, late or bare errors ---

I32, I64 = 2**31 - 1, 2**63 - 1
# (overrides of toy.py:debug, regex), run as CONFIG_CASES: both CLIs, before anything is built.
ISSUE24_CONFIG_CASES = [
    # 4: a non-default value in a block that loss.name / task.name does not select
    (
        {"loss.grpo.kl_coef": 0.04},
        r"^config\.loss\.grpo\.kl_coef=0\.04: config\.loss\.name='apo'"
        r" does not read config\.loss\.grpo\.\* .*allow_unused_keys=True",
    ),
    ({"loss.gspo.scale_adv": False}, r"^config\.loss\.gspo\.scale_adv=False: .*loss\.name='apo'"),
    (
        {"task.toy_sorted.prompt_len": 4},
        r"^config\.task\.toy_sorted\.prompt_len=4: config\.task"
        r"\.name='toy' does not read",
    ),
    ({"task.math.reward": "correct"}, r"^config\.task\.math\.reward='correct': .*task\.name='toy'"),
    # ... range-checked like a selected block, also when unused values are allowed
    ({"loss.grpo.agg_mode": "mean"}, r"^config\.loss\.grpo\.agg_mode='mean'"),
    ({"loss.fdiv.clip_log_ratio": 0.0}, r"^config\.loss\.fdiv\.clip_log_ratio=0\.0"),
    ({"allow_unused_keys": True, "task.math.level": 9}, r"^config\.task\.math\.level=9"),
    ({"allow_unused_keys": True, "loss.dapo.clip_eps_low": NAN}, r"config\.loss\.dapo\.clip_eps"),
    ({"allow_unused_keys": 1}, r"^config\.allow_unused_keys=1: must be a bool"),
    # 4: greedy training makes every group identical (zero advantage, zero gradient)
    ({"rollout.temperature": 0.0}, r"^config\.rollout\.temperature=0\.0: greedy sampling"),
    ({"rollout.temperature": 0}, r"^config\.rollout\.temperature=0(\.0)?: .*advantage"),
    # 7: upper bounds a dtype or memory imposes
    (
        {"optim.warmup_steps": 10**12},
        rf"^config\.optim\.warmup_steps=1000000000000: must lie in "
        rf"\[0, {I32}\]",
    ),
    ({"total_steps": 2**31}, rf"^config\.total_steps=2147483648: must lie in \[1, {I32}\]"),
    (
        {"total_steps": 2**30 + 1},
        r"^config\.total_steps=1073741825: total_steps \* optim\."
        r"mini_batches = 2147483650 .*int32",
    ),
    (
        {"schedule.ess_candidates": 2**30},
        r"^config\.schedule\.ess_candidates=1073741824: .*"
        r"\[candidates, prompts, G\] array",
    ),
    ({"schedule.ess_warmup_calls": 2**31}, r"^config\.schedule\.ess_warmup_calls=2147483648"),
    (
        {"rollout.prompts_per_step": 10**12},
        r"^config\.rollout\.prompts_per_step=1000000000000: "
        r"a step's token batch .* > 2\*\*31 - 1 elements",
    ),
    ({"rollout.group_size": 10**9}, r"^config\.rollout\.prompts_per_step=4: .*group_size"),
    ({"seed": 2**63}, rf"^config\.seed=9223372036854775808: must lie in \[0, {I64}\]"),
    ({"seed": 2**64 + 1}, r"^config\.seed=18446744073709551617: must lie in"),
    ({"model.remat": "sometimes"}, r"^config\.model\.remat='sometimes': valid: .*True / False"),
]


@pytest.mark.parametrize("overrides, match", ISSUE24_CONFIG_CASES, ids=lambda x: str(x)[:60])
def test_issue24_bad_config_fails_first_and_changes_nothing(finished, no_compile, overrides, match):
    test_bad_config_fails_first_and_changes_nothing(finished, no_compile, overrides, match)


def test_unused_blocks_may_change_on_resume_but_used_keys_may_not(finished, no_compile):
    """A resumed run compares only the blocks it reads: with allow_unused_keys, a new value in
    the grpo block of an apo run passes the resume check (and gets as far as building the
    model, which no_compile refuses); a new value in the apo block is refused, named."""
    workdir, saved = finished
    # total_steps=3: a continuation (the finished run, at its total_steps, would train nothing)
    c = _toy(
        **{"total_steps": 3, "allow_unused_keys": True, "loss.grpo.kl_coef": 0.04,
           "task.math.level": 2}
    )  # fmt: skip
    with pytest.raises(AssertionError, match="before any model is built"):
        train.run(c, str(workdir))
    with pytest.raises(ValueError, match=r"incompatible config .*loss\.apo\.beta_r"):
        train.run(_toy(**{"loss.apo.beta_r": 2.0}), str(workdir))
    assert _snapshot(workdir) == saved


def test_remat_booleans_pass_on_the_command_line():
    from apo_jax import sweep

    for text, policy in (("True", "block"), ("false", "none"), ("dots_saveable", "dots_saveable")):
        c = sweep.load_config("configs/toy.py:debug", [f"--config.model.remat={text}"])
        assert build.plan(c).model.remat == policy


def _config_file(tmp_path, body: str) -> str:
    path = tmp_path / "configs" / "mine.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(body)
    return str(path)


@pytest.mark.parametrize(
    "spec, match",
    [
        (
            "configs/toy.py:debgu",
            r"configs/toy\.py: unknown config argument\(s\) 'debgu' "
            r"\(in 'debgu'\); accepted: debug",
        ),
        ("configs/base.py:debug,smal", r"configs/base\.py: unknown .* 'smal'"),
        ("experiments/apo_math_l3.py:dbg", r"apo_math_l3\.py: unknown config argument\(s\) 'dbg'"),
        (
            "experiments/apo_alpha_ablation.py:0.5,debgu",
            r"apo_alpha_ablation\.py: config argument "
            r"'debgu' .*accepted: debug, scheduled",
        ),
        ("experiments/apo_alpha_ablation.py:1.5", r"'1\.5' .*alpha"),
        (
            "{tmp}/configs/mine.py",
            r"mine\.py: get_config\(\) returned dict, not an ml_collections"
            r"\.ConfigDict \(wrap it",
        ),
        (
            "{tmp}/configs/mine.py:none",
            r"mine\.py: get_config\('none'\) returned NoneType, .*"
            r"return",
        ),
        ("{tmp}/configs", r"configs: is a directory, not a file"),
        ("{tmp}/configs/absent.py", r"absent\.py: no such file"),
    ],
    ids=lambda x: str(x)[:50],
)
def test_config_file_arguments_and_results_are_checked(tmp_path, spec, match):
    """Every CLI loads --config through apo_jax.config_file (sweep.load_config is that path
    on a private FlagValues): a one-line error naming the file."""
    from apo_jax import sweep

    _config_file(tmp_path, "def get_config(arg=None):\n    return None if arg else {'seed': 0}\n")
    with pytest.raises(Exception, match=match) as err:
        sweep.load_config(spec.format(tmp=tmp_path))
    assert "Traceback" not in str(err.value)


TOKENIZER_CASES = [
    (b"", r"tokenizer\.json: not valid JSON"),
    (b'{"version": "1.0", "model": {"vocab": {"a": 0', r"tokenizer\.json: not valid JSON"),
    (b"\x00\x01 binary", r"tokenizer\.json: not valid JSON"),
]


@pytest.mark.parametrize("content, match", TOKENIZER_CASES, ids=["empty", "truncated", "binary"])
def test_damaged_tokenizer_names_the_file_and_key(math_files, tmp_path, no_compile, content, match):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    (tok / "tokenizer.json").write_bytes(content)
    c = _math(math_files, **{"task.math.tokenizer": str(tok)})
    with pytest.raises(ValueError, match=r"^config\.task\.math\.tokenizer: .*" + match):
        train.run(c, str(tmp_path / "run"))
    (tok / "tokenizer.json").write_text("{}")  # JSON, but no tokenizer: still named
    (tok / "tokenizer_config.json").write_bytes(content)
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not valid JSON"):
        evaluate_cli.run(c, out=str(tmp_path / "r.json"))


def _rows(path: pathlib.Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


GOOD = dict(problem="What is 1 + 1?", answer="2", level="Level 3")
# (rows of a MATH file, regex): data that cannot train, named by file:line before the model.
DATA_CASES = [
    (
        [GOOD, {**GOOD, "answer": 2}],
        r"data\.jsonl:2 \(line 2\): .*'answer' must be a JSON string,"
        r" got int 2",
    ),
    ([{**GOOD, "answer": ["2", "3"]}], r"data\.jsonl:1 .*'answer' must be a JSON string, got list"),
    ([GOOD, GOOD, {**GOOD, "problem": {"text": "x"}}], r"data\.jsonl:3 .*'problem' .* got dict"),
    ([{**GOOD, "problem": 7.5}], r"data\.jsonl:1 .*'problem' must be a JSON string, got float"),
    ([{**GOOD, "answer": True}], r"'answer' must be a JSON string, got bool true"),
    (
        [{**GOOD, "answer": ""}] * 3,
        r"data\.jsonl has no problems of level 3 .*3 record\(s\) "
        r"skipped \(malformed, or an empty problem or answer",
    ),
    ([{**GOOD, "problem": "  \n"}] * 2, r"data\.jsonl has no problems .*2 record\(s\) skipped"),
]


@pytest.mark.parametrize("rows, match", DATA_CASES, ids=lambda x: str(x)[:50])
def test_data_that_cannot_train_fails_with_file_and_line(
    math_files, tmp_path, no_compile, rows, match
):
    data = _rows(tmp_path / "data.jsonl", rows)
    c = _math(math_files, **{"task.math.data_path": data})
    with pytest.raises(ValueError, match=r"^config\.task\.math\.data_path: .*" + match):
        train.run(c, str(tmp_path / "run"))
    c = _math(math_files, **{"task.math.eval_path": data})  # the held-out file: same rules
    with pytest.raises(ValueError, match=r"^config\.task\.math\.eval_path: .*" + match):
        evaluate_cli.run(c, out=str(tmp_path / "r.json"))


def test_some_empty_answers_are_skipped_with_a_warning(tmp_path, caplog):
    from apo_jax.tasks import datasets

    rows = [GOOD, {**GOOD, "answer": " "}, GOOD, {**GOOD, "problem": ""}]
    problems = datasets.load_math(_rows(tmp_path / "data.jsonl", rows))
    assert len(problems) == 2 and problems.num_skipped == 2
    assert "data.jsonl:2: skipped 2 record(s) with an empty field" in caplog.text


def test_directory_as_data_path_is_named(math_files, no_compile, tmp_path):
    c = _math(math_files, **{"task.math.data_path": str(math_files)})
    with pytest.raises(IsADirectoryError, match=r"^config\.task\.math\.data_path: .*is a dir"):
        train.run(c, str(tmp_path / "run"))


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            {"rollout.top_k": 14},
            r"^config\.rollout\.top_k=14: exceeds the model's vocabulary "
            r"\(13 tokens\)",
        ),
        (
            {"rollout.max_prompt_len": 3},
            r"^config\.rollout\.max_prompt_len=3: shorter than the "
            r"toy task's prompts .* = 4 tokens",
        ),
        (
            {
                "task.name": "toy_sorted",
                "task.toy_sorted.prompt_len": 5,
                "rollout.max_prompt_len": 5,
            },
            r"max_prompt_len=5: shorter than the toy_sorted",
        ),
    ],
    ids=lambda x: str(x)[:40],
)
def test_task_dependent_bounds_fail_before_the_model(no_compile, tmp_path, overrides, match):
    """top_k against the vocabulary, max_prompt_len against the toy prompts: known once the
    task is built, still before the model (a fresh workdir: no resume check first)."""
    c = _toy(**overrides)
    with pytest.raises(ValueError, match=match):
        train.run(c, str(tmp_path / "run"))
    with pytest.raises(ValueError, match=match):
        evaluate_cli.run(c, out=str(tmp_path / "r.json"))
    assert not (tmp_path / "r.json").exists()


def _sweep_args(tmp_path, *extra):
    return ["--config=configs/toy.py:debug", f"--workdir={tmp_path / 'w'}", "--seeds=0", *extra]


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--grid", "optim.lr=1e-3,3e-3,1e-3"], "--grid optim.lr: value(s) 1e-3 given twice"),
        (
            ["--grid", "optim.lr=1e-3,0.001"],
            "arms 'optim.lr=1e-3' and 'optim.lr=0.001' are the same settings: optim.lr = 0.001",
        ),
        (
            ["--grid", "loss.grpo.kl_coef=0.0,0.04"],
            "arm 'loss.grpo.kl_coef=0.0': loss.grpo."
            "kl_coef is not read with config.loss.name='apo'",
        ),
        (
            ["--config.allow_unused_keys=True", "--grid", "task.math.level=2,3"],
            "task.math.level is not read with config.task.name='toy'",
        ),
        (["--config.loss.grpo.kl_coef=0.04"], "config.loss.grpo.kl_coef=0.04: config.loss.name="),
        (["--config.rollout.temperature=0"], "config.rollout.temperature=0.0: greedy sampling"),
    ],
    ids=lambda x: str(x)[:40],
)
def test_sweep_refuses_arms_that_differ_in_nothing(tmp_path, capsys, extra, needle):
    from apo_jax import sweep

    assert sweep.main(_sweep_args(tmp_path, *extra)) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_sweep_with_a_mistyped_config_argument_fails_first(tmp_path, capsys):
    from apo_jax import sweep

    args = _sweep_args(tmp_path, "--grid", "optim.lr=1e-3,3e-3")
    args[0] = "--config=configs/toy.py:debgu"
    assert sweep.main(args) == 2
    assert "unknown config argument(s) 'debgu'" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_aggregate_names_a_missing_directory_and_unknown_metrics(tmp_path, capsys):
    from apo_jax import sweep

    assert sweep.main(["--aggregate", str(tmp_path / "nowhere")]) == 2
    assert f"--aggregate {tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err
    run = tmp_path / "arm" / "seed0"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"total_steps": 2}))
    _rows(run / "metrics.jsonl", [{"step": s, "reward/mean": 0.5} for s in (1, 2)])
    saved = _snapshot(tmp_path)
    assert sweep.main(["--aggregate", str(tmp_path), "--metrics=reward/meen,reward/mean"]) == 2
    err = capsys.readouterr().err
    assert "--metrics: 'reward/meen' not logged by any finished run; logged: reward/mean" in err
    assert _snapshot(tmp_path) == saved  # no summary with an empty column
    assert sweep.main(["--aggregate", str(tmp_path), "--metrics=reward/mean"]) == 0


@pytest.mark.slow
def test_late_evaluation_runs_at_the_end_and_a_lost_metrics_file_is_reported(tmp_path, caplog):
    """eval.every_steps > total_steps still evaluates the last step (it used to never evaluate);
    resuming after metrics.jsonl was deleted says so, and the file starts at the next step."""
    from apo_jax.infra import metrics as metrics_lib

    c = lambda steps: _toy(
        **{"total_steps": steps, "eval.every_steps": 5, "eval.num_prompts": 2}
    )  # 2 prompts: the smallest evaluation
    train.run(c(2), str(tmp_path))
    lines = metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [x["step"] for x in lines] == [1, 2]
    assert "eval/accuracy" in lines[1] and not any(k.startswith("eval/") for k in lines[0])
    (tmp_path / "metrics.jsonl").unlink()
    with caplog.at_level("WARNING"):
        train.run(c(3), str(tmp_path))
    assert "metrics.jsonl: missing; resuming at step 2, so the file lacks steps 1..2" in caplog.text
    lines = metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [x["step"] for x in lines] == [3] and "eval/accuracy" in lines[0]
