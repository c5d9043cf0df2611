"""Held-out evaluation: the estimators against closed forms, the aggregation against a scripted
sampler, the standalone CLI (HF directory and training workdir) and a tiny MATH run."""

import itertools
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types
from fractions import Fraction

import numpy as np
import pytest

import apo_jax
from apo_jax import evaluate as evaluate_cli
from apo_jax import tasks as tasks_lib
from apo_jax.models import qwen3 as model_lib
from apo_jax.rollout import sampler as sampler_lib
from apo_jax.tasks import toy as toy_task
from apo_jax.trainer import build
from apo_jax.trainer import evaluate as evaluate_lib
from apo_jax.trainer import loop as train
from configs import base, toy

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of the k-subsets of n samples (c correct) that hold a correct one."""
    samples = [1] * c + [0] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                got = float(evaluate_lib.pass_at_k(n, c, k))
                assert got == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    # C(500, 100) overflows float64; compare with exact rational arithmetic.
    n, c, k = 500, 3, 100
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert float(evaluate_lib.pass_at_k(n, c, k)) == pytest.approx(float(exact), rel=1e-12)
    got = evaluate_lib.pass_at_k(np.array([500, 500]), np.array([0, 500]), 100)
    np.testing.assert_array_equal(got, [0.0, 1.0])


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="c <= n"):
        evaluate_lib.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="k <= n"):
        evaluate_lib.pass_at_k(4, 1, 5)


def test_avg_at_k_and_pass_at_1():
    assert evaluate_lib.avg_at_k([0, 2, 4], 4) == pytest.approx(0.5)
    c = np.array([0, 1, 3, 8])
    np.testing.assert_allclose(evaluate_lib.pass_at_k(8, c, 1), c / 8)  # pass@1 = c/n
    assert evaluate_lib.pass_ks(8) == [1, 2, 4, 8]
    assert evaluate_lib.pass_ks(6) == [1, 2, 4, 6]


# --- aggregation, against a sampler whose completions are scripted ------------------------------


class _ScriptedSampler:
    """Prompt i (its row id): greedy is correct iff i is even; sample j is the (j % m_i)-th
    ordering of the prompt's values if j < c_i, else a wrong answer; every token has log-prob
    -0.25 (j even) or -0.75 (j odd)."""

    engine = "static"  # evaluate() calls in chunks of rows_per_call

    def __init__(self, n_samples):
        self.k = n_samples
        self.calls = []

    @staticmethod
    def plan(i, k):
        return i % (k + 1), 1 + i % 3  # c_i correct samples, m_i distinct orderings

    def sample(self, params, prompts, *, n, rng, row_ids, temperature, top_k=0, top_p=1.0):
        self.calls.append((len(prompts), n, temperature))
        rows = []
        for prompt, i in zip(prompts, row_ids, strict=True):
            values = sorted(prompt[:-1])
            perms = list(itertools.permutations(values))
            for j in range(n):
                if temperature == 0:
                    ok, perm = i % 2 == 0, values
                else:
                    c_i, m_i = self.plan(i, self.k)
                    ok, perm = j < c_i, perms[j % m_i]
                comp = list(perm) if ok else [values[0]] * 3
                rows.append((comp + [toy_task.EOS_ID], -0.25 if j % 2 == 0 else -0.75))
        tokens = np.zeros((len(rows), 6), np.int32)
        logp, mask = np.zeros(tokens.shape, np.float32), np.zeros(tokens.shape, bool)
        for r, (comp, lp) in enumerate(rows):
            tokens[r, : len(comp)], logp[r, : len(comp)], mask[r, : len(comp)] = comp, lp, True
        return types.SimpleNamespace(
            tokens=tokens, logp=logp, mask=mask, truncated=np.zeros(len(rows), bool)
        )


def test_metrics_aggregate_per_prompt_statistics():
    task, k, n_prompts = tasks_lib.ToyTask(), 4, 7
    examples = list(task.eval_examples()[:n_prompts])
    sampler = _ScriptedSampler(k)
    metrics, records = evaluate_lib.evaluate(task, sampler, None, examples, k=k, rows_per_call=12)
    # 12 rows per call: 3 prompts x k samples (the last call padded, every call has one shape);
    # greedy: one call of the 7 prompts (at most 12).
    assert [(c[0], c[1]) for c in sampler.calls] == [(7, 1)] + [(3, k)] * 3
    c = np.array([sampler.plan(i, k)[0] for i in range(n_prompts)])
    m = np.array([sampler.plan(i, k)[1] for i in range(n_prompts)])
    assert [r["num_correct"] for r in records] == c.tolist()
    assert [r["uid"] for r in records] == [e.uid for e in examples]
    assert metrics["eval/accuracy"] == pytest.approx(np.mean(np.arange(n_prompts) % 2 == 0))
    assert metrics[f"eval/avg@{k}"] == pytest.approx(np.mean(c / k))
    for j in (1, 2, 4):
        want = np.mean([_brute_pass_at_k(k, ci, j) for ci in c])
        assert metrics[f"eval/pass@{j}"] == pytest.approx(want)
    distinct = np.minimum(c, m)
    assert metrics["eval/distinct_correct_answers"] == pytest.approx(distinct.mean())
    assert metrics["eval/distinct_correct"] == pytest.approx(distinct.mean())
    wrong_any = (c < k).astype(float)  # all wrong samples are the same completion
    assert metrics["eval/distinct_completions"] == pytest.approx((distinct + wrong_any).mean())
    # 4 tokens per sample, log-probs alternate -0.25 / -0.75 over j: mean -log p is 0.5.
    assert metrics["eval/entropy"] == pytest.approx(0.5)
    assert metrics["eval/len_mean"] == pytest.approx(4.0)
    assert metrics["eval/truncated_frac"] == 0.0


# --- bounded sampler calls (eval.rows_per_chunk) ------------------------------------------------


def test_rows_per_call_defaults_to_the_rollouts_chunk():
    c = toy.get_config()  # 16 prompts x G 8 per step
    c.rollout.engine = "static"  # continuous: one call per pass, whatever the chunk
    rows = lambda: evaluate_lib.rows_per_call(build.plan(c))
    assert rows() == 16 * 8  # a step's rows: the calls the evaluation always made
    assert evaluate_lib.rows_per_call(build.plan(c), procs=2) == 16 * 8 // 2  # per process
    c.rollout.rows_per_chunk = 32
    assert rows() == 32
    c.eval.rows_per_chunk = 12
    assert rows() == 12
    # (greedy, sampled) prompts per call: rows prompts, rows // k prompts of k rows (at least
    # one), never more than the prompts evaluated, rounded up to the processes.
    assert evaluate_lib.call_prompts(12, 8, 64) == (12, 1)
    assert evaluate_lib.call_prompts(12, 4, 64, procs=2) == (24, 6)
    assert evaluate_lib.call_prompts(12, 4, 5, procs=2) == (6, 6)
    c.eval.rows_per_chunk = -1
    with pytest.raises(ValueError, match=r"config\.eval\.rows_per_chunk=-1"):
        build.plan(c)


def test_evaluation_in_row_chunks_changes_nothing():
    """The loop's evaluation path (plan, mesh, model, sampler, rollout weights) on a tiny random
    model, once with every pass in one call and once with eval.rows_per_chunk = 4 (greedy: 4
    prompts per call; sampled: 1 prompt x k = 4): every call is bounded, the tokens of each
    (prompt, sample) are the same (per-row noise is keyed by prompt index), and so are greedy
    accuracy, avg@k, pass@k and every per-prompt count. Only the sampler's log-probs (entropy)
    may round differently, as XLA's matmuls over other row counts need not sum in one order."""
    c = toy.get_config("debug")
    c.mesh.data, c.rollout.group_size, c.eval.num_prompts = 1, 4, 6
    c.rollout.engine = "static"  # the engine whose calls eval.rows_per_chunk bounds
    k = c.rollout.group_size
    p = build.plan(c)
    task = build.task(p)
    cfg = build.model_config(p, task.vocab_size)
    mesh = build.mesh(p)
    graphdef, params = build.model(p, cfg, mesh)
    weights = sampler_lib.rollout_weights(params, mesh, p.model.dtype)
    examples = evaluate_lib.eval_subset(task, p.eval.num_prompts, p.seed)
    sampler = build.sampler(p, graphdef, task, mesh)
    real, rows, tokens = sampler.sample, [], {}

    def recording(params, prompts, *, n, rng, row_ids, **kw):
        out = real(params, prompts, n=n, rng=rng, row_ids=row_ids, **kw)
        rows.append(len(prompts) * n)
        toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for i, row in enumerate(row_ids):
            for j in range(n):
                if row < len(examples):  # not a padding prompt
                    r = i * n + j
                    tokens[kw["temperature"], int(row), j] = toks[r, : lengths[r]].tolist()
        return out

    sampler.sample = recording
    whole = evaluate_lib.evaluate(
        task, sampler, weights, examples, k=k, rows_per_call=evaluate_lib.rows_per_call(p)
    )
    whole_rows, whole_tokens = list(rows), dict(tokens)
    rows.clear(), tokens.clear()
    c.eval.rows_per_chunk = 4
    chunked = evaluate_lib.evaluate(
        task,
        sampler,
        weights,
        examples,
        k=k,
        rows_per_call=evaluate_lib.rows_per_call(build.plan(c)),
    )
    # One greedy call of the 6 prompts and 2 sampled calls of 4 prompts x k (16 rows: a step's);
    # then at most 4 rows per call.
    assert whole_rows == [6, 16, 16]
    assert rows == [4, 4] + [4] * 6
    assert tokens == whole_tokens and len(tokens) == 6 * (1 + k)
    (m_whole, r_whole), (m_chunk, r_chunk) = whole, chunked
    nll = [r["nll_sum"] for r in r_whole]
    for a, b in zip(r_whole, r_chunk, strict=True):
        assert {f: v for f, v in a.items() if f != "nll_sum"} == {
            f: v for f, v in b.items() if f != "nll_sum"
        }
    assert {key: v for key, v in m_whole.items() if key != "eval/entropy"} == {
        key: v for key, v in m_chunk.items() if key != "eval/entropy"
    }
    # A log-prob z_y - logsumexp(z) rounds at the scale of logsumexp, ~log V for a random model;
    # a prompt's nll_sum adds one per sampled token.
    per_token = 8 * np.finfo(np.float32).eps * np.log(task.vocab_size)
    for a, b in zip(r_whole, r_chunk, strict=True):
        assert abs(a["nll_sum"] - b["nll_sum"]) <= per_token * a["tokens"]
    assert m_whole["eval/entropy"] == pytest.approx(m_chunk["eval/entropy"], abs=per_token)
    assert min(nll) > 0


