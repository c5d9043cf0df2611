"""Loss families (one module each) and the α/τ schedule. Importing the package registers every
built-in objective; `registry.register` adds one from anywhere."""

from apo_jax.objectives import (  # noqa: F401  (registers)
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
from apo_jax.objectives.registry import Context, Objective, default_config, get, names, register

__all__ = ["Context", "Objective", "default_config", "get", "names", "register"]
