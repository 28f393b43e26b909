"""The backbone zoo: published parameter counts, shapes, modes, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pfc_jax import models


def abstract(name, **kw):
    return nnx.eval_shape(lambda: models.create(name, embedding_dim=512, **kw))


# Counted on the official definitions (PyTorch; VarGFaceNet's official MXNet symbol):
# trainable parameters (BatchNorm scales frozen at 1 are not parameters here), and the
# multiply-adds of every convolution and matrix product of one 112x112 forward pass.
OFFICIAL = {
    "iresnet18": (24_025_088, 2_597_109_760 + 12_845_056),
    "iresnet50": (43_590_336, 6_296_485_888 + 12_845_056),
    "iresnet100": (65_155_648, 12_076_761_088 + 12_845_056),
    "mobilefacenet": (2_059_520, 437_258_752 + 262_144),
    "vit_t": (19_137_792, 8_957_952 + 1_368_522_752 + 127_401_984),
    "vit_s": (76_023_296, 17_915_904 + 5_473_828_864 + 254_803_968),
    "vit_b": (113_833_472, 17_915_904 + 10_909_646_848 + 509_607_936),
    "vit_l": (255_684_352, 26_873_856 + 24_546_508_800 + 764_411_904),
    "vargfacenet": (5_198_292, 512_331_296 + 262_144),
    "mixfacenet_xs": (1_040_354, 76_561_120),
    "mixfacenet_s": (3_072_598, 218_141_424),
    "mixfacenet_m": (3_952_534, 303_388_992),
    "shufflemixfacenet_xs": (1_040_354, 76_561_120),
    "shufflemixfacenet_s": (3_072_598, 218_141_424),
    "shufflemixfacenet_m": (3_952_534, 303_388_992),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_parameters_and_multiply_adds_equal_the_official_models(name):
    from pfc_jax.bench import flops

    params, macs = OFFICIAL[name]
    model = abstract(name)
    assert models.count_params(model) == params
    assert flops.PUBLISHED[name][0] == params  # the benchmark's table says the same
    if name in ("iresnet50", "iresnet100", "vit_b", "vit_l") or name.startswith("shuffle"):
        return  # deeper or shuffled versions of models counted here: tracing them takes long
    graphdef, state = nnx.split(model)
    forward = lambda state, x: nnx.merge(graphdef, state)(x, train=False)
    jaxpr = jax.make_jaxpr(forward)(state, jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32))
    assert sum(flops.count_macs(jaxpr.jaxpr)) == macs


def test_other_iresnets_build_with_increasing_size():
    counts = [models.count_params(abstract(f"iresnet{d}")) for d in (18, 34, 200)]
    assert counts[0] < counts[1] < 43e6 < 66e6 < counts[2]


@nnx.jit(static_argnames="train")
def run(model, x, train, key=None):
    return model(x, train=train, dropout_key=key)


NARROW = ["iresnet_narrow", "mobilefacenet_narrow", "vit_narrow", "vargfacenet_narrow", "shufflemixfacenet_narrow"]


@pytest.mark.parametrize("name", NARROW)
def test_narrow_forward_train_and_eval(name):
    model = models.create(name, embedding_dim=32, image_size=32, seed=1)
    x = jax.random.uniform(jax.random.key(0), (4, 32, 32, 3), minval=-1, maxval=1)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    y_train = run(model, x, True, jax.random.key(5))
    after = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))
    y_eval = run(model, x, False)
    assert y_train.shape == y_eval.shape == (4, 32)
    assert np.isfinite(y_train).all() and np.isfinite(y_eval).all()
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b), before, after))
    assert any(changed), "training mode must update BatchNorm statistics"
    # Eval mode is a pure function of the input: per-example, batch-independent.
    np.testing.assert_allclose(run(model, x[:1], False), y_eval[:1], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NARROW[2:])
def test_bfloat16_forward_is_close_to_float32(name):
    """The new families in bfloat16 (parameters stay float32): finite, and within bfloat16
    rounding of the float32 forward pass (eval mode, random BatchNorm statistics)."""
    model = models.create(name, embedding_dim=32, image_size=32, seed=2)
    stats = nnx.state(model, nnx.BatchStat)
    rng = np.random.default_rng(0)
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 1.5, a.shape), a.dtype), stats))
    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1, maxval=1)
    y32 = np.asarray(run(model, x, False))
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    bf16 = models.create(name, embedding_dim=32, image_size=32, dtype=jnp.bfloat16)
    nnx.update(bf16, params, stats)
    y16 = run(bf16, x.astype(jnp.bfloat16), False)
    assert y16.dtype == jnp.bfloat16 and np.isfinite(np.asarray(y16, np.float32)).all()
    scale = np.abs(y32).max()
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05 * scale)


def test_vit_masks_patches_and_drops_paths_only_in_training():
    """vit_narrow (16 tokens, mask ratio 0.1, drop path 0.1): in training the output depends
    on the key (1 token of 16 dropped per image, residual branches dropped); in eval mode
    it does not, and equals a forward pass that never masks."""
    model = models.create("vit_narrow", embedding_dim=16, image_size=32, seed=3)
    x = jax.random.normal(jax.random.key(4), (3, 32, 32, 3))
    graphdef, state = nnx.split(model)
    fresh = lambda: nnx.merge(graphdef, state)  # noqa: E731 - training mode updates BatchNorm statistics
    assert not np.allclose(run(fresh(), x, True, jax.random.key(1)), run(fresh(), x, True, jax.random.key(2)))
    kept, restore = fresh()._keep_random_tokens(jnp.zeros((3, 16, 32)), jax.random.key(0))
    assert kept.shape == (3, 14, 32)  # int(16 * 0.9) tokens go through the blocks
    np.testing.assert_array_equal(np.sort(np.asarray(restore), axis=1), np.tile(np.arange(16), (3, 1)))
    e1 = run(fresh(), x, False, jax.random.key(1))
    np.testing.assert_array_equal(run(fresh(), x, False, jax.random.key(2)), e1)
    unmasked = fresh()
    unmasked.mask_ratio = 0.0
    for block in unmasked.blocks:
        block.drop_path = 0.0
    np.testing.assert_array_equal(run(unmasked, x, False), e1)


def test_mixfacenet_channel_rules():
    from pfc_jax.models import mixfacenet

    assert mixfacenet.split_channels(144, 3) == [48, 48, 48]
    assert mixfacenet.split_channels(384, 5) == [80, 76, 76, 76, 76]  # the first chunk takes the remainder
    assert [mixfacenet.round_channels(c * 0.5) for c in (16, 24, 40, 80, 120, 200)] == [8, 16, 24, 40, 64, 104]
    x = jnp.arange(6.0).reshape(1, 1, 1, 6)
    np.testing.assert_array_equal(mixfacenet.shuffle_even_odd(x).ravel(), [0, 2, 4, 1, 3, 5])
    # A unit's depthwise convs have kernels 3, 5, 7 on consecutive chunks.
    model = abstract("mixfacenet_s")
    kernels = [c.kernel.shape[:2] for c in model.units[2].depthwise.convs]
    assert kernels == [(3, 3), (5, 5), (7, 7)]


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
