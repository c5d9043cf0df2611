"""apo_jax: Alpha-Divergence Preference Optimization (APO) and baselines for Qwen3 in JAX."""

from apo_jax.hf_io import load_qwen3, save_qwen3
from apo_jax.model import Qwen3, Qwen3Config, init_model

__all__ = ["Qwen3", "Qwen3Config", "init_model", "load_qwen3", "save_qwen3"]
