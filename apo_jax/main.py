"""Entry point: `python -m apo_jax.main --config=configs/<file>.py[:arg] --workdir=DIR`
(or `apo-train ...`), with `--config.a.b=value` overrides on the locked config."""

import json
import os
import sys

from absl import app, flags, logging

from apo_jax import config_file
from apo_jax.trainer.build import config_root_on_path

config_root_on_path(sys.argv)
_CONFIG = config_file.define_flag("config")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: metrics, plots, checkpoints.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "Multi-host: host:port of process 0 (jax.distributed)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host with cluster auto-detection (TPU pods, SLURM)."
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_s",
    None,
    "Multi-host: seconds without a heartbeat before jax.distributed declares a process dead "
    "(default: JAX's, 100). The survivors of a killed process abort after about this long.",
    lower_bound=1,
)
_DRY_RUN = flags.DEFINE_bool(
    "dry_run",
    False,
    "Build nothing real: compile one step's programs on abstract shapes over the visible devices "
    "and print one JSON line of per-device memory (peak_gib, fits, ...); writes nothing.",
)
_DEVICE_MEMORY_GIB = flags.DEFINE_float(
    "device_memory_gib", None, "--dry_run: per-device memory for `fits` (default: the device's)."
)
_TARGET = flags.DEFINE_string(
    "target",
    "cpu",
    "--dry_run: compile for `cpu` (this host's devices) or a TPU slice with the TPU compiler "
    "(tpu-v5e-8, tpu-v5e-4, tpu-v6e-8, tpu-v5p-8, ...: infra/targets.py; needs the `tpu` extra).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    import jax

    from apo_jax import console
    from apo_jax.infra import distributed, targets, workdir_lock
    from apo_jax.trainer import loop

    console.quiet_libraries(flags.FLAGS.verbosity)
    # Before JAX starts its backends (libtpu reads its environment then): a TPU target's
    # compiler, and quiet offline libtpu wherever it is installed on a host without TPU chips.
    targets.check(_TARGET.value)
    if _TARGET.value != "cpu" and not _DRY_RUN.value:
        raise ValueError(f"--target={_TARGET.value} is for --dry_run (a run uses its own devices)")
    targets.prepare_offline()

    distributed.initialize(
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        auto=_DISTRIBUTED.value,
        heartbeat_timeout_s=_HEARTBEAT.value,
    )
    logging.info(
        "JAX %s: %d process(es), %d device(s): %s",
        jax.__version__,
        jax.process_count(),
        jax.device_count(),
        jax.devices(),
    )
    if _DRY_RUN.value:  # nothing is allocated or written (trainer/dry_run.py)
        from apo_jax.trainer import dry_run

        report = dry_run.estimate(_CONFIG.value, _DEVICE_MEMORY_GIB.value, target=_TARGET.value)
        print(json.dumps(report), flush=True)
        return
    workdir = os.path.abspath(_WORKDIR.value)
    try:
        last = loop.run(_CONFIG.value, workdir)
    except workdir_lock.WorkdirLocked as e:  # not a crash: say who holds it, no traceback
        sys.exit(f"apo_jax: error: {e}")
    console.summary(last, workdir)


def cli():
    app.run(main, argv=sys.argv)


if __name__ == "__main__":
    cli()
