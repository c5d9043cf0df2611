"""Hugging Face checkpoints of any registered model family in and out: `config.json` +
(sharded) safetensors.

`config.json` picks the family (models/registry.py); the family's explicit key map
(models/hf_keys.py) maps every parameter to its HF key, HF shape and layout transforms.
Loading reads tensor by tensor from memory-mapped files and places each one directly with its
target sharding, so the whole model never sits on one host first.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from apo_jax.infra import sharding as sharding_lib
from apo_jax.models import family, registry
from apo_jax.models.decoder import Decoder

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
WHERE = (
    "Pass a Hugging Face model directory of a supported family (config.json + model.safetensors "
    "or a sharded model.safetensors.index.json), e.g. one saved by transformers' save_pretrained "
    "or downloaded from the Hub with `huggingface-cli download Qwen/Qwen3-1.7B --local-dir DIR`."
)


def _weight_files(hf_dir: str) -> dict[str, str]:
    """HF key -> safetensors file path, from the single file or the sharded index."""
    single, index = os.path.join(hf_dir, SINGLE_FILE), os.path.join(hf_dir, INDEX_FILE)
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(
                    f"{index}: not a safetensors index with a weight_map ({e})"
                ) from None
        files = {key: os.path.join(hf_dir, name) for key, name in weight_map.items()}
        for path in sorted(set(files.values())):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{index} names {os.path.basename(path)}, which is missing")
        return files
    if os.path.isfile(single):
        with _open(single) as f:
            return {key: single for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    present = sorted(os.listdir(hf_dir))
    raise FileNotFoundError(
        f"{hf_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
        f"(directory holds {present}). {WHERE}"
    )


def _open(path: str):
    """safe_open, with a damaged file (empty, truncated, not safetensors) named in the error."""
    try:
        return safe_open(path, framework="numpy")
    except SafetensorError as e:
        raise ValueError(
            f"{path}: not a readable safetensors file ({os.path.getsize(path)} bytes; {e}); "
            "the download or save may be incomplete"
        ) from None


def load_model(
    hf_dir: str | os.PathLike,
    *,
    dtype=jnp.float32,
    mesh: Mesh | None = None,
    rules: sharding_lib.Rules = sharding_lib.TRAIN_RULES,
    remat: bool | str = False,
    attention: str = "naive",
    scan_layers: bool = False,
    compute_dtype=None,
) -> Decoder:
    """Loads a HF checkpoint of any registered family (picked from config.json) with parameters
    in `dtype` and matmuls in `compute_dtype` (default: `dtype`).

    With a mesh, each tensor goes straight to its NamedSharding (from the logical axes and
    `rules`); nothing is first gathered on one device.
    """
    hf_dir = os.fspath(hf_dir)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"{hf_dir}: no such directory. {WHERE}")
    cfg = registry.config_from_hf(os.path.join(hf_dir, "config.json"))
    fam = registry.of(cfg)
    files = _weight_files(hf_dir)
    table = fam.key_map(cfg)

    expected = {e.hf_key for e in table.values()}
    # A tied checkpoint may still carry lm_head.weight (= the embedding); it is not needed.
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted(expected - files.keys())
    unexpected = sorted(files.keys() - expected - ignorable)
    if missing:
        raise KeyError(
            f"{hf_dir}: safetensors key {missing[0]!r} is missing"
            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}"
        )
    if unexpected:
        raise KeyError(
            f"{files[unexpected[0]]}: unexpected safetensors key {unexpected[0]!r} "
            f"for a {fam.name} model with this config.json"
        )

    abstract = nnx.eval_shape(
        lambda: fam.build(
            cfg,
            rngs=nnx.Rngs(0),
            param_dtype=dtype,
            dtype=compute_dtype or dtype,
            remat=remat,
            attention=attention,
            scan_layers=scan_layers,
        )
    )
    graphdef, state = nnx.split(abstract)
    shardings = None if mesh is None else sharding_lib.tree_shardings(state, mesh, rules)
    flat_shardings = None if shardings is None else dict(nnx.to_flat_state(shardings))
    np_dtype = np.dtype(jnp.dtype(dtype))

    handles = {path: _open(path) for path in sorted(set(files.values()))}
    try:
        flat = nnx.to_flat_state(state)
        values = []

        def read(path):
            entry = table[path]
            file = files[entry.hf_key]
            tensor = handles[file].get_tensor(entry.hf_key)  # memory-mapped view
            if tuple(tensor.shape) != entry.hf_shape:
                raise ValueError(
                    f"{file}: key {entry.hf_key!r} has shape {tuple(tensor.shape)}, "
                    f"expected {entry.hf_shape} from config.json"
                )
            # Checked on the stored tensor: a NaN/inf weight would otherwise only surface as
            # every update being skipped (or NaN rewards) far into the run.
            if not np.isfinite(tensor).all():
                bad = int(np.size(tensor) - np.isfinite(tensor).sum())
                raise ValueError(
                    f"{file}: tensor {entry.hf_key!r} holds {bad} non-finite value(s) (NaN/inf)"
                )
            return np.ascontiguousarray(entry.to_jax(tensor)).astype(np_dtype, copy=False)

        for path, variable in flat:
            if _stacked(path, table):  # scan_layers: [L, ...] from the L per-layer tensors
                value = np.stack([read(layer) for layer in _layer_paths(path, cfg)])
            else:
                value = read(path)
            if flat_shardings is not None:
                value = jax.device_put(value, flat_shardings[path].get_value())
            else:
                value = jnp.asarray(value)
            values.append((path, variable.replace(value)))
    finally:
        handles.clear()
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def _stacked(path: tuple, table: dict) -> bool:
    """A model.scan_layers parameter: ("layers", ...) without a layer index, shape [L, ...]."""
    return path[0] == "layers" and path not in table


def _layer_paths(path: tuple, cfg) -> list[tuple]:
    """The key map's per-layer paths of a stacked parameter, layer 0 first."""
    return [("layers", i, *path[1:]) for i in range(cfg.num_layers)]


def save_model(
    model: family.CausalLM, out_dir: str | os.PathLike, *, max_shard_bytes: int = 5 * 1024**3
) -> None:
    """Writes `config.json` and safetensors (sharded with an index above `max_shard_bytes`) that
    `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads with identical logits."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    cfg = model.cfg
    table = registry.of(cfg).key_map(cfg)
    tensors: dict[str, np.ndarray] = {}
    dtypes = set()
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = np.asarray(jax.device_get(variable.get_value()))
        dtypes.add(value.dtype)
        if _stacked(path, table):  # scan_layers: one HF tensor per layer slice
            for i, layer in enumerate(_layer_paths(path, cfg)):
                tensors[table[layer].hf_key] = np.ascontiguousarray(table[layer].to_hf(value[i]))
            continue
        tensors[table[path].hf_key] = np.ascontiguousarray(table[path].to_hf(value))

    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes

    hf_cfg = cfg.to_hf()
    hf_cfg["dtype"] = "bfloat16" if np.dtype(jnp.bfloat16) in dtypes else "float32"
    # Write weights first and config.json last: a directory with a config is a complete one.
    if len(shards) == 1:
        save_file(shards[0], os.path.join(out_dir, SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
            weight_map.update({key: name for key in shard})
        total = sum(t.nbytes for t in tensors.values())
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)


# The Qwen3-era public names (apo_jax.load_qwen3 / save_qwen3): any family loads and saves.
load_qwen3 = load_model
save_qwen3 = save_model
