"""Layers shared by the backbones (NHWC, Flax NNX)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

# PyTorch's BatchNorm defaults, which every face-recognition recipe is tuned with:
# eps 1e-5 and a running-average momentum of 0.1 (Flax counts it the other way round).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9


class PReLU(nnx.Module):
    """Per-channel PReLU (``torch.nn.PReLU(num_parameters=C)``), slopes initialized to 0.25."""

    def __init__(self, channels: int, *, init: float = 0.25, dtype=None):
        self.alpha = nnx.Param(jnp.full((channels,), init, jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        alpha = self.alpha[...].astype(x.dtype)
        return jnp.where(x >= 0, x, alpha * x)


def batch_norm(
    channels: int, *, dtype, rngs: nnx.Rngs, use_scale: bool = True, epsilon: float = BN_EPSILON
) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        channels,
        momentum=BN_MOMENTUM,
        epsilon=epsilon,
        use_scale=use_scale,
        dtype=dtype,
        rngs=rngs,
    )


def conv(
    cin: int,
    cout: int,
    kernel: int,
    *,
    stride: int = 1,
    groups: int = 1,
    padding: int | None = None,
    bias: bool = False,
    dtype,
    rngs: nnx.Rngs,
    init=None,
) -> nnx.Conv:
    """A square convolution (bias-free unless ``bias``) with PyTorch-style symmetric zero padding."""
    pad = kernel // 2 if padding is None else padding
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=bias,
        dtype=dtype,
        kernel_init=init or nnx.initializers.kaiming_normal(),
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


# ---- stride-2 convolutions with cheaper gradients on the CPU ------------------------------

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs):
    """``jax.lax.conv_general_dilated`` (what :class:`nnx.Conv` calls), whose gradients for
    the stride-2 3×3 (padding 1) and 1×1 (no padding) convolutions of the backbones are
    computed differently on the CPU: XLA's CPU backend runs the input gradient of a
    strided convolution as a convolution over the zero-dilated output gradient, 4× the
    multiply-adds needed (iResNet-18 at batch 32 on 2 cores: its stride-2 input gradients
    take 0.29 s done as below, 0.74 s done so). The forward pass, and the gradients on
    every other backend, are the plain ones; on the CPU they agree with them up to
    floating-point rounding (tests/test_models.py)."""
    dims = kwargs.get("dimension_numbers")
    plain = (
        tuple(window_strides) != (2, 2)
        or any(kwargs.get(k) not in (None, (1, 1)) for k in ("lhs_dilation", "rhs_dilation"))
        or kwargs.get("feature_group_count", 1) != 1
        or kwargs.get("batch_group_count", 1) != 1
        or kwargs.get("preferred_element_type") is not None
        or kwargs.get("out_sharding") is not None
        or isinstance(padding, str)
        or lhs.ndim != 4
        or dims != jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    if not plain:
        pads = tuple(tuple(p) for p in padding)
        k = rhs.shape[:2]
        if (k, pads) in (((3, 3), ((1, 1), (1, 1))), ((1, 1), ((0, 0), (0, 0)))):
            return _stride2(lhs, rhs, k[0], kwargs.get("precision"))
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs)


def _conv(x, w, stride, pad, precision):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=_NHWC, precision=precision
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _stride2(x, w, kernel, precision):
    return _conv(x, w, 2, kernel // 2, precision)


def _stride2_fwd(x, w, kernel, precision):
    return _conv(x, w, 2, kernel // 2, precision), (x, w)


def _stride2_bwd(kernel, precision, residuals, g):
    x, w = residuals

    def plain(x, w, g):
        return jax.vjp(lambda x, w: _conv(x, w, 2, kernel // 2, precision), x, w)[1](g)

    def cpu(x, w, g):
        if kernel == 1:  # the same sums as a 1×1 convolution of every other pixel
            return jax.vjp(lambda x, w: _conv(x[:, ::2, ::2], w, 1, 0, precision), x, w)[1](g)
        dw = jax.vjp(lambda w: _conv(x, w, 2, 1, precision), w)[1](g)[0]
        return _subpixel_input_grad(g, w, x.shape, precision), dw

    return jax.lax.platform_dependent(x, w, g, cpu=cpu, default=plain)


_stride2.defvjp(_stride2_fwd, _stride2_bwd)


def _subpixel_input_grad(g, w, shape, precision):
    """The input gradient of a stride-2 3×3 convolution with padding 1, by output parity.

    With ``y[i] = sum_k x[2i + k - 1] w[k]``, an even input row ``2j`` is reached only by
    tap 1 from ``g[j]``, an odd row ``2j + 1`` by tap 2 from ``g[j]`` and tap 0 from
    ``g[j + 1]``; so each of the four (row, column) parities is a small stride-1
    convolution of ``g`` (1, 2, 2 and 4 taps, 9 in all), and the four are interleaved.
    """
    batch, height, width, channels = shape
    wt = jnp.swapaxes(w, 2, 3)  # [3, 3, cout, cin]: from the output's channels to the input's
    taps = {0: (slice(1, 2), (0, 0)), 1: (slice(None, None, -2), (0, 1))}  # parity -> (taps, padding)
    grid = []
    for row in (0, 1):
        rows, row_pad = taps[row]
        cells = []
        for col in (0, 1):
            cols, col_pad = taps[col]
            cells.append(
                jax.lax.conv_general_dilated(
                    g, wt[rows, cols], (1, 1), (row_pad, col_pad), dimension_numbers=_NHWC, precision=precision
                )
            )
        grid.append(jnp.stack(cells, axis=3))  # [B, Ho, Wo, 2 (column parity), C]
    dx = jnp.stack(grid, axis=2)  # [B, Ho, 2 (row parity), Wo, 2, C]
    ho, wo = g.shape[1], g.shape[2]
    return dx.reshape(batch, 2 * ho, 2 * wo, channels)[:, :height, :width].astype(g.dtype)


class SqueezeExcite(nnx.Module):
    """Squeeze-and-excitation: global average pool -> 1x1 conv (bias) -> ``act`` -> 1x1
    conv (bias) -> sigmoid, scaling the input's channels."""

    def __init__(self, channels: int, hidden: int, act, *, dtype, rngs: nnx.Rngs):
        self.reduce = conv(channels, hidden, 1, bias=True, dtype=dtype, rngs=rngs)
        self.act = act
        self.expand = conv(hidden, channels, 1, bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        s = jnp.mean(x, axis=(1, 2), keepdims=True)
        return x * jax.nn.sigmoid(self.expand(self.act(self.reduce(s))))
