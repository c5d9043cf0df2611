"""Multi-host start-up: `jax.distributed.initialize` when configured or detected."""

import os

import jax
from absl import logging

# Environment variables that mean "this process is one of several" on common launchers.
_MULTI_PROCESS_ENV = ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "SLURM_NTASKS")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """Explicit arguments (GPU clusters, local multi-process tests) win; otherwise JAX's own
    cluster detection runs when the environment looks multi-process (TPU pods, SLURM)."""
    if coordinator_address is not None:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif (
        any(os.environ.get(k) for k in _MULTI_PROCESS_ENV)
        and os.environ.get("TPU_WORKER_HOSTNAMES", "localhost") != "localhost"
    ):
        jax.distributed.initialize()
    else:
        return
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
