"""Optional Weights & Biases tracking (`config.logging.wandb`): one W&B run per workdir.

Every call into `wandb` happens on one daemon thread fed by a queue, so the backend (no network
in online mode, a crashed wandb-core service, a slow upload) can never stop or slow training:
its first failure is reported once, later records are dropped, and the other sinks
(metrics.jsonl, TensorBoard, plots) go on. Only process 0 creates a run. `wandb` is imported
only here and only when enabled: it is an optional extra (`pip install -e ".[wandb]"`).

The run's ID is made once per workdir and kept in `workdir/wandb_run.json`, so a resumed run
continues the same W&B run (resume="allow"); a new workdir at the same path (the old one
deleted) gets a new ID instead of appending to a dead run. Offline runs are written under
`workdir/wandb/` (`wandb sync workdir/wandb/offline-run-*` uploads them later).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import queue
import secrets
import threading
from collections.abc import Mapping, Sequence

from absl import logging

from apo_jax import settings

INSTALL = 'pip install -e ".[wandb]"'
MAX_TAG = settings.MAX_TAG  # W&B refuses longer tags
ID_FILE = "wandb_run.json"  # workdir/wandb_run.json: {"id": ..., "name": ...}
# The most the end of a run waits for W&B (a start still retrying without network, the last
# upload); training itself never waits. Online runs keep their records in workdir/wandb too.
FINISH_TIMEOUT_S = 120.0
QUEUE_MAX = 10_000  # records waiting for the thread; beyond this the backend is taken as stuck


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    """`config.logging.wandb*` (apo_jax/settings.py Logging), read by `build.plan`."""

    enabled: bool = settings.Logging.wandb
    project: str = settings.Logging.wandb_project
    entity: str = settings.Logging.wandb_entity
    mode: str = settings.Logging.wandb_mode
    group: str = settings.Logging.wandb_group
    tags: tuple[str, ...] = settings.Logging.wandb_tags


def check_installed() -> None:
    """Raises ValueError with the install line when `wandb` cannot be imported (at plan time,
    before anything is built)."""
    try:
        import wandb  # noqa: F401
    except Exception as e:  # absent (ImportError) or broken (a dependency's version, ...)
        raise ValueError(
            f"config.logging.wandb=True: the wandb package cannot be imported ({e}); "
            f"install the extra with `{INSTALL}` or set config.logging.wandb=False"
        ) from None


def tag(text: str) -> str:
    """`text` as a valid W&B tag: at most 64 characters (a long one keeps its start and gets a
    short hash of the whole, so two long arms stay apart)."""
    if len(text) <= MAX_TAG:
        return text
    return text[: MAX_TAG - 9] + "~" + hashlib.sha1(text.encode()).hexdigest()[:8]


def sweep_flags(config, sweep_dir: str, arm: str, seed: int, overrides: Sequence[str]) -> list[str]:
    """The overrides `apo_jax.sweep` adds to a run (`config`: the run's config, from the config
    file and `overrides`) when it logs to W&B: the group (the sweep's directory name, unless the
    config names one) and a tag for the arm and one for the seed, after the config's own tags.
    A tuple field's flags (ml_collections) add to each other but replace the file's value, so
    the file's tags are repeated only when no flag gave tags already."""
    lg = config.logging
    if not lg.wandb:
        return []
    group = lg.wandb_group or os.path.basename(os.path.abspath(sweep_dir))
    flagged = any(f.startswith("--config.logging.wandb_tags=") for f in overrides)
    tags = (*(() if flagged else lg.wandb_tags), tag(arm), f"seed{seed}")
    return [f"--config.logging.wandb_group={group}", f"--config.logging.wandb_tags={tags!r}"]


