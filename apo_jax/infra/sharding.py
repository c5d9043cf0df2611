"""Device meshes and the logical-axis -> mesh-axis tables for parameters and activations.

Parameters carry logical axis names (`axes` metadata, see model.py). A rule table maps each
logical name to a mesh axis (or a tuple of them, or None = replicated). Two tables: one for
training (FSDP + tensor parallel) and one for rollout (no FSDP gathering per decode step).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Mapping[str, str | tuple[str, ...] | None]

TRAIN_RULES: Rules = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "norm": None,
    "seq": None,
    "cache_seq": None,
    "layers": None,  # the stacked [L, ...] axis of model.scan_layers: each device holds all layers
    "lora_rank": None,  # LoRA's R (models/lora.py): small; the adapters split as their base does
}

# Decode reads every weight once per token: gathering FSDP shards each step would dominate, so
# rollout keeps weights whole along `embed` and splits only over `tensor`.
ROLLOUT_RULES: Rules = {**TRAIN_RULES, "embed": None}


def logical_to_spec(axes: Sequence[str | None], rules: Rules) -> PartitionSpec:
    """PartitionSpec for one array's logical axes; raises if two dims share a mesh axis."""
    spec, used = [], set()
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise KeyError(f"logical axis {name!r} has no sharding rule (known: {sorted(rules)})")
        mesh_axes = rules[name]
        as_tuple = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        clash = used.intersection(as_tuple)
        if clash:
            raise ValueError(
                f"logical axes {tuple(axes)} map mesh axis {sorted(clash)} to two dimensions"
            )
        used.update(as_tuple)
        spec.append(mesh_axes)
    return PartitionSpec(*spec)


def fit_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: Rules):
    """The rule table's PartitionSpec for an array with logical `axes` and `shape`, replicating
    any dimension the mesh axes do not divide (e.g. 2 kv heads on tensor=4)."""
    spec = logical_to_spec(axes, rules)
    out = []
    for dim, mesh_axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        size = math.prod(mesh.shape[n] for n in names)
        out.append(mesh_axes if size > 1 and dim % size == 0 else None)
    return PartitionSpec(*out)


def mesh_shape(data: int, fsdp: int, tensor: int, num_devices: int) -> tuple[int, int, int]:
    """Resolves (data, fsdp, tensor) sizes; at most one may be -1 ("the devices left over")."""
    sizes = [int(data), int(fsdp), int(tensor)]
    names = [f"config.mesh.{n}" for n in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one of {names} may be -1, got {sizes}")
    for name, size in zip(names, sizes, strict=True):
        if size == 0 or size < -1:
            raise ValueError(f"{name}={size}: mesh axis sizes must be >= 1 (or -1 for the rest)")
    known = math.prod(size for size in sizes if size > 0)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"config.mesh: {dict(zip(names, sizes, strict=True))} does not divide the "
                f"{num_devices} devices"
            )
        sizes[sizes.index(-1)] = num_devices // known
    used = math.prod(sizes)
    if num_devices % used:
        raise ValueError(
            f"config.mesh: data*fsdp*tensor = {used} does not divide the {num_devices} devices "
            f"({dict(zip(names, sizes, strict=True))})"
        )
    return tuple(sizes)


def make_mesh(
    data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (GSPMD) over the global devices.

    A mesh smaller than the device count (it must divide it) uses the first devices: handy for
    a one-device debug run on a multi-device host. Multi-process runs must use every device.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(data, fsdp, tensor, len(devices))
    used = math.prod(shape)
    if used < len(devices):
        if jax.process_count() > 1:
            raise ValueError(
                f"config.mesh: {shape} uses {used} of {len(devices)} devices; a multi-process "
                "run must use all of them"
            )
        devices = devices[:used]
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
    )


def tree_shardings(tree, mesh: Mesh, rules: Rules = TRAIN_RULES):
    """NamedShardings for any pytree, with the tree's own structure (so it maps leaf for leaf):
    arrays inside nnx Variables follow their logical axes (parameters and optimizer moments
    alike); every other array is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def one(x):
        if not isinstance(x, nnx.Variable):
            return replicated
        axes = x.get_metadata().get("axes")
        if axes is None:
            return x.replace(replicated)
        return x.replace(NamedSharding(mesh, fit_spec(axes, x.get_value().shape, mesh, rules)))

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def named(mesh: Mesh, *spec) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(*spec))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of a batch split over the data-parallel axes."""
    return named(mesh, TRAIN_RULES["batch"])


def reshard(tree, mesh: Mesh, rules: Rules):
    """Moves a pytree of nnx Variables/arrays to the layout `rules` gives on `mesh` (e.g. the
    training parameters to the rollout layout); a no-op for arrays already laid out so."""
    return jax.device_put(tree, tree_shardings(tree, mesh, rules))


def check_mesh_fits(shape: tuple[int, int, int], cfg, rows_per_micro_batch: int) -> None:
    """Clear errors for mesh sizes the model or batch cannot be split by."""
    data, fsdp, tensor = shape
    for what, size in (("num_heads", cfg.num_heads), ("num_kv_heads", cfg.num_kv_heads)):
        if size % tensor:
            raise ValueError(
                f"config.mesh.tensor={tensor} does not divide the model's {what}={size}"
            )
    if rows_per_micro_batch % (data * fsdp):
        raise ValueError(
            f"config.mesh: data*fsdp = {data * fsdp} does not divide the {rows_per_micro_batch} "
            "sequences of a micro-batch (rollout.prompts_per_step * rollout.group_size / "
            "optim.mini_batches / optim.micro_batches)"
        )


def local_rows(x) -> np.ndarray:
    """This process's rows of an array split by rows over processes, as one host array (the
    whole array in a single-process run). Replicated shards are taken once."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
        return np.asarray(x)
    pieces = {}
    for shard in x.addressable_shards:
        rows = shard.index[0] if shard.index else slice(None)
        pieces.setdefault(rows.start or 0, np.asarray(shard.data))
    return np.concatenate([pieces[k] for k in sorted(pieces)])
