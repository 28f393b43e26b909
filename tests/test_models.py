"""The backbone zoo: published parameter counts, shapes, modes, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pfc_jax import models


def abstract(name, **kw):
    return nnx.eval_shape(lambda: models.create(name, embedding_dim=512, **kw))


@pytest.mark.parametrize(
    "name,count,published",
    [
        # torch counts also include the frozen unit scale of the last BatchNorm1d (512).
        ("iresnet50", 43_590_336, 43.6e6),
        ("iresnet100", 65_155_648, 65.2e6),
        # arcface_torch's "mbf" (MobileFaceNet, scale 2): 2,059,520 counted on its PyTorch
        # definition.
        ("mobilefacenet", 2_059_520, 2.06e6),
    ],
)
def test_parameter_counts_match_published(name, count, published):
    n = models.count_params(abstract(name))
    assert n == count
    assert abs(n - published) < 0.05e6


def test_other_iresnets_build_with_increasing_size():
    counts = [models.count_params(abstract(f"iresnet{d}")) for d in (18, 34, 200)]
    assert counts[0] < counts[1] < 43e6 < 66e6 < counts[2]


@nnx.jit(static_argnames="train")
def run(model, x, train, key=None):
    return model(x, train=train, dropout_key=key)


@pytest.mark.parametrize("name", ["iresnet_narrow", "mobilefacenet_narrow"])
def test_narrow_forward_train_and_eval(name):
    model = models.create(name, embedding_dim=32, image_size=32, seed=1)
    x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    y_train = run(model, x, True)
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    y_eval = run(model, x, False)
    assert y_train.shape == y_eval.shape == (4, 32)
    assert np.isfinite(y_train).all() and np.isfinite(y_eval).all()
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
    assert any(changed), "training mode must update BatchNorm statistics"
    # Eval mode is a pure function of the input: per-example, batch-independent.
    np.testing.assert_allclose(run(model, x[:1], False), y_eval[:1], rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_float32_parameters():
    model = models.create("iresnet_narrow", embedding_dim=16, image_size=32, dtype=jnp.bfloat16)
    y = run(model, jnp.zeros((2, 32, 32, 3), jnp.bfloat16), True)
    assert y.dtype == jnp.bfloat16
    assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype("float32")}


def test_dropout_is_applied_only_in_training():
    model = models.create("iresnet_narrow", embedding_dim=16, image_size=32, dropout=0.5)
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    a = run(model, x, True, jax.random.key(1))
    b = run(model, x, True, jax.random.key(2))
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(run(model, x, False), run(model, x, False))


def test_unknown_backbone_and_dropout_errors():
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'.*iresnet50"):
        models.create("resnet9", embedding_dim=8)
    with pytest.raises(ValueError, match="no dropout"):
        models.create("mobilefacenet_narrow", embedding_dim=8, dropout=0.1)