def run_identity(workdir: str, *, suffix: str = "", name: str = "") -> dict:
    """{"id", "name"} of the W&B run of `workdir`: read from workdir/wandb_run<suffix>.json, or
    made and written there. The name (unless given) is the workdir's last two path parts
    (`<arm>/seed<k>` in a sweep); the ID hashes the absolute path plus a random part, so a new
    workdir at a reused path is a new run."""
    path = os.path.join(workdir, ID_FILE.replace(".json", f"{suffix}.json"))
    try:
        with open(path) as f:
            found = json.load(f)
        if isinstance(found.get("id"), str) and found["id"]:
            return found
    except (OSError, ValueError):
        pass
    full = os.path.realpath(workdir)
    name = name or "/".join(full.split(os.sep)[-2:]) + suffix
    ident = {
        "id": hashlib.sha1(full.encode()).hexdigest()[:8] + "-" + secrets.token_hex(4) + suffix,
        "name": name,
    }
    os.makedirs(workdir, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(ident, f)
    os.replace(path + ".tmp", path)
    return ident


class WandbRun:
    """One W&B run fed from a queue by a daemon thread. `log` and `finish` never raise, and
    `log` never blocks."""

    def __init__(
        self,
        settings: WandbSettings,
        workdir: str,
        config: Mapping,
        *,
        job_type: str = "train",
        suffix: str = "",
        name: str = "",
    ):
        self._queue: queue.Queue = queue.Queue(maxsize=QUEUE_MAX)
        self._dead = threading.Event()  # set on the first failure: later records are dropped
        self._lock = threading.Lock()
        ident = run_identity(workdir, suffix=suffix, name=name)
        self.id, self.name = ident["id"], ident["name"]
        kwargs = dict(
            project=settings.project,
            entity=settings.entity or None,
            mode=settings.mode,
            dir=workdir,
            id=self.id,
            name=self.name,
            resume="allow",
            group=settings.group or None,
            tags=list(settings.tags) or None,
            job_type=job_type,
            config=dict(config),
        )
        self._thread = threading.Thread(
            target=self._work, args=(kwargs,), name="wandb", daemon=True
        )
        self._thread.start()

    # --- training side ------------------------------------------------------------------------

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        self._put(("log", int(step), dict(metrics)))

    def finish(
        self,
        *,
        images: Sequence[str] = (),
        summary: Mapping[str, float] | None = None,
        tables: Mapping[str, tuple[list, list]] | None = None,
    ) -> None:
        """Logs the end-of-run media (PNG paths under `plots/<file name>`), the summary values
        and tables ({key: (columns, rows)}), then finishes the run. Waits at most
        FINISH_TIMEOUT_S."""
        self._put(("finish", list(images), dict(summary or {}), dict(tables or {})))
        self._thread.join(timeout=FINISH_TIMEOUT_S)
        if self._thread.is_alive():
            self._fail(
                f"the run did not finish within {FINISH_TIMEOUT_S:.0f} s and is left behind "
                "(its local files can be uploaded with `wandb sync`)"
            )

    def _put(self, item) -> None:
        if self._dead.is_set():
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._fail(f"{QUEUE_MAX} records wait for the backend; it seems stuck")

    def _fail(self, why: str) -> None:
        """Reports the first failure only; from then on the run takes nothing more."""
        with self._lock:
            first = not self._dead.is_set()
            self._dead.set()
        if first:
            logging.warning("W&B logging stopped (training and the other sinks go on): %s", why)

    # --- thread side --------------------------------------------------------------------------

    def _work(self, kwargs: dict) -> None:
        try:
            import wandb

            run = wandb.init(
                **kwargs,
                reinit="create_new",  # never touches another run of this process
                settings=wandb.Settings(console="off"),  # the console stays ours
            )
        except Exception as e:  # any failure of the backend is reported, none is raised
            self._fail(f"wandb.init: {type(e).__name__}: {e}")
            return
        # A resumed online run continues after its last step; W&B refuses earlier steps, and
        # those were logged already (resumption reproduces them).
        first = int(getattr(run, "step", 0) or 0)
        try:
            while True:
                item = self._queue.get()
                if self._dead.is_set():
                    break
                if item[0] == "log":
                    _, step, metrics = item
                    if step >= first:
                        run.log(metrics, step=step)
                    continue
                _, images, summary, tables = item
                media = {
                    f"plots/{os.path.splitext(os.path.basename(p))[0]}": wandb.Image(p)
                    for p in images
                }
                for key, (columns, rows) in tables.items():
                    media[key] = wandb.Table(columns=columns, data=rows)
                if media:
                    run.log(media)
                if summary:
                    run.summary.update(summary)
                run.finish()
                return
        except Exception as e:
            self._fail(f"{type(e).__name__}: {e}")
        # A backend that failed once may still close the run; it gets no second report.
        with contextlib.suppress(Exception):
            run.finish(exit_code=1)


def log_sweep_summary(sweep_dir: str, rows: Sequence[Mapping]) -> None:
    """Adds a sweep's summary table (the rows of summary.csv) and curves.png to its W&B group, as
    a run of job type "summary", when its runs logged to W&B (read from their config.json)."""
    settings = None
    pattern = os.path.join(glob.escape(sweep_dir), "*", "*", "config.json")  # <arm>/<seed>/
    found = glob.glob(pattern, include_hidden=True)
    for path in sorted(found, key=lambda p: os.path.relpath(p, sweep_dir).split(os.sep)):
        try:
            with open(path) as f:
                lg = json.load(f).get("logging", {})
        except (OSError, ValueError):
            continue
        if lg.get("wandb"):  # a key the record lacks keeps its default
            keys = ("project", "entity", "mode", "group")
            given = {k: lg[f"wandb_{k}"] for k in keys if f"wandb_{k}" in lg}
            settings = WandbSettings(enabled=True, **given)
            break
    if settings is None or not rows:
        return
    try:
        check_installed()
    except ValueError as e:
        logging.warning("sweep summary not logged to W&B: %s", e)
        return
    columns = list(rows[0])
    data = [[row.get(c) for c in columns] for row in rows]
    curves = os.path.join(sweep_dir, "curves.png")
    group = settings.group or os.path.basename(os.path.abspath(sweep_dir))
    run = WandbRun(
        settings,
        sweep_dir,
        {"sweep_dir": os.path.abspath(sweep_dir), "arms": [row.get("arm") for row in rows]},
        job_type="summary",
        suffix="-summary",
        name=f"{group}/summary",
    )
    run.finish(
        images=[curves] if os.path.exists(curves) else [],
        tables={"sweep/summary": (columns, data)},
    )
