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
        store=lambda rows, stored, leaf: rows.astype(stored.dtype),
    ):
        """Writes rows back at ``write_index``; indices out of bounds are skipped.

        ``write_index`` must be unique (out-of-bounds entries too): the scatter is then
        an in-place row overwrite on a donated buffer with no atomics. ``store(rows,
        stored, leaf)`` converts the new rows of the ``leaf``-th written array (0: the
        params, then the per-row state leaves in order) to the form of ``stored`` (default:
        its dtype, rounded to nearest).
        """
        leaves = iter(range(1, 1 + len(jax.tree.leaves(new_state_rows))))

        def put(a, rows, leaf):
            return a.at[write_index].set(store(rows, a, leaf), mode="drop", unique_indices=True)

        new_state = jax.tree.map(
            lambda leaf, rows, row: put(leaf, rows, next(leaves)) if row else rows, state, new_state_rows, is_row
        )
        return put(params, new_rows, 0), new_state


def write_index(index: jax.Array, keep: jax.Array, num_rows: int) -> jax.Array:
    """``index`` where ``keep``, else a unique out-of-bounds row, for :meth:`SparseRows.scatter`."""
    return jnp.where(keep, index, num_rows + jnp.arange(index.shape[0], dtype=index.dtype))


# ---- from the run config -----------------------------------------------------------------


def _polynomial(config, peak: float, decay_steps: int, after_warmup) -> optax.Schedule:
    end = config.schedule.end_lr_factor * peak
    return optax.polynomial_schedule(peak, end, config.schedule.power, decay_steps)


def _cosine(config, peak: float, decay_steps: int, after_warmup) -> optax.Schedule:
    return optax.cosine_decay_schedule(peak, decay_steps, alpha=config.schedule.end_lr_factor)


def _constant(config, peak: float, decay_steps: int, after_warmup) -> optax.Schedule:
    return optax.constant_schedule(peak)


def _step(config, peak: float, decay_steps: int, after_warmup) -> optax.Schedule:
    factor = config.schedule.decay_factor
    return optax.piecewise_constant_schedule(peak, {after_warmup(m): factor for m in config.schedule.milestones})


# config.schedule.name -> (config, peak lr, decay steps, epochs -> steps after warmup) ->
# the schedule after warmup.
SCHEDULES = {"polynomial": _polynomial, "cosine": _cosine, "constant": _constant, "step": _step}


def schedule(config, *, total_steps: int, warmup_steps: int, steps_per_epoch: float = 1.0) -> optax.Schedule:
    """Linear warmup from 0 to ``config.optimizer.lr``, then ``SCHEDULES[config.schedule.name]``.

    Polynomial is ``lr * (1 - t)^power`` over the post-warmup fraction ``t`` (arcface_torch's
    PolyScheduler with power 2), floored at ``end_lr_factor * lr``; cosine decays to
    ``end_lr_factor * lr``; constant stays at ``lr``; step multiplies it by ``decay_factor``
    at each of ``milestones`` (epochs from the start of the run, ``steps_per_epoch`` steps
    each; insightface's MXNet recipes and MixFaceNets' decay this way).
    """
    peak = config.optimizer.lr
    after_warmup = lambda epochs: max(int(round(epochs * steps_per_epoch)) - warmup_steps, 0)
    decay = SCHEDULES[config.schedule.name](config, peak, max(total_steps - warmup_steps, 1), after_warmup)
    if warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, peak, warmup_steps)
    return optax.join_schedules([warmup, decay], [warmup_steps])


def _sgd(o, learning_rate, weight_decay: float) -> optax.GradientTransformation:
    return sgd(learning_rate, momentum=o.momentum, weight_decay=weight_decay, nesterov=o.nesterov)


def _adamw(o, learning_rate, weight_decay: float) -> optax.GradientTransformation:
    return adamw(learning_rate, weight_decay=weight_decay, b1=o.b1, b2=o.b2, eps=o.eps)


# config.optimizer.name -> (config.optimizer, lr, weight decay) -> transform.
OPTIMIZERS = {"sgd": _sgd, "adamw": _adamw}


def _make(config, learning_rate, weight_decay: float) -> optax.GradientTransformation:
    return OPTIMIZERS[config.optimizer.name](config.optimizer, learning_rate, weight_decay)


def backbone_optimizer(config, learning_rate) -> optax.GradientTransformation:
    """Global-norm clipping (if enabled), then SGD or AdamW with the backbone's weight decay."""
    tx = _make(config, learning_rate, config.optimizer.weight_decay)
    if config.optimizer.clip_grad_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(config.optimizer.clip_grad_norm), tx)
    return tx


def head_optimizer(config, learning_rate) -> optax.GradientTransformation:
    """The same optimizer for the class centers, with their own weight decay, no clipping
    (it would see only the sampled rows; see :class:`SparseRows`)."""
    return _make(config, learning_rate, config.head.weight_decay)
