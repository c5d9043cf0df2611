"""Rollout: the functional KV cache, token sampling and the jitted prefill + decode sampler."""
