"""VarGFaceNet (Yan et al., "VarGFaceNet: An Efficient Variable Group Convolutional Neural
Network for Lightweight Face Recognition", ICCV workshops 2019), as its official MXNet
code (zma-c-137/VarGFaceNet) builds it: 5,198,292 parameters, 1,022M FLOPs at 112x112.

*Variable group convolution*: every 3x3 convolution has groups of 8 input channels (not
depthwise: a group maps 8 channels to 8 x ``factor``), followed by a pointwise 1x1 to the
output width (:class:`SepConv`). A normal block is two of them, squeeze-and-excitation
and an identity shortcut; a down-sampling block sums two stride-2 branches, adds one more
SepConv and a stride-2 SepConv shortcut. The head is a stride-1 3x3 conv and one normal
block with stride 2; the embedding setting is a 1x1 conv to 1,024 channels, a 7x7 group
conv (8 channels per group) down to 1x1, a 1x1 conv to 512 and FC (with bias) + BN1d.
Every BatchNorm has eps 2e-5 and every activation is a per-channel PReLU.

Two things the official symbol does that are kept: it normalizes its own input (here the
images arrive normalized, like every backbone of the zoo), and squeeze-and-excitation is
on (insightface's MXNet copy turns it off by default: 4,957,512 parameters).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pfc_jax.models.layers import PReLU, SqueezeExcite, batch_norm, conv

BN_EPSILON = 2e-5
GROUP_CHANNELS = 8  # input channels per group of every variable group convolution


class ConvBN(nnx.Module):
    """conv -> BN(eps 2e-5) (-> PReLU when ``act``)."""

    def __init__(self, cin, cout, kernel, *, stride=1, groups=1, padding=None, act=True, dtype, rngs):
        self.conv = conv(cin, cout, kernel, stride=stride, groups=groups, padding=padding, dtype=dtype, rngs=rngs)
        self.bn = batch_norm(cout, epsilon=BN_EPSILON, dtype=dtype, rngs=rngs)
        self.act = PReLU(cout) if act else None

    def __call__(self, x, train: bool):
        x = self.bn(self.conv(x), use_running_average=not train)
        return self.act(x) if self.act is not None else x


class SepConv(nnx.Module):
    """Variable group conv 3x3 (8 channels per group, ``cin`` -> ``cin * factor``) + BN +
    PReLU, then pointwise 1x1 to ``cout`` + BN (+ PReLU when ``act``)."""

    def __init__(self, cin, cout, *, stride, factor, act, dtype, rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        self.group = ConvBN(cin, cin * factor, 3, stride=stride, groups=cin // GROUP_CHANNELS, **kw)
        self.point = ConvBN(cin * factor, cout, 1, act=act, **kw)

    def __call__(self, x, train: bool):
        return self.point(self.group(x, train), train)


class NormalBlock(nnx.Module):
    """Two SepConvs, squeeze-and-excitation (reduction 4, PReLU), a shortcut (identity, or
    a SepConv where the block strides), add, PReLU."""

    def __init__(self, channels, *, stride=1, factor, se: bool, dtype, rngs):
        kw = dict(factor=factor, dtype=dtype, rngs=rngs)
        self.sep1 = SepConv(channels, channels, stride=stride, act=True, **kw)
        self.sep2 = SepConv(channels, channels, stride=1, act=False, **kw)
        self.se = SqueezeExcite(channels, channels // 4, PReLU(channels // 4), dtype=dtype, rngs=rngs) if se else None
        self.shortcut = SepConv(channels, channels, stride=stride, act=False, **kw) if stride != 1 else None
        self.act = PReLU(channels)

    def __call__(self, x, train: bool):
        y = self.sep2(self.sep1(x, train), train)
        if self.se is not None:
            y = self.se(y)
        shortcut = x if self.shortcut is None else self.shortcut(x, train)
        return self.act(y + shortcut)


class DownBlock(nnx.Module):
    """Down-sampling: two stride-2 SepConv branches summed + PReLU, one more SepConv, a
    stride-2 SepConv shortcut, add, PReLU (no squeeze-and-excitation)."""

    def __init__(self, cin, cout, *, factor, dtype, rngs):
        kw = dict(factor=factor, act=False, dtype=dtype, rngs=rngs)
        self.branch1 = SepConv(cin, cout, stride=2, **kw)
        self.branch2 = SepConv(cin, cout, stride=2, **kw)
        self.merge_act = PReLU(cout)
        self.sep2 = SepConv(cout, cout, stride=1, **kw)
        self.shortcut = SepConv(cin, cout, stride=2, **kw)
        self.act = PReLU(cout)

    def __call__(self, x, train: bool):
        y = self.merge_act(self.branch1(x, train) + self.branch2(x, train))
        return self.act(self.sep2(y, train) + self.shortcut(x, train))


class VarGFaceNet(nnx.Module):
    """VarGFaceNet, [N, 112, 112, 3] -> [N, embedding_dim]; the defaults are the official ones.

    Args:
      widths: channels of the head and of stages 2, 3, 4 (official: 32, 64, 128, 256 x 1.25).
      units: blocks of stages 2, 3, 4 (the first of each down-samples).
      last_channels: width of the embedding setting's 1x1 conv and 7x7 group conv.
      factor: expansion of the group convolutions (the head block uses 1).
      se: squeeze-and-excitation in the normal blocks.
    """

    def __init__(
        self,
        widths: Sequence[int] = (40, 80, 160, 320),
        units: Sequence[int] = (3, 7, 4),
        *,
        last_channels: int = 1024,
        factor: int = 2,
        se: bool = True,
        embedding_dim: int = 512,
        image_size: int = 112,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        if any(w % GROUP_CHANNELS for w in (*widths, last_channels)):
            raise ValueError(f"every width must be a multiple of {GROUP_CHANNELS} (the channels of a group)")
        kw = dict(dtype=dtype, rngs=rngs)
        self.head_conv = ConvBN(3, widths[0], 3, **kw)
        self.head_block = NormalBlock(widths[0], stride=2, factor=1, se=se, **kw)
        stages = []
        for cin, cout, n in zip(widths[:-1], widths[1:], units):
            stages.append(DownBlock(cin, cout, factor=factor, **kw))
            stages += [NormalBlock(cout, factor=factor, se=se, **kw) for _ in range(n - 1)]
        self.stages = nnx.List(stages)
        side = image_size
        for _ in range(4):
            side = (side + 1) // 2
        self.expand = ConvBN(widths[-1], last_channels, 1, **kw)
        self.group = ConvBN(
            last_channels, last_channels, side, groups=last_channels // GROUP_CHANNELS, padding=0, act=False, **kw
        )
        self.point = ConvBN(last_channels, embedding_dim, 1, **kw)
        self.fc = nnx.Linear(embedding_dim, embedding_dim, **kw)
        self.features = batch_norm(embedding_dim, epsilon=BN_EPSILON, **kw)

    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None) -> jax.Array:
        del dropout_key  # no dropout in this architecture
        x = self.head_block(self.head_conv(x, train), train)
        for stage in self.stages:
            x = stage(x, train)
        x = self.point(self.group(self.expand(x, train), train), train)
        x = self.fc(x.reshape(x.shape[0], -1))
        return self.features(x, use_running_average=not train)
