"""Loss families (one module each) and the α/τ schedule. `OBJECTIVES` lists them: a new loss is
one module that declares an `Objective` and one line here."""

import ml_collections

from apo_jax.objectives import (
    alpha_dpg,
    apo,
    cispo,
    clip_cov,
    dapo,
    dr_grpo,
    fdiv,
    grpo,
    gspo,
    kl_cov,
    sapo,
    tpo,
)
from apo_jax.objectives.registry import Context, Objective

# config.loss.name -> the objective (in this order in listings and config.loss).
OBJECTIVES: dict[str, Objective] = {
    m.OBJECTIVE.name: m.OBJECTIVE
    for m in (alpha_dpg, apo, cispo, clip_cov, grpo, dapo, dr_grpo, fdiv, gspo, kl_cov, sapo, tpo)
}


def names() -> tuple[str, ...]:
    return tuple(OBJECTIVES)


def get(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"config.loss.name={name!r}: unknown loss; valid: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def default_config(name: str = "apo") -> ml_collections.ConfigDict:
    """`config.loss`: the chosen name and one block per objective."""
    c = ml_collections.ConfigDict()
    c.name = name
    for obj in OBJECTIVES.values():
        c[obj.name] = ml_collections.ConfigDict(dict(obj.defaults))
    return c


__all__ = ["OBJECTIVES", "Context", "Objective", "default_config", "get", "names"]
