"""The model families, one line each, and lookups by config.json, preset name or config type."""

from __future__ import annotations

import os
from collections.abc import Mapping

from apo_jax.models import family, qwen2, qwen3

FAMILIES: dict[str, family.Family] = {
    qwen3.FAMILY.name: qwen3.FAMILY,
    qwen2.FAMILY.name: qwen2.FAMILY,
}


def supported() -> str:
    return "; ".join(f.describe() for f in FAMILIES.values())


def for_hf(hf: Mapping, where: str) -> family.Family:
    """The family a config.json dict names: `architectures` first, then `model_type`."""
    arch = list(hf.get("architectures") or [])
    for f in FAMILIES.values():
        if any(a in f.architectures for a in arch):
            return f
    for f in FAMILIES.values():
        if hf.get("model_type") in f.model_types:
            return f
    raise family.config_error(
        where,
        "model_type",
        f"is {hf.get('model_type')!r} (architectures={arch}); supported model families: "
        f"{supported()}",
    )


def config_from_hf(source: str | os.PathLike | Mapping) -> family.ModelConfig:
    """A model directory's (or config.json path's, or dict's) architecture, any family."""
    if not isinstance(source, Mapping) and os.path.isdir(source):
        source = os.path.join(source, "config.json")
    hf, where = family.read_config(source)
    return for_hf(hf, where).config.from_hf(hf, where)


def presets() -> dict[str, family.Family]:
    """Preset name -> family, over all families (names are unique across families)."""
    out: dict[str, family.Family] = {}
    for f in FAMILIES.values():
        for name in f.presets:
            assert name not in out, f"preset {name!r} is defined by {out[name].name} and {f.name}"
            out[name] = f
    return out


def preset(name: str) -> family.ModelConfig:
    table = presets()
    if name not in table:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(table)}")
    return table[name].presets[name]()


def of(cfg: family.ModelConfig) -> family.Family:
    """The family of a config object (by its class)."""
    for f in FAMILIES.values():
        if type(cfg) is f.config:
            return f
    raise TypeError(
        f"{type(cfg).__name__} is not a registered family's config; families: {supported()}"
    )
