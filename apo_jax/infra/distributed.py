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
    heartbeat_timeout_s: int | None = None,
) -> None:
    """Explicit arguments win (GPU hosts started by hand, local multi-process tests); `auto`
    (TPU pods: `--distributed`) or a recognised launcher environment lets JAX detect the
    cluster. A lone process needs none of this.

    `heartbeat_timeout_s` (None: JAX's default, 100 s) is how long the coordination service
    waits for a silent process before declaring it dead. It bounds how long the others live on
    after one is killed: their next collective fails at once (the peer's connection closes), but
    on exit each waits in JAX's shutdown barrier until the service gives the dead process up,
    then aborts."""
    kw = {} if heartbeat_timeout_s is None else {"heartbeat_timeout_seconds": heartbeat_timeout_s}
    if coordinator_address is not None:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kw)
    elif auto or any(os.environ.get(k) for k in _DETECTABLE_ENV):
        jax.distributed.initialize(**kw)
    else:
        return
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
