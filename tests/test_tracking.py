"""Weights & Biases tracking (config.logging.wandb): offline runs read back from their own
.wandb files and compared with metrics.jsonl, a resumed run continuing its run ID, a sweep's
group and tags, the plan-time error without the extra, and a failing backend that must not
stop training."""

import glob
import json
import math
import os
import pathlib
import struct
import subprocess
import sys
import threading
import types
import zlib

import pytest

from apo_jax import sweep
from apo_jax.infra import metrics as metrics_lib
from apo_jax.infra import tracking
from apo_jax.trainer import build
from configs import toy

ROOT = pathlib.Path(__file__).resolve().parents[1]


# --- reading an offline run: wandb's own protobuf records, in its LevelDB-style log framing ---


def _records(path):
    """The wandb_internal_pb2.Record messages of a run-<id>.wandb file: a 7-byte header
    (":W&B", magic, version), then 32 KiB blocks of chunks (crc32, length, type) where type
    1 = a whole record, 2/3/4 = its first/middle/last part."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    data = pathlib.Path(path).read_bytes()
    assert data[:4] == b":W&B", path
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # zero padding up to the block's end
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + n]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad chunk at {pos}"
        pos += 7 + n
        parts += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def read_offline(run_dir) -> dict:
    """An offline-run-* directory as {id, group, tags, job_type, name, config, history,
    summary, files}: history rows {key: value} with "_step", values JSON-decoded."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    out = {"history": [], "summary": {}, "files": [], "config": {}}
    for r in _records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(
                id=r.run.run_id, group=r.run.run_group, tags=list(r.run.tags),
                job_type=r.run.job_type, name=r.run.display_name,
            )  # fmt: skip
            out["config"] = {u.key: json.loads(u.value_json) for u in r.run.config.update}
        elif kind == "history":
            out["history"].append(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            )
        elif kind == "summary":
            for u in r.summary.update:
                out["summary"]["/".join(u.nested_key) or u.key] = json.loads(u.value_json)
        elif kind == "files":
            out["files"] += [f.path for f in r.files.files]
    return out


def offline_runs(workdir) -> list[dict]:
    """Every offline run under workdir/wandb, oldest first."""
    dirs = sorted(glob.glob(os.path.join(workdir, "wandb", "offline-run-*")))
    return [read_offline(d) for d in dirs]


def _same(a, b) -> bool:
    if isinstance(a, str) or isinstance(b, str):  # metrics.jsonl keeps nan/inf as text
        return math.isnan(float(a)) and math.isnan(float(b)) or float(a) == float(b)
    return a == b


# --- plan time ------------------------------------------------------------------------------


def _config(**logging):
    c = toy.get_config("debug")
    c.mesh.data = 1
    for key, value in logging.items():
        c.logging[key] = value
    return c


def test_without_the_extra_plan_fails_with_the_install_line():
    """wandb made unimportable in a fresh interpreter: training fails in build.plan, before
    anything is built, naming the key and the install line; logging.wandb=False still plans."""
    code = (
        "import sys; sys.modules['wandb'] = None\n"  # `import wandb` now raises ImportError
        "from configs import toy\n"
        "from apo_jax.trainer import build\n"
        "c = toy.get_config('debug')\n"
        "build.plan(c)\n"
        "c.logging.wandb = True\n"
        "build.plan(c)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode != 0
    assert "ValueError: config.logging.wandb=True" in out.stderr, out.stderr
    assert 'pip install -e ".[wandb]"' in out.stderr


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("wandb_mode", "cloud", "logging.wandb_mode='cloud'.*online, offline"),
        ("wandb_tags", ("x" * 65,), "logging.wandb_tags.*1-64"),
        ("wandb_tags", ("",), "logging.wandb_tags"),
    ],
)
def test_bad_wandb_keys_are_named(key, value, match):
    with pytest.raises(ValueError, match=match):
        build.plan(_config(**{key: value}))


# --- a failing backend (a fake wandb module) --------------------------------------------------


class _FakeWandb(types.ModuleType):
    """A wandb stand-in whose init or log raises, or whose log blocks until released."""

    def __init__(self, fail_at: str, block: threading.Event | None = None):
        super().__init__("wandb")
        self.fail_at, self.block, self.logged, self.inits = fail_at, block, [], 0
        self.Settings = lambda **kw: kw

    def init(self, **kw):
        self.inits += 1
        if self.fail_at == "init":
            raise ConnectionError("no network")
        fake = self

        class Run:
            step = 0
            summary: dict = {}

            def log(self, metrics, step=None):
                if fake.block is not None:
                    fake.block.wait()
                if fake.fail_at == "log" and fake.logged:
                    raise BrokenPipeError("wandb-core service died")
                fake.logged.append(step)

            def finish(self, exit_code=0):
                pass

        return Run()


