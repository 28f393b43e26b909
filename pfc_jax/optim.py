"""Optimizers, and the sparse-rows wrapper that updates only the sampled class centers.

A Partial FC step touches ``num_sample`` rows of each shard's centers. The dense way
(a C x D gradient, a momentum update over all rows) reads and writes every row every
step. :class:`SparseRows` instead applies an optax transform to the *gathered* rows and
the same rows of its state, then scatters both back in place:

* rows that were not sampled, and their optimizer state, do not change at all: no weight
  decay, no momentum drift (Partial FC v1 semantics; the reference's v2 moves them);
* state leaves that are not per-row (Adam's step ``count``, schedule counters) are
  shared by all rows and advance once per step, as with PyTorch's SparseAdam.

The transform must be **per-element** (SGD, momentum, weight decay, Adam/AdamW, LR
schedules). Transforms that look across elements (global-norm clipping) would see only
the sampled rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

PyTree = Any


def sgd(learning_rate, momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False):
    """SGD with momentum and coupled L2 weight decay (PyTorch's ``SGD(weight_decay=)``)."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
    )


def adamw(learning_rate, weight_decay: float = 0.05, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8):
    """AdamW with decoupled weight decay."""
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)


@dataclasses.dataclass(frozen=True)
class SparseRows:
    """Applies ``tx`` to selected rows of a matrix parameter and of its state.

    The methods work on one shard's local arrays (inside ``shard_map``) or on a whole
    unsharded matrix alike: ``gather`` and ``scatter`` take row indices into the given
    arrays, ``update`` works on whatever rows it is handed.
    """

    tx: optax.GradientTransformation

    def init(self, params: jax.Array) -> PyTree:
        return self.tx.init(params)

    @staticmethod
    def row_leaves(state: PyTree, params_shape: tuple[int, ...]) -> PyTree:
        """A bool per state leaf: True where the leaf has one row per parameter row."""
        return jax.tree.map(lambda leaf: tuple(jnp.shape(leaf)) == tuple(params_shape), state)

    @staticmethod
    def gather(params: jax.Array, state: PyTree, is_row: PyTree, index: jax.Array):
        """``params[index]`` and the same rows of every per-row state leaf."""
        take = lambda a: jnp.take(a, index, axis=0, mode="clip", indices_are_sorted=True)
        state_rows = jax.tree.map(lambda leaf, row: take(leaf) if row else leaf, state, is_row)
        return take(params), state_rows

    def update(self, grads: jax.Array, rows: jax.Array, state_rows: PyTree):
        """One step of ``tx`` on the gathered rows: (new rows, new state rows)."""
        updates, new_state_rows = self.tx.update(grads, state_rows, rows)
        return optax.apply_updates(rows, updates), new_state_rows

    @staticmethod
    def scatter(
        params: jax.Array,
        state: PyTree,
        is_row: PyTree,
        write_index: jax.Array,
        new_rows: jax.Array,
        new_state_rows: PyTree,
    ):
        """Writes rows back at ``write_index``; indices out of bounds are skipped.

        ``write_index`` must be unique (out-of-bounds entries too): the scatter is then
        an in-place row overwrite on a donated buffer with no atomics.
        """

        def put(a, rows):
            return a.at[write_index].set(rows.astype(a.dtype), mode="drop", unique_indices=True)

        new_state = jax.tree.map(
            lambda leaf, rows, row: put(leaf, rows) if row else rows, state, new_state_rows, is_row
        )
        return put(params, new_rows), new_state


def write_index(index: jax.Array, keep: jax.Array, num_rows: int) -> jax.Array:
    """``index`` where ``keep``, else a unique out-of-bounds row, for :meth:`SparseRows.scatter`."""
    return jnp.where(keep, index, num_rows + jnp.arange(index.shape[0], dtype=index.dtype))

