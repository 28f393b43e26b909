"""The sharded Partial FC head against a dense single-device reference."""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pfc_jax import optim, sharding
from pfc_jax.heads import margins, storage
from pfc_jax.heads.partial_fc import PartialFC
from pfc_jax.optim import SparseRows
from tests import reference

NUM_CLASSES = 37  # not divisible by 2, 4 or 8
DIM = 16
BATCH = 16

MARGINS = {
    "arcface": (margins.arcface(), dict(m1=1.0, m2=0.5, m3=0.0)),
    "cosface": (margins.cosface(), dict(m1=1.0, m2=0.0, m3=0.4)),
    "combined": (margins.CombinedMargin(m1=1.2, m2=0.3, m3=0.2), dict(m1=1.2, m2=0.3, m3=0.2)),
}


def make_head(num_devices, rate, margin, optimizer=None, num_classes=NUM_CLASSES, dim=DIM):
    devices = jax.devices()
    assert len(devices) >= num_devices, f"needs {num_devices} devices; conftest fakes 8 CPU ones"
    mesh = sharding.make_mesh(devices[:num_devices])
    return PartialFC(
        mesh,
        num_classes=num_classes,
        embedding_dim=dim,
        sample_rate=rate,
        margin=margin,
        optimizer=optimizer or optax.sgd(1.0),
    )


def inputs(head, seed=0, batch=BATCH):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    embeddings = jax.random.normal(k1, (batch, head.embedding_dim))
    labels = jax.random.randint(k2, (batch,), 0, head.num_classes)
    shard = sharding.batch_sharding(head.mesh)
    state = head.init(k3, std=1.0)
    return state, jax.device_put(embeddings, shard), jax.device_put(labels, shard)


def head_loss_and_grads(head, state, embeddings, labels, key):
    """Loss and gradients w.r.t. the embeddings and the sampled rows, plus the sample.

    The loss is differentiated w.r.t. the embeddings and its cosines (as the step does);
    the rows' gradient is formed from the cosines' gradient by ``row_gradients``."""

    @jax.jit
    def run(state, embeddings, labels, key):
        sample = head.sample(labels, key)
        offset = head.zero_cos_offset(labels.shape[0])
        (loss, metrics), (g_emb, g_cos) = jax.value_and_grad(head.loss, argnums=(1, 3), has_aux=True)(
            state.centers, embeddings, sample, offset
        )
        return loss, metrics, (g_emb, head.row_gradients(state.centers, embeddings, sample, g_cos)), sample

    return run(state, embeddings, labels, key)


def global_classes(head, sample):
    """Class id of every sampled column, -1 for inactive ones (numpy)."""
    index = np.asarray(sample.index).reshape(head.num_shards, -1)
    active = np.asarray(sample.active).reshape(head.num_shards, -1)
    classes = index + head.num_local * np.arange(head.num_shards)[:, None]
    return np.where(active, classes, -1).reshape(-1)


@pytest.mark.parametrize("margin_name", ["arcface", "cosface", "combined"])
@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_full_softmax_equals_dense_reference(num_devices, margin_name):
    margin, ref_margin = MARGINS[margin_name]
    head = make_head(num_devices, 1.0, margin)
    state, embeddings, labels = inputs(head)
    loss, metrics, (g_emb, g_rows), sample = head_loss_and_grads(head, state, embeddings, labels, jax.random.key(1))

    centers = np.asarray(state.centers)[:NUM_CLASSES]
    ref = lambda e, w: reference.dense_loss(e, w, labels, **ref_margin)
    ref_loss, (ref_g_emb, ref_g_centers) = jax.value_and_grad(ref, argnums=(0, 1))(np.asarray(embeddings), centers)

    # rate 1: every real row is sampled, in order; padding rows are inactive.
    np.testing.assert_array_equal(global_classes(head, sample)[:NUM_CLASSES], np.arange(NUM_CLASSES))
    assert (global_classes(head, sample)[NUM_CLASSES:] == -1).all()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(g_emb, ref_g_emb, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_rows)[:NUM_CLASSES], ref_g_centers, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(g_rows)[NUM_CLASSES:], 0.0)
    assert int(metrics["sampled_classes"]) == NUM_CLASSES
    assert int(metrics["invalid_labels"]) == 0