# --- the standalone CLI and the training loop ---------------------------------------------------


@pytest.fixture(scope="module")
def math_run(tmp_path_factory, shared_data):
    """A tiny random Qwen3 trained 2 steps on real MATH Level-3 prompts (configs/base.py with
    `debug`), evaluated on 4 held-out prompts at the end: (config, last metrics line, workdir)."""
    c = base.get_config()
    c.eval.num_prompts = 4
    base.apply_debug(c)
    c.mesh.data, c.eval.every_steps = 1, 0  # one evaluation, after the last step
    workdir = tmp_path_factory.mktemp("math_run")
    return c, train.run(c, str(workdir)), workdir


def test_tiny_run_on_real_math_prompts_evaluates(math_run):
    c, last, _ = math_run
    assert last["step"] == c.total_steps and np.isfinite(last["loss/value"])
    assert -0.5 <= last["reward/mean"] <= 1.0  # good_accuracy's range
    g = c.rollout.group_size
    for key in ("eval/accuracy", f"eval/avg@{g}", "eval/pass@1", f"eval/pass@{g}"):
        assert 0.0 <= last[key] <= 1.0, key
    assert 1 <= last["eval/len_mean"] <= c.rollout.max_new_tokens
    assert np.isfinite(last["eval/entropy"]) and last["eval/entropy"] > 0


