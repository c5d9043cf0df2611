"""Test set-up: 8 fake CPU devices (for mesh tests) and shared fixtures."""

import os

# Must happen before jax initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Many tests build the same programs (one step of each config, resume runs, subprocess runs):
# a persistent compilation cache turns the repeats into cache hits, also across xdist workers.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(__file__)), ".pytest_cache", "jax"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# With the `tpu` extra installed (tests/test_tpu_compile.py), libtpu starts with JAX's backends:
# keep it offline and quiet on a host without TPU chips.
from apo_jax.infra import targets  # noqa: E402  (imports no JAX)

targets.prepare_offline()

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """../shared/data beside the checkout (real MATH files and the Qwen3 tokenizer)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not found: these tests read the shared data directory")
    return SHARED_DATA


@pytest.fixture(scope="session")
def hf_tiny(tmp_path_factory):
    """Factory: a tiny random transformers Qwen3, save_pretrained -> (dir, torch model)."""
    torch = pytest.importorskip("torch", reason="torch is needed for parity with transformers")
    transformers = pytest.importorskip("transformers")
    cache = {}

    def make(max_shard_size=None, **overrides):
        key = (max_shard_size, tuple(sorted(overrides.items())))
        if key not in cache:
            kw = dict(
                vocab_size=256,
                hidden_size=64,
                intermediate_size=96,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                tie_word_embeddings=True,
                rope_theta=1e6,
            )
            kw.update(overrides)
            torch.manual_seed(len(cache))
            model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw)).eval()
            path = tmp_path_factory.mktemp("hf_qwen3")
            extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
            model.save_pretrained(path, **extra)
            cache[key] = (path, model)
        return cache[key]

    return make