def _write_lines(workdir, n, settings):
    writer = metrics_lib.MetricsWriter(
        str(workdir), tensorboard=False, wandb=settings, config={"seed": 0}
    )
    for step in range(1, n + 1):
        writer.write(step, {"reward/mean": step / 10, "loss/value": float("nan")})
    return writer


@pytest.mark.parametrize("fail_at", ["init", "log"])
def test_failing_backend_is_reported_once_and_other_sinks_go_on(
    fail_at, tmp_path, monkeypatch, caplog
):
    fake = _FakeWandb(fail_at)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    settings = tracking.WandbSettings(enabled=True, mode="online")
    writer = _write_lines(tmp_path, 5, settings)
    writer.close(summary={"reward/mean": 0.5})
    lines = metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]
    reports = [r for r in caplog.records if "W&B logging stopped" in r.getMessage()]
    assert len(reports) == 1, [r.getMessage() for r in reports]
    cause = "ConnectionError: no network" if fail_at == "init" else "BrokenPipeError"
    assert cause in reports[0].getMessage()
    assert fake.inits == 1 and fake.logged == ([] if fail_at == "init" else [1])


def test_stuck_backend_never_blocks_a_step(tmp_path, monkeypatch, caplog):
    """The fake's log blocks until released: every write still returns, and closing gives up
    after FINISH_TIMEOUT_S with one report."""
    release = threading.Event()
    fake = _FakeWandb("", block=release)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(tracking, "FINISH_TIMEOUT_S", 0.2)
    settings = tracking.WandbSettings(enabled=True)
    done = []
    writes = threading.Thread(
        target=lambda: done.append(_write_lines(tmp_path, 50, settings)), daemon=True
    )
    writes.start()
    writes.join(timeout=120)
    try:
        assert done, "a write blocked on the W&B backend"
        done[0].close()
        assert len(metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))) == 50
        reports = [r.getMessage() for r in caplog.records if "W&B logging" in r.getMessage()]
        assert len(reports) == 1 and "did not finish" in reports[0]
    finally:
        release.set()


def test_real_client_without_network_is_reported_once(tmp_path, monkeypatch, caplog):
    """The real client, online, against a server that refuses connections: its start fails
    (after WANDB_INIT_TIMEOUT), is reported once, and every metrics line is written."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # the discard port: refused
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    writer = _write_lines(tmp_path, 3, tracking.WandbSettings(enabled=True, mode="online"))
    writer.close()
    assert len(metrics_lib.read_metrics(str(tmp_path / "metrics.jsonl"))) == 3
    reports = [r.getMessage() for r in caplog.records if "W&B logging" in r.getMessage()]
    assert len(reports) == 1 and "wandb.init" in reports[0], reports


def test_only_process_zero_starts_a_run(tmp_path, monkeypatch):
    fake = _FakeWandb("")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(metrics_lib.jax, "process_index", lambda: 1)
    _write_lines(tmp_path, 2, tracking.WandbSettings(enabled=True)).close()
    assert fake.inits == 0 and not (tmp_path / tracking.ID_FILE).exists()


# --- the real client, offline -----------------------------------------------------------------


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing under ~
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.mark.slow
def test_offline_run_matches_metrics_and_resume_continues_its_id(tmp_path, wandb_offline):
    """Steps 1-2, then the same workdir resumed to step 4 (with plots and an end evaluation):
    two offline runs with one ID, whose histories together are metrics.jsonl value for value;
    the run's config is config.json; the plots and the final line reach media and summary."""
    from apo_jax.trainer import loop

    workdir = str(tmp_path / "run")
    kw = dict(wandb=True, wandb_mode="offline", wandb_project="apo_jax_tests")
    c = _config(**kw)
    c.total_steps, c.checkpoint.every_steps, c.eval.num_prompts = 2, 2, 0
    loop.run(c, workdir)
    c = _config(**kw, plots=True)
    c.total_steps, c.eval.num_prompts, c.eval.every_steps = 4, 4, 0
    last = loop.run(c, workdir)

    first, resumed = offline_runs(workdir)
    ident = json.loads((tmp_path / "run" / tracking.ID_FILE).read_text())
    assert first["id"] == resumed["id"] == ident["id"]
    assert first["name"] == resumed["name"] == f"{tmp_path.name}/run"
    assert [h["_step"] for h in first["history"]] == [1, 2]
    assert [h["_step"] for h in resumed["history"]] == [3, 4]

    lines = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
    rows = {h["_step"]: h for h in first["history"] + resumed["history"]}
    by_step: dict = {}
    for line in lines:  # the end evaluation is a second line for step 4
        by_step.setdefault(line["step"], {}).update(line)
    assert sorted(rows) == sorted(by_step) == [1, 2, 3, 4]
    for step, line in by_step.items():
        for key, value in line.items():
            if key != "step":
                assert _same(rows[step][key], value), (step, key, rows[step][key], value)
    assert any(k.startswith("eval/") for k in rows[4])

    config = json.loads((tmp_path / "run" / "config.json").read_text())
    logged = {k: v for k, v in resumed["config"].items() if k != "_wandb"}
    assert logged == config
    for key, value in last.items():  # the final line, evaluation included, is the summary
        if key != "step":
            assert _same(resumed["summary"][key], value), key
    plots = sorted(os.listdir(os.path.join(workdir, "plots")))
    media = [f for f in resumed["files"] if f.startswith("media/images/plots/")]
    assert plots and len(media) == len(plots)
    assert all(any(m.split("/")[-1].startswith(p[:-4] + "_") for m in media) for p in plots)