def test_cli_on_a_workdir_reproduces_the_training_evaluation(math_run, tmp_path):
    c, last, workdir = math_run
    out = tmp_path / "eval.json"
    # The run's saved config.json, as the CLI reads it with --workdir and no --config.
    saved = build.load_config_json(str(workdir / "config.json"))
    result = evaluate_cli.run(saved, workdir=str(workdir), out=str(out))
    assert result["source"]["step"] == c.total_steps and result["task"] == "math"
    assert json.loads(out.read_text())["metrics"] == result["metrics"]
    # Restored parameters, same prompts, seeds and call shapes: the training loop's numbers.
    for key, value in result["metrics"].items():
        assert last[key] == pytest.approx(value, abs=1e-6), key


def test_cli_on_an_hf_directory_writes_json(tmp_path):
    # An HF-format directory (config.json + model.safetensors, as transformers saves them) of a
    # tiny random Qwen3 covering the toy vocabulary, evaluated through the command line.
    model_dir = tmp_path / "hf"
    cfg = model_lib.Qwen3Config.tiny(vocab_size=tasks_lib.ToyTask().vocab_size)
    apo_jax.save_qwen3(model_lib.init_model(cfg, seed=0), model_dir)
    out = tmp_path / "res" / "toy.json"
    argv = [sys.executable, "-m", "apo_jax.evaluate", "--config=configs/toy.py"]
    argv += [f"--config.model.hf_dir={model_dir}", "--config.model.dtype=float32"]
    argv += ["--config.rollout.max_new_tokens=6", "--num_prompts=6", "--k=4"]
    argv += ["--prompts_per_call=4", f"--out={out}"]
    subprocess.run(argv, check=True, cwd=ROOT, capture_output=True, timeout=300)
    saved = json.loads(out.read_text())
    assert saved["task"] == "toy"
    records, metrics = saved["per_prompt"], saved["metrics"]
    assert len(records) == 6
    assert metrics["eval/accuracy"] == pytest.approx(
        np.mean([r["greedy_correct"] for r in records])
    )
    assert metrics["eval/avg@4"] == pytest.approx(np.mean([r["num_correct"] / 4 for r in records]))
    assert 1 <= metrics["eval/len_mean"] <= 6 and metrics["eval/entropy"] > 0


