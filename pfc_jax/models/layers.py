"""Layers shared by the backbones (NHWC, Flax NNX)."""

from __future__ import annotations

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


def batch_norm(channels: int, *, dtype, rngs: nnx.Rngs, use_scale: bool = True) -> nnx.BatchNorm:
    return nnx.BatchNorm(
        channels,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
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
    dtype,
    rngs: nnx.Rngs,
    init=None,
) -> nnx.Conv:
    """A bias-free square convolution with PyTorch-style symmetric zero padding."""
    pad = kernel // 2 if padding is None else padding
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=False,
        dtype=dtype,
        kernel_init=init or nnx.initializers.kaiming_normal(),
        rngs=rngs,
    )
