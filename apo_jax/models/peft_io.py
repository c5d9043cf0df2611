"""LoRA adapters in and out in the PEFT format, merged exports, and the identity of a base.

A PEFT LoRA directory holds `adapter_config.json` (r, lora_alpha, target_modules, ...) and
`adapter_model.safetensors` with, per targeted torch Linear of the HF model,
  base_model.model.<module>.lora_A.weight  [R, in]
  base_model.model.<module>.lora_B.weight  [out, R]
and the delta (lora_alpha / r) · B A x, the same as ours (models/lora.py). Ours are
A [*I, R], B [R, *O] with the flattening order of the base's HF layout (models/hf_keys.py), so
the conversion is a reshape and a transpose. `peft.PeftModel.from_pretrained(hf_base, dir)` loads
what `save_adapters` writes; `load_adapters` reads a PEFT directory back (a starting point).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import jax
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from apo_jax.models import hf_io, registry
from apo_jax.models import lora as lora_lib

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_MODULE = {"attn": "self_attn", "mlp": "mlp"}


def _hf_module(layer: int, module: str, proj: str) -> str:
    return f"model.layers.{layer}.{_MODULE[module]}.{proj}"


def _entries(params: nnx.State):
    """(layer, module, proj, A [*I, R], B [R, *O]) for every adapter, per layer (a stacked
    scan_layers adapter gives one entry per layer slice), as host float32 arrays."""
    flat = {path: var.get_value() for path, var in nnx.to_flat_state(params)}
    for path, a in flat.items():
        if not (isinstance(path[-1], str) and path[-1].endswith("_lora_a")):
            continue
        proj, module = path[-1][: -len("_lora_a")], path[-2]
        b = flat[(*path[:-1], f"{proj}_lora_b")]
        a = np.asarray(jax.device_get(a), np.float32)
        b = np.asarray(jax.device_get(b), np.float32)
        if isinstance(path[1], int):  # per-layer weights: ("layers", i, module, name)
            yield path[1], module, proj, a, b
        else:  # scan_layers: ("layers", module, name), [L, ...]
            for i in range(a.shape[0]):
                yield i, module, proj, a[i], b[i]


def save_adapters(params: nnx.State, lora: lora_lib.LoRAConfig, out_dir: str, base: str = ""):
    """Writes the adapters of `params` (a LoRA model's state, or its adapters alone) as a PEFT
    LoRA directory; `base` is recorded as base_model_name_or_path (the HF base dir)."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = {}
    for layer, module, proj, a, b in _entries(params):
        key = PREFIX + _hf_module(layer, module, proj)
        tensors[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, lora.rank).T)
        tensors[f"{key}.lora_B.weight"] = np.ascontiguousarray(b.reshape(lora.rank, -1).T)
    save_file(tensors, os.path.join(out_dir, WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "target_modules": sorted(lora_lib.TARGETS[t][1] for t in lora.targets),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:  # last: a complete directory
        json.dump(config, f, indent=2)


def read_config(peft_dir: str, lora: lora_lib.LoRAConfig) -> dict:
    """adapter_config.json, checked against model.lora.* (errors name the file and the key)."""
    path = os.path.join(peft_dir, CONFIG_FILE)
    try:
        with open(path) as f:
            config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable PEFT adapter config ({e})") from None
    want = {
        "peft_type": ("LORA", "a LoRA adapter"),
        "r": (lora.rank, "model.lora.rank"),
        "lora_alpha": (lora.alpha, "model.lora.alpha"),
    }
    for key, (value, what) in want.items():
        if config.get(key) != value:
            raise ValueError(f"{path}: {key}={config.get(key)!r}, but {what} is {value!r}")
    for key in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform"):
        if config.get(key):
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported (plain LoRA only)")
    if config.get("bias", "none") != "none" or config.get("modules_to_save"):
        raise ValueError(f"{path}: adapters that train biases or whole modules are not supported")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    ours = sorted(lora_lib.TARGETS[t][1] for t in lora.targets)
    if sorted(targets) != ours:
        raise ValueError(
            f"{path}: target_modules={sorted(targets)}, but model.lora.targets gives {ours}"
        )
    return config


_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.default)?\.weight$")


def load_adapters(peft_dir: str, adapters: nnx.State, lora: lora_lib.LoRAConfig):
    """`adapters` (a LoRA model's adapter state, placed) with the values of a PEFT directory:
    every adapter must be there with its shape, and nothing else."""
    read_config(peft_dir, lora)
    path = os.path.join(peft_dir, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing (the PEFT adapter weights)")
    with safe_open(path, framework="numpy") as f:
        stored = {}
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            m = _KEY.match(key)
            if not m:
                raise KeyError(f"{path}: unexpected key {key!r} (not a LoRA A/B weight)")
            stored[(m.group(1), m.group(2))] = f.get_tensor(key)
    used = set()

    def value(module_key: str, which: str, shape) -> np.ndarray:
        if (module_key, which) not in stored:
            raise KeyError(f"{path}: {module_key}.lora_{which}.weight is missing")
        used.add((module_key, which))
        t = stored[(module_key, which)]
        r, rest = lora.rank, int(np.prod(shape)) // lora.rank
        want = (r, rest) if which == "A" else (rest, r)
        if tuple(t.shape) != want:
            raise ValueError(
                f"{path}: {module_key}.lora_{which}.weight has shape {t.shape}, {want} expected"
            )
        return t.T.reshape(shape)  # A: [R, I] -> [*I, R]; B: [O, R] -> [R, *O]

    out = []
    for p, var in nnx.to_flat_state(adapters):
        name, module = p[-1], p[-2]
        proj, which = name.rsplit("_lora_", 1)
        which = which.upper()
        shape = var.get_value().shape
        if isinstance(p[1], int):
            v = value(_hf_module(p[1], module, proj), which, shape)
        else:  # scan_layers: stack the layers
            v = np.stack(
                [value(_hf_module(i, module, proj), which, shape[1:]) for i in range(shape[0])]
            )
        v = jax.device_put(v.astype(var.get_value().dtype), var.get_value().sharding)
        out.append((p, var.replace(v)))
    left = sorted(set(stored) - used)
    if left:
        raise KeyError(f"{path}: {left[0][0]}.lora_{left[0][1]}.weight matches no adapter here")
    return nnx.from_flat_state(out)


def save_merged(params: nnx.State, lora: lora_lib.LoRAConfig, cfg, out_dir: str):
    """A plain HF checkpoint of base + adapters merged, W + (alpha / r) · A B (what
    transformers loads without peft). `params`: a LoRA model's whole state."""
    merged = lora_lib.merged_base(params, lora)
    stacked = not any(isinstance(p[1], int) for p, _ in nnx.to_flat_state(merged) if len(p) > 1)
    build = lambda: registry.of(cfg).build(cfg, rngs=nnx.Rngs(0), scan_layers=stacked)
    model = nnx.merge(nnx.split(nnx.eval_shape(build), nnx.Param)[0], merged)
    hf_io.save_model(model, out_dir)


def fingerprint(hf_dir: str) -> dict:
    """What identifies a base checkpoint cheaply: the sha256 of its config.json and the names and
    sizes of its files (a LoRA checkpoint holds adapters only; resuming checks its base)."""
    if not hf_dir:
        return {}
    with open(os.path.join(hf_dir, "config.json"), "rb") as f:
        config = hashlib.sha256(f.read()).hexdigest()
    files = {
        name: os.path.getsize(os.path.join(hf_dir, name))
        for name in sorted(os.listdir(hf_dir))
        if name.endswith(".safetensors") or name == hf_io.INDEX_FILE
    }
    return {"config_sha256": config, "files": files}