@pytest.mark.parametrize("name, size", [("math", 1131), ("math500", 500), ("gsm8k", 1319)])
def test_eval_tasks_use_the_chat_template_and_stop_ids(name, size, shared_data):
    c = base.get_config()
    c.task.math.eval_set = name
    task = build.task(build.plan(c))
    assert len(task.eval_examples()) == size
    assert task.eos_ids == (151645, 151643)  # <|im_end|>, <|endoftext|>
    assert task.decode(task.eval_examples()[0].prompt_ids).endswith("<|im_start|>assistant\n")


# --- the CLI on a training workdir: training's restore path, read-only -------------------------


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A finished tiny toy run with checkpoints at steps 1 and 2 (no in-run evaluation)."""
    c = toy.get_config("debug")
    c.mesh.data, c.total_steps, c.checkpoint.every_steps = 1, 2, 1
    c.eval.num_prompts = c.eval.every_steps = 0
    workdir = tmp_path_factory.mktemp("toy_run")
    train.run(c, str(workdir))
    return workdir


def _tree(root: pathlib.Path) -> dict:
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


def _edit_config_json(workdir: pathlib.Path, key: str, value) -> None:
    path = workdir / "config.json"
    saved = json.loads(path.read_text())
    group, leaf = key.split(".")
    saved[group][leaf] = value
    path.write_text(json.dumps(saved))


@pytest.mark.slow
def test_cli_falls_back_past_a_damaged_step_and_trusts_the_checkpoint_record(toy_run, tmp_path):
    """The newest step's data truncated and config.json edited so that it no longer describes
    the weights (another parameter tree): the CLI evaluates step 1 under the checkpoint's own
    config record, says why on one line each, changes nothing in the run, and prints no Orbax
    INFO chatter; its numbers are those of step 1 evaluated directly."""
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    data = sorted((run / "checkpoints" / "2" / "state").glob("ocdbt.process_*/d/*"),
                  key=lambda f: f.stat().st_size)  # fmt: skip
    data[-1].write_bytes(data[-1].read_bytes()[:10])
    scan = json.loads((run / "config.json").read_text())["model"]["scan_layers"]
    _edit_config_json(run, "model.scan_layers", not scan)
    before = _tree(run)
    out = tmp_path / "eval.json"
    argv = [sys.executable, "-m", "apo_jax.evaluate", f"--workdir={run}", "--num_prompts=4"]
    argv += ["--k=2", f"--out={out}"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["source"]["step"] == 1
    assert result["config"]["model"]["scan_layers"] == scan  # the record, not config.json
    err = proc.stderr
    assert "checkpoint step 2" in err and "does not restore" in err
    assert "config.json differs from the config record" in err and "model.scan_layers" in err
    assert "Traceback" not in err
    assert not [x for x in err.splitlines() if re.match(r"I\d{4} ", x)]  # absl INFO lines
    assert _tree(run) == before  # nothing moved aside, nothing deleted
    direct = evaluate_cli.run(
        evaluate_cli.run_config(str(toy_run), 1),
        workdir=str(toy_run),
        step=1,
        num_prompts=4,
        k=2,
        out=str(tmp_path / "direct.json"),
    )
    assert direct["source"]["step"] == 1
    for key, value in direct["metrics"].items():
        assert result["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_config_json_that_is_not_json_is_named_and_the_record_used(toy_run, tmp_path, caplog):
    run = tmp_path / "run"
    shutil.copytree(toy_run, run)
    (run / "config.json").write_text('{"seed": 0,\n "model": ')
    with pytest.raises(ValueError, match=rf"{run}/config\.json: not valid JSON \(line 2"):
        build.load_config_json(str(run / "config.json"))
    config = evaluate_cli.run_config(str(run))
    assert config.total_steps == 2 and config.model.preset == "tiny"
    assert f"{run}/config.json: not valid JSON" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 7 \(steps: 2, 1\)"):
        evaluate_cli.run_config(str(run), 7)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        evaluate_cli.run_config(str(tmp_path / "missing"))


def test_a_config_that_does_not_match_the_checkpoint_names_the_keys(toy_run, tmp_path):
    before = _tree(toy_run)
    c = evaluate_cli.run_config(str(toy_run))
    c.model.scan_layers = not c.model.scan_layers
    out = str(tmp_path / "r.json")
    with pytest.raises(RuntimeError, match=r"no checkpoint restores.*model\.scan_layers: "):
        evaluate_cli.run(c, workdir=str(toy_run), num_prompts=4, k=2, out=out)
    assert _tree(toy_run) == before  # evaluation moves no step aside


def test_cli_without_flags_is_a_usage_error():
    proc = subprocess.run([sys.executable, "-m", "apo_jax.evaluate"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "nothing to evaluate: give --config=FILE" in proc.stderr
    assert "Traceback" not in proc.stderr
