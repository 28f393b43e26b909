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


@pytest.mark.parametrize("kernel,size", [(3, 12), (3, 9), (1, 12), (1, 7)])
def test_strided_convolution_equals_the_plain_one_with_its_gradients(kernel, size):
    """The backbones' conv entry point: the forward is lax's, bit for bit, and the
    gradients it computes its own way on the CPU agree with autodiff of lax's."""
    from pfc_jax.models import layers

    kx, kw, kg = jax.random.split(jax.random.key(kernel * 100 + size), 3)
    x = jax.random.normal(kx, (3, size, size + 2, 5))
    w = jax.random.normal(kw, (kernel, kernel, 5, 4))
    pad = ((kernel // 2,) * 2,) * 2
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def ours(x, w):
        return layers.conv_general_dilated(x, w, (2, 2), pad, dimension_numbers=dims)

    def plain(x, w):
        return jax.lax.conv_general_dilated(x, w, (2, 2), pad, dimension_numbers=dims)

    y, ours_vjp = jax.vjp(ours, x, w)
    y_ref, plain_vjp = jax.vjp(plain, x, w)
    np.testing.assert_array_equal(y, y_ref)
    g = jax.random.normal(kg, y.shape)
    for got, want in zip(jax.jit(ours_vjp)(g), jax.jit(plain_vjp)(g)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want))))
    # in bfloat16, within its rounding
    xb, wb, gb = (a.astype(jnp.bfloat16) for a in (x, w, g))
    for got, want in zip(jax.vjp(ours, xb, wb)[1](gb), jax.vjp(plain, xb, wb)[1](gb)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.float32(got), np.float32(want), atol=0.05 * float(jnp.max(jnp.abs(want.astype(jnp.float32))))
        )


def test_backbone_gradients_do_not_depend_on_the_strided_convolutions_path(monkeypatch):
    from pfc_jax.models import layers

    x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))

    def loss_and_grads():
        model = models.create("iresnet_narrow", embedding_dim=8, image_size=16)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            m = nnx.merge(graphdef, params, rest)
            return jnp.sum(jnp.sin(m(x, train=False)))  # running statistics: nothing to write

        return jax.jit(jax.value_and_grad(loss))(params)

    loss, grads = loss_and_grads()
    monkeypatch.setattr(layers, "_stride2", lambda x, w, k, precision: layers._conv(x, w, 2, k // 2, precision))
    loss_ref, grads_ref = loss_and_grads()
    np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * (1 + float(jnp.max(jnp.abs(want)))))
