"""`--dry_run --target=NAME`: the devices a dry run compiles for. `cpu` (the default) is this
host's own backend; `tpu-<generation>-<size>` is a TPU slice described by libtpu on any host
(no TPU needed): its compile-only devices make a mesh, and `jit(...).lower(...).compile()` runs
the real TPU compiler for it.

Sizes follow Cloud TPU names: v5e / v6e count chips (one core each); v5p counts TensorCores,
two per chip (one megacore device per chip: tpu-v5p-8 is 4 devices). HBM is per device.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os

INSTALL = 'pip install -e ".[tpu]"'


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    topology: str  # libtpu's topology name, "<gen>:<chips per dim>"
    hbm_gib: float  # per device (chip)
    chips_per_host: tuple[int, int, int] = (2, 2, 1)  # one host's chips (as on v5e / v6e / v5p)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("tpu-v5e-4", "v5e:2x2", 16.0),
        Target("tpu-v5e-8", "v5e:2x4", 16.0),
        Target("tpu-v5e-16", "v5e:4x4", 16.0),
        Target("tpu-v5e-32", "v5e:4x8", 16.0),
        Target("tpu-v5e-64", "v5e:8x8", 16.0),
        Target("tpu-v5p-8", "v5p:2x2x1", 95.0),
        Target("tpu-v5p-16", "v5p:2x2x2", 95.0),
        Target("tpu-v5p-32", "v5p:2x2x4", 95.0),
        Target("tpu-v6e-4", "v6e:2x2", 32.0),
        Target("tpu-v6e-8", "v6e:2x4", 32.0),
        Target("tpu-v6e-16", "v6e:4x4", 32.0),
        Target("tpu-v6e-32", "v6e:4x8", 32.0),
    )
}
NAMES = ("cpu", *TARGETS)

# libtpu on a host without TPU chips: skip the GCE metadata server (it would wait for it) and
# name a single local worker, so that initialisation is quiet and takes seconds, offline; and
# let several processes load it (by default the first holds /tmp/libtpu_lockfile and the others
# fail to start it: pytest workers, two dry runs).
OFFLINE_ENV = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_ACCELERATOR_TYPE": "v5litepod-4",
    "TPU_WORKER_ID": "0",
    "TPU_WORKER_HOSTNAMES": "localhost",
}


def check(name: str) -> None:
    """A clear error for an unknown target, or a TPU target without libtpu (before any
    compile)."""
    if name not in NAMES:
        raise ValueError(f"--target={name!r}: valid targets are {', '.join(NAMES)}")
    if name != "cpu" and not has_libtpu():
        raise ValueError(
            f"--target={name} compiles with the TPU compiler, which comes with libtpu: "
            f"install it with `{INSTALL}` (the `tpu` extra, pinned to this jax)"
        )


def prepare_offline() -> None:
    """OFFLINE_ENV (as defaults) when libtpu is installed on a host without TPU chips; call
    before JAX initialises its backends (the TPU plugin reads it then)."""
    if has_libtpu() and not _has_tpu_chips():
        for key, value in OFFLINE_ENV.items():
            os.environ.setdefault(key, value)


def has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def _has_tpu_chips() -> bool:
    return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))


def devices(name: str) -> list | None:
    """The target's devices (None: this host's own, jax.devices())."""
    check(name)
    if name == "cpu":
        return None
    from jax.experimental import topologies

    t = TARGETS[name]
    topo = topologies.get_topology_desc(
        topology_name=t.topology,
        platform="tpu",
        chip_config_name="default",
        chips_per_host_bounds=t.chips_per_host,
        wrap=(False,) * 3,
    )
    return list(topo.devices)


def compiler(name: str, devices_: list | None) -> str:
    """What compiled the programs, for the report: `XLA:CPU`, `XLA:TPU libtpu 0.0.42 v5e:2x4`."""
    import jax

    if name == "cpu":
        return f"XLA:{jax.devices()[0].platform.upper()} jaxlib {jax.__version__}"
    version = importlib.metadata.version("libtpu")
    return f"XLA:TPU libtpu {version} {TARGETS[name].topology} ({devices_[0].device_kind})"


def over_hbm_line(error: Exception) -> str | None:
    """The TPU compiler's own out-of-memory verdict as one line ("Ran out of memory in memory
    space hbm. Used 20.3G of 15.75G hbm. Exceeded hbm capacity by 4.6G."), or None when the
    error is something else."""
    text = str(error)
    if "RESOURCE_EXHAUSTED" not in text and "Ran out of memory" not in text:
        return None
    for line in text.splitlines():
        if "Ran out of memory" in line or "Exceeded" in line:
            return " ".join(line.split())[:300]
    return " ".join(text.split())[:300]
