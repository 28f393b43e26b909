"""MobileFaceNet (Chen et al. 2018) in the form insightface's arcface_torch trains ("mbf").

Stride-2 stem, depthwise-separable bottlenecks with residual stacks, a 1x1 conv to 512,
then a global depthwise conv (GDC, 7x7) -> linear -> BN1d embedding.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pfc_jax.models.layers import PReLU, batch_norm, conv


class ConvBN(nnx.Module):
    """conv -> BN (-> per-channel PReLU when ``act``)."""

    def __init__(self, cin, cout, kernel, *, stride=1, groups=1, padding=None, act=True, dtype, rngs):
        self.conv = conv(cin, cout, kernel, stride=stride, groups=groups, padding=padding, dtype=dtype, rngs=rngs)
        self.bn = batch_norm(cout, dtype=dtype, rngs=rngs)
        self.act = PReLU(cout) if act else None

    def __call__(self, x, train: bool):
        x = self.bn(self.conv(x), use_running_average=not train)
        return self.act(x) if self.act is not None else x


class DepthWise(nnx.Module):
    """1x1 expand to ``hidden`` -> 3x3 depthwise (stride) -> 1x1 linear projection."""

    def __init__(self, cin, cout, hidden, *, stride, residual, dtype, rngs):
        self.expand = ConvBN(cin, hidden, 1, dtype=dtype, rngs=rngs)
        self.depthwise = ConvBN(hidden, hidden, 3, stride=stride, groups=hidden, dtype=dtype, rngs=rngs)
        self.project = ConvBN(hidden, cout, 1, act=False, dtype=dtype, rngs=rngs)
        self.residual = residual

    def __call__(self, x, train: bool):
        y = self.project(self.depthwise(self.expand(x, train), train), train)
        return x + y if self.residual else y


class MobileFaceNet(nnx.Module):
    """MobileFaceNet backbone, [N, 112, 112, 3] -> [N, D].

    The defaults are arcface_torch's "mbf" (its ``scale=2``).

    Args:
      blocks: residual blocks in the four stages.
      widths: channels of the two halves of the network (64*scale, 128*scale).
      hidden: expansion widths of the bottlenecks, in order: stage-1 residuals, first
        stride-2 block, stage-2 residuals, second stride-2 block, stage-3 residuals,
        third stride-2 block, stage-4 residuals.
      stem_groups: groups of the second 3x3 conv when ``blocks[0] == 1``.
      head_channels: width of the 1x1 conv before the global depthwise conv.
      embedding_dim: D.
    """

    def __init__(
        self,
        blocks: Sequence[int] = (1, 4, 6, 2),
        widths: Sequence[int] = (128, 256),
        hidden: Sequence[int] = (128, 128, 128, 256, 256, 512, 256),
        *,
        stem_groups: int = 64,
        head_channels: int = 512,
        embedding_dim: int = 512,
        image_size: int = 112,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        c1, c2 = widths
        h_res1, h_down1, h_res2, h_down2, h_res3, h_down3, h_res4 = hidden
        kw = dict(dtype=dtype, rngs=rngs)
        res = lambda c, h: DepthWise(c, c, h, stride=1, residual=True, **kw)
        layers = [ConvBN(3, c1, 3, stride=2, **kw)]
        if blocks[0] == 1:
            layers.append(ConvBN(c1, c1, 3, groups=stem_groups, **kw))
        else:
            layers += [res(c1, h_res1) for _ in range(blocks[0])]
        layers.append(DepthWise(c1, c1, h_down1, stride=2, residual=False, **kw))
        layers += [res(c1, h_res2) for _ in range(blocks[1])]
        layers.append(DepthWise(c1, c2, h_down2, stride=2, residual=False, **kw))
        layers += [res(c2, h_res3) for _ in range(blocks[2])]
        layers.append(DepthWise(c2, c2, h_down3, stride=2, residual=False, **kw))
        layers += [res(c2, h_res4) for _ in range(blocks[3])]
        self.layers = nnx.List(layers)
        self.conv_sep = ConvBN(c2, head_channels, 1, **kw)
        side = image_size
        for _ in range(4):
            side = (side + 1) // 2
        # Global depthwise conv over the whole final feature map (7x7 at 112x112 input).
        self.gdc = ConvBN(head_channels, head_channels, side, groups=head_channels, padding=0, act=False, **kw)
        self.linear = nnx.Linear(head_channels, embedding_dim, use_bias=False, **kw)
        self.features = batch_norm(embedding_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None) -> jax.Array:
        del dropout_key  # no dropout in this architecture
        for layer in self.layers:
            x = layer(x, train)
        x = self.gdc(self.conv_sep(x, train), train)
        x = self.linear(x.reshape(x.shape[0], -1))
        return self.features(x, use_running_average=not train)
