"""The sparse-rows optimizer wrapper against dense optax."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pfc_jax import optim
from pfc_jax.optim import SparseRows, write_index

TRANSFORMS = {
    "sgd_momentum_wd": optim.sgd(0.1, momentum=0.9, weight_decay=5e-4),
    "adamw": optim.adamw(1e-3, weight_decay=0.05),
    "adamw_schedule": optim.adamw(optax.linear_schedule(1e-3, 1e-4, 10), weight_decay=0.05),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_sampled_rows_match_dense_update_others_unchanged(name):
    tx = TRANSFORMS[name]
    sparse = SparseRows(tx)
    key = jax.random.key(0)
    params = jax.random.normal(key, (20, 4))
    state = sparse.init(params)
    # A few dense steps first so that moments and counts are nonzero.
    for i in range(3):
        g = jax.random.normal(jax.random.fold_in(key, i), params.shape)
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)

    index = jnp.array([1, 4, 5, 11, 17, 19], jnp.int32)
    keep = jnp.array([True, True, False, True, True, True])  # row 5 is drawn but inactive
    grads = jax.random.normal(jax.random.fold_in(key, 99), (6, 4))
    is_row = SparseRows.row_leaves(state, params.shape)

    @jax.jit
    def step(params, state):
        rows, state_rows = SparseRows.gather(params, state, is_row, index)
        new_rows, new_state_rows = sparse.update(grads, rows, state_rows)
        return SparseRows.scatter(params, state, is_row, write_index(index, keep, 20), new_rows, new_state_rows)

    new_params, new_state = step(params, state)

    # Reference: the plain transform on just the kept rows.
    kept = np.asarray(index)[np.asarray(keep)]
    ref_state_rows = jax.tree.map(lambda leaf, r: leaf[kept] if r else leaf, state, is_row)
    updates, ref_new_state = tx.update(grads[np.asarray(keep)], ref_state_rows, params[kept])
    np.testing.assert_allclose(new_params[kept], params[kept] + updates, rtol=1e-6, atol=1e-7)
    others = np.setdiff1d(np.arange(20), kept)
    np.testing.assert_array_equal(new_params[others], params[others])
    for leaf, ref_leaf, old_leaf, row in zip(
        jax.tree.leaves(new_state),
        jax.tree.leaves(ref_new_state),
        jax.tree.leaves(state),
        jax.tree.leaves(is_row),
    ):
        if row:
            np.testing.assert_allclose(leaf[kept], ref_leaf, rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(leaf[others], old_leaf[others])
        else:  # shared scalars (Adam's count) advance once per step
            np.testing.assert_array_equal(leaf, ref_leaf)
    assert any(jax.tree.leaves(is_row))
