"""apo_jax: Alpha-Divergence Preference Optimization (APO) and its baselines in JAX / Flax NNX.

Package floors (each imports only from floors below it):
  infra/       sharding tables and meshes, multi-host start-up, checkpoints, metrics files
  models/      model families as plug-ins (Qwen3, Qwen2 / Qwen2.5), HF safetensors in and out
  rollout/     KV cache, token sampling, the jitted sampler
  objectives/  loss families as plug-ins (APO, f-div, GRPO, DAPO, Dr.GRPO, GSPO), α/τ schedule
  tasks/       tasks as plug-ins (toy, MATH), datasets, verified rewards
  trainer/     the build boundary (config -> objects), train step, loop, evaluation
  main.py, evaluate.py, sweep.py   command lines

Shape alphabet (every shape comment and einsum in the package; one meaning per letter):
  P prompts, G completions per prompt (group size), B rows (= P·G, or any batch of sequences),
  T tokens: Tp prompt, Tc completion, T a whole row (Tp + Tc, or a packed row), S key-value
  positions (cache slots / keys), V vocabulary, D model width, N query heads, K kv heads,
  R query heads per kv head (N = K·R), H head dim, F MLP width, L layers, C vocabulary chunk,
  M micro-batches of an update, Z decode slots (continuous rollout engine); a flattened
  product is written with a dot, [B·T, C].
  LoRA: I, O a projection's input and output features, r the adapter rank.
"""

from apo_jax.models.hf_io import load_model, load_qwen3, save_model, save_qwen3
from apo_jax.models.qwen2 import Qwen2Config
from apo_jax.models.qwen3 import Qwen3, Qwen3Config, init_model

__all__ = [
    "Qwen2Config",
    "Qwen3",
    "Qwen3Config",
    "init_model",
    "load_model",
    "load_qwen3",
    "save_model",
    "save_qwen3",
]
