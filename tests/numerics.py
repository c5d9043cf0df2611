"""Float tolerances derived from the scale of what is summed (the rule is in tests/README.md).

A float sum of n terms, in any order (serial, pairwise, tree, per-core partial sums — XLA:CPU
picks the order per CPU model and thread count), is off by at most (n − 1)·u·Σ|xᵢ| with
u = eps/2 (Higham, *Accuracy and Stability of Numerical Algorithms*, §4.2). So a value that is
a sum with cancellation (a centred-advantage loss, a difference, a mean near zero) is only known
to k·eps·Σ|terms|, however small the value itself: compare it with an absolute tolerance of that
size, never a relative one.
"""

import numpy as np


def scale_atol(terms, *, k: float | None = None, dtype=np.float32) -> float:
    """k·eps(dtype)·Σ|terms|: the absolute error a float sum of `terms` can carry.

    `terms` are the signed summands of the compared quantity *with their weights* (e.g. the
    per-token losses times 1/#tokens for a token mean). Default k = n = terms.size: (n − 1)·eps/2
    covers the summation in any order, and the remaining ≈ n·eps/2 covers each term's own
    rounding (a few eps for the elementwise exp/log/clip that made it). Pass a larger k where a
    term carries more (say a forward pass), and say why at the call site.
    """
    terms = np.abs(np.asarray(terms, np.float64))
    k = terms.size if k is None else k
    return float(k * np.finfo(dtype).eps * terms.sum())


def assert_close_to_scale(actual, expected, terms, *, k: float | None = None, dtype=np.float32):
    """|actual − expected| ≤ scale_atol(terms, k, dtype); the message gives the scale."""
    atol = scale_atol(terms, k=k, dtype=dtype)
    diff = np.abs(np.asarray(actual, np.float64) - np.asarray(expected, np.float64))
    assert np.all(diff <= atol), (
        f"|actual − expected| = {diff.max():.3g} > atol {atol:.3g} "
        f"(k={k or np.size(terms)} · eps · Σ|terms| = {np.abs(terms).sum():.3g}); "
        f"actual {np.asarray(actual)}, expected {np.asarray(expected)}"
    )
