"""Multi-host start-up: `jax.distributed.initialize` when asked for or detected."""

import os

import jax
from absl import logging

# Set by launchers of multi-process jobs whose cluster JAX can detect by itself.
_DETECTABLE_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE")


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
) -> None:
    """Explicit arguments win (GPU hosts started by hand, local multi-process tests); `auto`
    (TPU pods: `--distributed`) or a recognised launcher environment lets JAX detect the
    cluster. A lone process needs none of this."""
    if coordinator_address is not None:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    elif auto or any(os.environ.get(k) for k in _DETECTABLE_ENV):
        jax.distributed.initialize()
    else:
        return
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
