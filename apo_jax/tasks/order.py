"""The data order: a stateless, checkpointable shuffled order over epochs (a pure function of
(n, seed, position)) and each process's contiguous share of a global batch."""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of range(n) used in `epoch`; a pure function of (n, seed, epoch)."""
    if n < 1 or epoch < 0:
        raise ValueError(f"epoch_order: need n >= 1 and epoch >= 0, got n={n}, epoch={epoch}")
    order = np.random.default_rng((seed, epoch)).permutation(n)
    order.setflags(write=False)  # cached: callers must not be able to corrupt it
    return order


def global_batch_indices(n: int, seed: int, position: int, batch_size: int) -> np.ndarray:
    """Dataset indices of the global batch that starts after `position` examples were consumed.

    `position` (an int saved in checkpoints) counts examples over all epochs; a batch that
    crosses an epoch boundary takes the end of one epoch's order and the start of the next."""
    if n < 1 or position < 0 or batch_size < 1:
        raise ValueError(
            f"global_batch_indices: need n >= 1, position >= 0 and batch_size >= 1, got "
            f"n={n}, position={position}, batch_size={batch_size}"
        )
    pos = np.arange(position, position + batch_size)
    epochs, offsets = np.divmod(pos, n)
    out = np.empty(batch_size, dtype=np.int64)
    for e in np.unique(epochs):
        sel = epochs == e
        out[sel] = epoch_order(n, seed, int(e))[offsets[sel]]
    return out


def process_slice(indices: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous share of a global batch (matches a batch axis sharded over
    processes in order)."""
    indices = np.asarray(indices)
    if not 0 <= process_index < process_count or len(indices) % process_count:
        raise ValueError(
            f"process_slice: batch of {len(indices)} cannot be split evenly over "
            f"{process_count} processes (process_index={process_index})"
        )
    per = len(indices) // process_count
    return indices[process_index * per : (process_index + 1) * per]
