"""Shared by the loss tests: one compiled value-and-grad per (loss, static options)."""

import functools

import jax


@functools.cache
def jitted_loss_and_grad(fn, static):
    """jit of (logp, logp_old, mask, rewards, dynamic kwargs) -> (LossOutput, ∂loss_sum/∂logp);
    `static` is a hashable tuple of (name, value) options fixed at trace time."""

    def run(logp, logp_old, mask, rewards, dyn):
        def f(x):
            out = fn(x, logp_old, mask, rewards, **dict(static), **dyn)
            return out.loss_sum, out

        (_, out), grad = jax.value_and_grad(f, has_aux=True)(logp)
        return out, grad

    return jax.jit(run)
