"""Partial FC's sampled rows, read and written one block at a time.

One shard's part of a Partial FC step touches ``num_sample`` rows of its centers three
times: for the cosines (logits), for the gradient w.r.t. the embeddings, and for the
update. Gathering them all at once (and their optimizer rows, their gradients, the new
rows) costs ~6 ``num_sample x D`` buffers beside the state. Here each pass walks the
sample in blocks of ``Blocks.size`` rows inside a loop: a block is gathered, normalized,
used and, in the update, written straight back into the donated centers and optimizer
rows. What lives across blocks is only ``[B_g, num_sample]`` (the cosines, then their
gradient) and the ``[B_g, D]`` embeddings, so the step's temporaries beyond the logits
are a few blocks, whatever the sample size.

The gradient w.r.t. the sampled rows never exists as one array: the loss is
differentiated w.r.t. the cosines (``[B_g, num_sample]``, the gradient Partial FC needs
anyway), and :func:`update` forms each block's row gradient from its slice of that and
the normalized embeddings, ``dW = G^T x``, just before the optimizer uses it.

Centers and optimizer rows may be stored in bfloat16 (:mod:`pfc_jax.heads.storage`):
every block is widened to float32 for the arithmetic and rounded on write.

Everything here runs on one shard's local arrays (inside ``shard_map``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from pfc_jax.heads import storage
from pfc_jax.optim import SparseRows

PyTree = Any

# Rows per block when the head does not choose: big enough that each block's three
# matmuls ([B, D] x [D, rows]) run at full speed, small enough that a block's buffers
# stay in cache and far below the logits.
DEFAULT_BLOCK_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class Blocks:
    """How a shard's ``num_sample`` columns are split: ``count`` blocks of ``size`` rows;
    the last ``count * size - num_sample`` columns pad the last block (inactive)."""

    size: int
    count: int

    @property
    def columns(self) -> int:
        return self.size * self.count


def plan(num_sample: int, block_rows: int = 0) -> Blocks:
    """Equal blocks of at most ``block_rows`` rows (0: :data:`DEFAULT_BLOCK_ROWS`) covering
    ``num_sample`` columns with less than one row of padding per block."""
    limit = block_rows or DEFAULT_BLOCK_ROWS
    count = max(1, math.ceil(num_sample / limit))
    return Blocks(size=math.ceil(num_sample / count), count=count)


def l2_normalize(x: jax.Array) -> jax.Array:
    # rsqrt of a floored squared norm: zero rows (padding) give zeros and finite
    # gradients, where x / max(norm, eps) would give 0 * inf in the backward pass.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def _normalized(rows: jax.Array, dtype) -> jax.Array:
    """Rows as the logits use them: normalized in float32, then cast to ``dtype``."""
    return l2_normalize(rows.astype(jnp.float32)).astype(dtype)


def _block(x: jax.Array, i) -> jax.Array:
    """Block ``i`` of a block-major array ([count, ...])."""
    return jax.lax.dynamic_index_in_dim(x, i, keepdims=False)


def _take(a: jax.Array, index: jax.Array) -> jax.Array:
    """Stored rows ``a[index]`` (sorted indices) as float32."""
    return storage.widen(jnp.take(a, index, axis=0, mode="clip", indices_are_sorted=True))


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


def cosines(x: jax.Array, centers: jax.Array, index: jax.Array, offset: jax.Array, blocks: Blocks, dtype) -> jax.Array:
    """f32[count, B, size]: block ``k`` is ``x @ normalize(centers[index[k]]).T + offset[k]``.

    ``x`` [B, D] holds normalized embeddings already in ``dtype``; ``index`` is
    i32[count, size]. Differentiable w.r.t. ``x`` and ``offset`` (whose gradient is the
    cosines'): the backward pass reads the rows again, block by block, instead of keeping
    them. The centers are not differentiated (their update, :func:`update`, works from the
    offset's gradient), and that gradient depends on ``x``'s, so an update of the centers
    in place is ordered after every read of them here.
    """
    return _cosines(blocks, jnp.dtype(dtype), x, centers, index, offset)


def _rows(centers, index, i, dtype):
    return _normalized(_take(centers, _block(index, i)), dtype)


def _cosines_forward(blocks: Blocks, dtype, x, centers, index, offset):
    def body(i, out):
        return jax.lax.dynamic_update_index_in_dim(out, _dot("bd,nd->bn", x, _rows(centers, index, i, dtype)), i, 0)

    # zeros_like(index): the loop's carry varies over the mesh axis like its body's values.
    out = jnp.zeros_like(index, shape=(blocks.count, x.shape[0], blocks.size), dtype=jnp.float32)
    return jax.lax.fori_loop(0, blocks.count, body, out) + offset


def _cosines_residuals(blocks: Blocks, dtype, x, centers, index, offset):
    return _cosines_forward(blocks, dtype, x, centers, index, offset), (x, centers, index)


def _cosines_backward(blocks: Blocks, dtype, residuals, g):
    x, centers, index = residuals

    def body(i, dx):
        return dx + _dot("bn,nd->bd", _block(g, i), _rows(centers, index, i, dtype).astype(jnp.float32))

    dx = jax.lax.fori_loop(0, blocks.count, body, jnp.zeros_like(index, shape=x.shape, dtype=jnp.float32))
    # The offset's gradient depends on dx, so the centers' update (which reads it) runs after
    # this loop's reads of the centers; XLA would copy them otherwise. A non-finite dx (a
    # step the trainer refuses anyway) turns the rows' update non-finite too.
    g = jnp.where(jnp.isfinite(jnp.sum(dx)), g, jnp.nan)
    return dx.astype(x.dtype), None, None, g


_cosines = jax.custom_vjp(_cosines_forward, nondiff_argnums=(0, 1))
_cosines.defvjp(_cosines_residuals, _cosines_backward)


def row_gradient(rows: jax.Array, grad_cos: jax.Array, x: jax.Array, dtype) -> jax.Array:
    """f32[n, D]: the gradient w.r.t. ``rows`` (f32[n, D], before normalization) of a loss
    whose gradient w.r.t. the cosines ``x @ normalize(rows).T`` is ``grad_cos`` [B, n]."""
    w, normalize_vjp = jax.vjp(lambda w: _normalized(w, dtype), rows)
    (grads,) = normalize_vjp(_dot("bn,bd->nd", grad_cos, x.astype(jnp.float32)).astype(w.dtype))
    return grads


def update(
    centers: jax.Array,
    opt_state: PyTree,
    *,
    sparse: SparseRows,
    index: jax.Array,
    write_index: jax.Array,
    grad_cos: jax.Array,
    x: jax.Array,
    blocks: Blocks,
    dtype,
    rounding: str = "nearest",
    key: jax.Array | None = None,
):
    """The optimizer step on the sampled rows, block by block, written back in place.

    Args:
      centers, opt_state: the shard's centers and optimizer state (donated buffers).
      sparse: the rows optimizer.
      index: i32[count, size] rows of the sample; ``write_index`` the same where the row
        is updated, a unique out-of-bounds row elsewhere (see :func:`pfc_jax.optim.write_index`).
      grad_cos: f32[count, B, size], the loss's gradient w.r.t. the cosines.
      x: [B, D] the normalized embeddings the cosines were computed from (in ``dtype``).
      dtype: the logits' operand dtype (each row gradient is rounded to it, as autodiff of
        the cast does).
      rounding, key: how rows are rounded to a bfloat16 storage (:func:`pfc_jax.heads.storage.narrow`;
        ``key`` for stochastic rounding).

    Returns:
      ``(centers, opt_state)``: same dtypes, rows outside ``write_index`` unchanged;
      leaves shared by all rows (Adam's count) advanced once.
    """
    is_row = SparseRows.row_leaves(opt_state, centers.shape)
    widen = lambda tree: jax.tree.map(lambda a, r: storage.widen(a) if r else a, tree, is_row)
    num_written = 1 + sum(jax.tree.leaves(is_row))

    def body(i, carry):
        centers, state = carry
        # Every block starts from the old shared leaves, so they advance once per step.
        state = jax.tree.map(lambda a, old, r: a if r else old, state, opt_state, is_row)
        rows, state_rows = SparseRows.gather(centers, state, is_row, _block(index, i))
        rows = storage.widen(rows)
        grads = row_gradient(rows, _block(grad_cos, i), x, dtype)
        new_rows, new_state_rows = sparse.update(grads, rows, widen(state_rows))
        keys = None if key is None else jax.random.split(jax.random.fold_in(key, i), num_written)
        store = lambda new, stored, leaf: storage.narrow(
            new, stored.dtype, rounding, None if keys is None else keys[leaf]
        )
        return SparseRows.scatter(centers, state, is_row, _block(write_index, i), new_rows, new_state_rows, store)

    return jax.lax.fori_loop(0, blocks.count, body, (centers, opt_state))
