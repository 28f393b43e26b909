"""The train step: gradient accumulation, bf16, clipping, schedules, compile once."""

import pathlib
import runpy

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pfc_jax import optim, sharding, train

ROOT = pathlib.Path(__file__).parents[1]


def config(**overrides):
    c = runpy.run_path(str(ROOT / "configs" / "synthetic.py"))["get_config"]()
    c.model.name = "mlp"
    c.model.embedding_dim = 16
    c.data.image_size = 16
    c.global_batch_size = 32
    c.total_steps = 10
    c.head.sample_rate = 0.3
    c.schedule.warmup_epochs = 0.0
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def setup_and_state(c, num_classes=50):
    mesh = sharding.make_mesh()
    setup = train.build(c, mesh, num_classes=num_classes, num_examples=1000)
    state = setup.trainer.init(setup.params, setup.batch_stats, jax.random.key(0))
    return setup, state


def batch(c, seed=0, num_classes=50):
    rng = np.random.default_rng(seed)
    mesh = sharding.make_mesh()
    b, s = c.global_batch_size, c.data.image_size
    shard = sharding.batch_sharding(mesh)
    images = jax.device_put(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8), shard)
    labels = jax.device_put(rng.integers(0, num_classes, b).astype(np.int32), shard)
    return images, labels


def test_gradient_accumulation_equals_one_big_step():
    """Without BatchNorm, K micro-batches give the same loss and update as one batch."""
    results = []
    for k in (1, 2, 4):
        c = config(grad_accum_steps=k)
        setup, state = setup_and_state(c)
        images, labels = batch(c)
        step = setup.trainer.jit()
        for _ in range(2):
            state, metrics = step(state, images, labels)
        results.append((jax.tree.map(np.asarray, state), jax.device_get(metrics)))
    (ref, ref_m), *others = results
    for got, got_m in others:
        np.testing.assert_allclose(got_m["loss"], ref_m["loss"], rtol=1e-5)
        assert got_m["sampled_classes"] == ref_m["sampled_classes"]
        # Two steps of fp32 sums in another order: agreement to ~1e-5 of the values' scale.
        for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.head.centers, ref.head.centers, rtol=1e-4, atol=1e-5)


def test_step_learns_compiles_once_and_counts():
    c = config()
    setup, state = setup_and_state(c)
    traced = chex.assert_max_traces(setup.trainer.__call__, n=1)
    shardings = setup.trainer.state_shardings
    data = sharding.batch_sharding(setup.trainer.mesh)
    step = jax.jit(traced, in_shardings=(shardings, data, data), donate_argnums=(0,))
    images, labels = batch(c)
    losses = []
    for _ in range(5):
        state, metrics = step(state, images, labels)
        losses.append(float(metrics["loss"]))
    chex.clear_trace_counter()
    assert int(state.step) == 5
    assert losses[-1] < losses[0]
    assert float(metrics["lr"]) == pytest.approx(optim.schedule(c, total_steps=10, warmup_steps=0)(4))
    assert int(metrics["invalid_labels"]) == 0


def test_bfloat16_step_keeps_float32_state():
    c = config(dtype="bfloat16", model__name="iresnet_narrow", data__image_size=32)
    setup, state = setup_and_state(c)
    images, labels = batch(c)
    state, metrics = setup.trainer.jit()(state, images, labels)
    assert np.isfinite(float(metrics["loss"]))
    assert metrics["loss"].dtype == jnp.float32
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert state.head.centers.dtype == jnp.float32


def test_clipping_bounds_the_backbone_update():
    c = config(
        optimizer__clip_grad_norm=1e-3,
        optimizer__momentum=0.0,
        optimizer__weight_decay=0.0,
        optimizer__lr=1.0,
        schedule__name="constant",
    )
    setup, state = setup_and_state(c)
    images, labels = batch(c)
    new, metrics = setup.trainer.jit()(jax.tree.map(jnp.copy, state), images, labels)
    delta = optax.tree.norm(jax.tree.map(lambda a, b: a - b, new.params, state.params))
    assert float(metrics["grad_norm"]) > 1e-2  # the raw gradient is much larger
    np.testing.assert_allclose(float(delta), 1e-3, rtol=1e-4)


@pytest.mark.parametrize("name", ["polynomial", "cosine", "constant", "step"])
def test_schedules_warm_up_then_decay(name):
    c = config(schedule__name=name, schedule__warmup_epochs=1.0, optimizer__lr=0.4, schedule__milestones=(3, 5.5))
    lr = optim.schedule(c, total_steps=100, warmup_steps=10, steps_per_epoch=10)
    assert float(lr(0)) == 0.0
    np.testing.assert_allclose(float(lr(5)), 0.2, rtol=1e-6)
    np.testing.assert_allclose(float(lr(10)), 0.4, rtol=1e-6)
    if name == "polynomial":  # arcface_torch's PolyScheduler: (1 - t)^2
        np.testing.assert_allclose(float(lr(55)), 0.4 * 0.5**2, rtol=1e-5)
    if name == "cosine":
        np.testing.assert_allclose(float(lr(55)), 0.2, rtol=1e-5)
    if name == "step":  # x 0.1 at epochs 3 and 5.5 (steps 30 and 55), counted from the start
        assert [float(lr(i)) for i in (29, 30, 54, 55, 99)] == pytest.approx([0.4, 0.04, 0.04, 0.004, 0.004])
    elif name == "constant":
        assert float(lr(99)) == pytest.approx(0.4)
    else:
        assert float(lr(100)) == pytest.approx(0.0, abs=1e-7)