@pytest.mark.slow
def test_sweep_runs_share_a_group_with_arm_and_seed_tags(tmp_path, wandb_offline):
    """A 2 arms x 2 seeds sweep of one-step runs: four offline runs in the group named after the
    sweep, each tagged with its arm and seed, plus the group's summary run with the table."""
    workdir = tmp_path / "alpha_sweep"
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(
        "--xla_force_host_platform_device_count=8", ""
    )
    args = [
        "--config=configs/toy.py:debug", f"--workdir={workdir}", "--seeds=0,1", "--jobs=2",
        "--grid", "schedule.alpha=0.5,1.0", "--config.schedule.mode=fixed",
        "--config.total_steps=1", "--config.eval.num_prompts=0", "--config.mesh.data=1",
        "--config.logging.wandb=true",
        "--config.logging.wandb_mode=offline",
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-m", "apo_jax.sweep", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr

    arms = ["schedule.alpha=0.5", "schedule.alpha=1.0"]
    seen = {}
    for arm in arms:
        for seed in (0, 1):
            rundir = workdir / arm / f"seed{seed}"
            (run,) = offline_runs(rundir)
            assert run["group"] == "alpha_sweep" and run["job_type"] == "train"
            assert run["tags"] == [arm, f"seed{seed}"]
            assert run["name"] == f"{arm}/seed{seed}"
            assert run["config"]["schedule"]["alpha"] == float(arm.split("=")[1])
            assert [h["_step"] for h in run["history"]] == [1]
            seen[run["id"]] = (arm, seed)
    assert len(seen) == 4  # four distinct run IDs
    (summary,) = offline_runs(workdir)
    assert summary["group"] == "alpha_sweep" and summary["job_type"] == "summary"
    assert any(f.startswith("media/table/sweep/summary") for f in summary["files"])


def test_sweep_tags_stay_valid_and_distinct(tmp_path):
    """Arm names longer than W&B's 64-character tags are cut with a hash of the whole name; the
    sweep adds its group and the arm and seed tags to what the config has."""
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    long_a, long_b = "x" * 70 + "a", "x" * 70 + "b"
    ta, tb = tracking.tag(long_a), tracking.tag(long_b)
    assert len(ta) == len(tb) == 64 and ta != tb
    assert tracking.tag("schedule.alpha=0.5") == "schedule.alpha=0.5"
    # Tags from a flag (flags of a tuple field add up) and from the config file (a flag would
    # replace them): both kept, before the arm and the seed.
    in_file = tmp_path / "tagged.py"
    in_file.write_text(
        "from configs import toy\n\n\ndef get_config(arg=None):\n"
        "    c = toy.get_config('debug')\n    c.logging.wandb_tags = ('file',)\n    return c\n"
    )
    for config_arg, flags, tags in (
        ("configs/toy.py:debug", ["--config.logging.wandb_tags=('flag',)"], ("flag",)),
        (str(in_file), [], ("file",)),
    ):
        base = ["--config.logging.wandb=true", "--config.logging.wandb_group=mine", *flags]
        runs = sweep.plan(config_arg, str(tmp_path / "s"), ["schedule.alpha=0.5,1.0"], [3], base)
        assert len(runs) == 2
        for run in runs:
            config = sweep.load_config(config_arg, run.overrides)
            assert config.logging.wandb_group == "mine"
            assert config.logging.wandb_tags == (*tags, run.arm, "seed3")
    plain = sweep.plan("configs/toy.py:debug", str(tmp_path / "p"), [], [0], [])
    assert not any("wandb" in flag for flag in plain[0].overrides)