@pytest.mark.parametrize("gradient", ["exact", "straight_through"])
def test_arcface_torch_margin_semantics_match_dense_reference(gradient):
    """past_critical="cos" through the whole head, with target angles past pi - m."""
    margin = margins.arcface(past_critical="cos", gradient=gradient)
    head = make_head(4, 1.0, margin)
    state, embeddings, labels = inputs(head, seed=2)
    centers = np.asarray(state.centers)[:NUM_CLASSES]
    # Half the rows point away from their own center: target angles near pi.
    flip = np.where(np.arange(BATCH) % 2 == 0, -1.0, 1.0)[:, None]
    emb = np.where(flip < 0, -centers[np.asarray(labels)] + 0.1 * np.asarray(embeddings), np.asarray(embeddings))
    embeddings = jax.device_put(jnp.asarray(emb, jnp.float32), sharding.batch_sharding(head.mesh))
    loss, _, (g_emb, g_rows), _ = head_loss_and_grads(head, state, embeddings, labels, jax.random.key(1))

    x, w = emb / np.linalg.norm(emb, axis=1, keepdims=True), centers / np.linalg.norm(centers, axis=1, keepdims=True)
    target_cos = np.sum(x * w[np.asarray(labels)], axis=1)
    assert (target_cos < -math.cos(0.5)).sum() >= BATCH // 4  # theta + m > pi for these rows

    ref = lambda e, c: reference.dense_loss(
        e, c, labels, m2=0.5, past="cos", straight_through=gradient == "straight_through"
    )
    ref_loss, (ref_g_emb, ref_g_centers) = jax.value_and_grad(ref, argnums=(0, 1))(emb, centers)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(g_emb, ref_g_emb, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_rows)[:NUM_CLASSES], ref_g_centers, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "num_devices,rate,one_shard", [(1, 0.0, False), (1, 0.3, False), (4, 0.0, False), (4, 0.3, False), (4, 0.0, True)]
)
def test_sampled_loss_equals_dense_reference_on_sampled_columns(num_devices, rate, one_shard):
    head = make_head(num_devices, rate, margins.arcface())
    state, embeddings, labels = inputs(head, seed=3)
    if one_shard:  # every label on shard 0: at rate 0 the other shards use no column at all
        labels = labels % head.num_local
    loss, metrics, (g_emb, g_rows), sample = head_loss_and_grads(head, state, embeddings, labels, jax.random.key(7))

    classes = global_classes(head, sample)
    used = classes[classes >= 0]
    centers = np.asarray(state.centers)
    remap = {c: i for i, c in enumerate(used)}
    ref_labels = jnp.array([remap[int(c)] for c in np.asarray(labels)])
    ref = lambda e, w: reference.dense_loss(e, w, ref_labels)
    ref_loss, (ref_g_emb, ref_g_used) = jax.value_and_grad(ref, argnums=(0, 1))(np.asarray(embeddings), centers[used])

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(g_emb, ref_g_emb, rtol=1e-5, atol=1e-6)
    g_rows = np.asarray(g_rows)
    np.testing.assert_allclose(g_rows[classes >= 0], ref_g_used, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(g_rows[classes < 0], 0.0)
    assert int(metrics["sampled_classes"]) == len(used)
    if rate == 0.0:
        assert set(used) == set(np.asarray(labels).tolist())


def test_bf16_embeddings_give_fp32_loss_close_to_fp32():
    head = make_head(4, 1.0, margins.arcface())
    state, embeddings, labels = inputs(head)
    key = jax.random.key(1)
    loss32, *_ = head_loss_and_grads(head, state, embeddings, labels, key)
    loss16, _, (g_emb, _), _ = head_loss_and_grads(head, state, embeddings.astype(jnp.bfloat16), labels, key)
    assert loss16.dtype == jnp.float32 and g_emb.dtype == jnp.bfloat16
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


@pytest.mark.parametrize("rate,tx_name", [(0.2, "sgd"), (0.2, "adamw"), (1.0, "sgd"), (0.0, "adamw")])
def test_step_sparse_update_matches_dense_optax_on_sampled_rows(rate, tx_name):
    """Two whole head steps: the used rows (and their optimizer state) move exactly as
    a dense optax update of just those rows; every other row and its state is
    bit-identical (at rate 1 those are the padding rows, which stay zero)."""
    tx = {
        "sgd": optim.sgd(0.1, momentum=0.9, weight_decay=5e-4),
        "adamw": optim.adamw(1e-2, weight_decay=0.05),
    }[tx_name]
    head = make_head(4, rate, margins.arcface(), optimizer=tx, num_classes=203)
    step = head.jit_step()
    state, embeddings, labels = inputs(head, seed=5)
    for i in range(2):
        key = jax.random.fold_in(jax.random.key(11), i)
        before = jax.tree.map(np.asarray, state)
        _, _, (_, g_rows), sample = head_loss_and_grads(head, state, embeddings, labels, key)
        state, _, metrics = step(state, embeddings, labels, key)
        after = jax.tree.map(np.asarray, state)

        classes = global_classes(head, sample)
        used = classes[classes >= 0]  # global row = class id for real rows
        untouched = np.setdiff1d(np.arange(head.num_classes_padded), used)
        is_row = jax.tree.leaves(SparseRows.row_leaves(before.opt_state, before.centers.shape))
        expected_update, expected_state = tx.update(
            jnp.asarray(np.asarray(g_rows)[classes >= 0]),
            jax.tree.map(lambda a: a[used] if a.shape == before.centers.shape else a, before.opt_state),  # noqa: B023
            jnp.asarray(before.centers[used]),
        )
        np.testing.assert_allclose(after.centers[used], before.centers[used] + expected_update, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(after.centers[untouched], before.centers[untouched])
        leaves = zip(
            is_row,
            jax.tree.leaves(before.opt_state),
            jax.tree.leaves(after.opt_state),
            jax.tree.leaves(expected_state),
        )
        assert any(is_row)
        for row, old, new, expected in leaves:
            if row:
                np.testing.assert_allclose(new[used], expected, rtol=1e-6, atol=1e-7)
                np.testing.assert_array_equal(new[untouched], old[untouched])
            else:  # shared (AdamW's count): advances once per step
                np.testing.assert_array_equal(new, expected)
        assert np.isfinite(float(metrics["loss"]))


def test_step_compiles_once_and_updates_in_place():
    head = make_head(8, 0.01, margins.arcface(), optimizer=optim.sgd(0.1, 0.9, 5e-4), num_classes=8 * 4096, dim=64)
    traced = chex.assert_max_traces(head.step, n=1)
    batch = sharding.batch_sharding(head.mesh)
    step = jax.jit(
        traced,
        in_shardings=(head.state_shardings(), batch, batch, sharding.replicated(head.mesh)),
        donate_argnums=(0,),
    )
    state, embeddings, labels = inputs(head)
    for i in range(3):
        state, _, metrics = step(state, embeddings + i, (labels + i) % head.num_classes, jax.random.key(i))
    assert np.isfinite(float(metrics["loss"]))

    # Memory: the only num_local x D buffers are the donated centers and momentum,
    # updated in place. Per device, temporaries stay far below one such buffer.
    row_bytes = head.num_local * head.embedding_dim * 4
    compiled = step.lower(state, embeddings, labels, jax.random.key(0)).compile()
    memory = compiled.memory_analysis()
    assert memory.alias_size_in_bytes >= 2 * row_bytes  # centers + momentum aliased
    assert memory.temp_size_in_bytes < row_bytes // 4, memory
    chex.clear_trace_counter()


def test_invalid_labels_are_counted_and_batch_must_divide():
    head = make_head(4, 1.0, margins.cosface())
    state, embeddings, labels = inputs(head)
    bad = labels.at[0].set(NUM_CLASSES).at[1].set(-1)  # just past the end: a padding row
    _, metrics, _, _ = head_loss_and_grads(head, state, embeddings, bad, jax.random.key(0))
    assert int(metrics["invalid_labels"]) == 2
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        head.sample(labels[:6], jax.random.key(0))


@pytest.mark.parametrize("num_devices,as_jax", [(8, False), (3, True)])
def test_init_from_centers_pads_places_and_trains(num_devices, as_jax):
    tx = optim.adamw(1e-2, weight_decay=0.05)  # per-row moments and a shared count
    head = make_head(num_devices, 0.5, margins.arcface(), optimizer=tx)
    given = np.random.default_rng(4).normal(size=(NUM_CLASSES, DIM))  # float64: stored as float32
    state = head.init_from_centers(jnp.asarray(given, jnp.float32) if as_jax else given)

    expected = np.zeros((head.num_classes_padded, DIM), np.float32)
    expected[:NUM_CLASSES] = given
    assert head.num_classes_padded > NUM_CLASSES  # there is padding to check
    assert state.centers.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(state.centers), expected)
    shardings = head.state_shardings()
    assert jax.tree.map(lambda a: a.sharding, state) == shardings
    assert len(state.centers.addressable_shards) == num_devices
    for shard in state.centers.addressable_shards:  # each device holds its own rows
        assert shard.data.shape == (head.num_local, DIM)
        np.testing.assert_array_equal(np.asarray(shard.data), expected[shard.index])
    fresh = head.init(jax.random.key(0)).opt_state
    chex.assert_trees_all_equal(jax.tree.map(np.asarray, state.opt_state), jax.tree.map(np.asarray, fresh))

    _, embeddings, labels = inputs(head, batch=2 * num_devices)
    new_state, _, metrics = head.jit_step()(state, embeddings, labels, jax.random.key(1))
    assert np.isfinite(float(metrics["loss"]))
    assert jax.tree.map(lambda a: a.sharding, new_state) == shardings
    centers = np.asarray(new_state.centers)
    assert not np.array_equal(centers[:NUM_CLASSES], expected[:NUM_CLASSES])  # it trained
    np.testing.assert_array_equal(centers[NUM_CLASSES:], 0.0)  # padding untouched


def test_init_from_centers_refuses_bad_centers():
    head = make_head(4, 1.0, margins.arcface())
    good = np.ones((NUM_CLASSES, DIM), np.float32)
    cases = [
        (good[:-1], r"has 36 rows but the head has num_classes=37; pass one row per class"),
        (np.ones((head.num_classes_padded, DIM)), r"has 40 rows .* padded HeadState.centers: pass its first 37"),
        (good[:, :8], r"has dimension 8 but the head has embedding_dim=16"),
        (good[0], r"must be a 2-D array \[num_classes, embedding_dim\] = \[37, 16\], got shape \[16\]"),
        (good.astype(bool), r"must be real numbers"),
        (np.where(np.arange(NUM_CLASSES)[:, None] == 5, np.nan, good), r"non-finite values .* in 1 rows, first row 5"),
        (np.full((NUM_CLASSES, DIM), 1e39), r"non-finite values .*too large for float32"),
    ]
    for centers, message in cases:
        with pytest.raises(ValueError, match=message):
            head.init_from_centers(centers)


def test_config_errors_name_the_field():
    mesh = sharding.make_mesh(jax.devices()[:2])
    with pytest.raises(ValueError, match="sample_rate must be in"):
        PartialFC(mesh, 10, 4, 1.5, margins.arcface(), optax.sgd(0.1))
    with pytest.raises(ValueError, match="num_classes"):
        PartialFC(mesh, 0, 4, 0.1, margins.arcface(), optax.sgd(0.1))


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_bfloat16_storage_trains_like_float32_storage(rounding):
    """Centers and momentum stored in bfloat16 (as uint16 bits), the arithmetic in float32:
    three steps from the same centers stay within bfloat16 rounding of the float32 head, in
    loss and in every center; the state stays bfloat16 and rows not sampled do not move."""
    tx = optim.sgd(0.1, momentum=0.9, weight_decay=5e-4)
    f32 = make_head(4, 0.3, margins.arcface(), optimizer=tx, num_classes=203)
    b16 = dataclasses.replace(f32, storage_dtype="bfloat16", storage_rounding=rounding)
    state32, embeddings, labels = inputs(f32, seed=6)
    state16 = b16.init_from_centers(np.asarray(state32.centers)[:203])
    as_f32 = lambda a: np.asarray(storage.widen(a))
    np.testing.assert_array_equal(as_f32(state16.centers), np.asarray(state32.centers.astype(jnp.bfloat16), np.float32))
    step32, step16 = f32.jit_step(), b16.jit_step()
    before = as_f32(state16.centers)
    for i in range(3):
        key = jax.random.fold_in(jax.random.key(3), i)
        state32, _, m32 = step32(state32, embeddings, labels, key)
        state16, _, m16 = step16(state16, embeddings, labels, key)
        np.testing.assert_allclose(float(m16["loss"]), float(m32["loss"]), rtol=1e-2)
    rows = [leaf for leaf in jax.tree.leaves(state16) if leaf.ndim == 2]
    assert len(rows) == 2 and all(leaf.dtype == jnp.uint16 for leaf in rows)  # centers and momentum
    after = as_f32(state16.centers)
    np.testing.assert_allclose(after, np.asarray(state32.centers), rtol=2e-2, atol=2e-2)
    moved = (after != before).any(axis=1)
    assert 0 < moved.sum() < 203  # rate 0.3 over three steps: some rows were never sampled
    np.testing.assert_array_equal(b16.class_weights(state16), after[:203])


def test_stochastic_rounding_keeps_updates_that_nearest_rounding_loses():
    """1.0 in bfloat16 plus 1e-3 (an eighth of its spacing) 200 times: rounding to nearest
    stalls at 1.0; stochastic rounding is unbiased and lands near 1.2."""
    bits = storage.stored_dtype("bfloat16")

    def run(rounding, key):
        def body(i, w):
            return storage.narrow(storage.widen(w) + 1e-3, bits, rounding, jax.random.fold_in(key, i))

        return storage.widen(jax.lax.fori_loop(0, 200, body, storage.narrow(jnp.ones((4096,)), bits)))

    nearest = np.asarray(jax.jit(run, static_argnums=0)("nearest", jax.random.key(0)))
    stochastic = np.asarray(jax.jit(run, static_argnums=0)("stochastic", jax.random.key(0)))
    np.testing.assert_array_equal(nearest, 1.0)
    assert abs(stochastic.mean() - 1.2) < 2e-3, stochastic.mean()
    x = jnp.asarray(np.random.default_rng(0).normal(size=4096), jnp.float32)
    np.testing.assert_array_equal(storage.widen(storage.narrow(x, bits)), x.astype(jnp.bfloat16).astype(jnp.float32))
    grid = x.astype(jnp.bfloat16).astype(jnp.float32)  # already representable: unchanged
    np.testing.assert_array_equal(storage.widen(storage.narrow(grid, bits, "stochastic", jax.random.key(1))), grid)
    # Each value rounds to one of its two neighbours, up with the right frequency.
    y = jnp.full((100_000,), 1.0 + 2**-9, jnp.float32)  # a quarter of the way from 1.0 to 1.0078125
    up = np.asarray(storage.widen(storage.narrow(y, bits, "stochastic", jax.random.key(2)))) > 1.0
    assert abs(up.mean() - 0.25) < 0.01, up.mean()
