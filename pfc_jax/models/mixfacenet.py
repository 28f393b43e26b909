"""MixFaceNets (Boutros et al., "MixFaceNets: Extremely Efficient Face Recognition
Networks", IJCB 2021), as the official code (fdbtrs/mixfacenets) builds them.

MixNet units: a (grouped) 1x1 expansion, a *mixed depthwise convolution* (the expanded
channels split into chunks, chunk j convolved depthwise with a (3 + 2j)-sized kernel),
squeeze-and-excitation on the expanded channels, a (grouped) 1x1 projection, a residual
where the shape allows, and in the Shuffle* variants a channel shuffle after every unit.
The embedding is a 1x1 conv to ``gdw`` channels, a 7x7 global depthwise conv, a 1x1 conv
to 512 and BatchNorm1d (its scale frozen at 1).

Where the code and the paper's text differ, the code is followed (its parameter counts
and FLOPs are the paper's tables): stage 1 and the stem use PReLU, stages 2-4 Swish;
squeeze-and-excitation sits after the depthwise convolution; the stem's residual unit
shuffles its channels in every variant; the shuffle puts the even channels first, then
the odd ones; XS is S at width 0.5 (channels rounded to multiples of 8) with a 512-channel
embedding conv. Channel splits give the first chunk the remainder.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from pfc_jax.models.layers import PReLU, SqueezeExcite, batch_norm, conv


@dataclasses.dataclass(frozen=True)
class Unit:
    """One MixNet unit of a stage: output channels, 1x1 expansion groups, depthwise kernel
    count (kernels 3, 5, ...), 1x1 projection groups, expansion factor, SE reduction (0: none)."""

    channels: int
    expand_groups: int
    kernels: int
    project_groups: int
    expansion: int
    se: int


def _stages(channels, expand, kernels, project, expansion, se):
    return tuple(
        tuple(Unit(*u) for u in zip(*stage)) for stage in zip(channels, expand, kernels, project, expansion, se)
    )


# MixNet-S and MixNet-M, per stage, per unit (the official code's lists).
MIXNET_S = _stages(
    [[24, 24], [40, 40, 40, 40], [80, 80, 80], [120, 120, 120, 200, 200, 200]],
    [[2, 2], [1, 2, 2, 2], [1, 1, 1], [2, 2, 2, 1, 1, 1]],
    [[1, 1], [3, 2, 2, 2], [3, 2, 2], [3, 4, 4, 5, 4, 4]],
    [[2, 2], [1, 2, 2, 2], [2, 2, 2], [2, 2, 2, 1, 2, 2]],
    [[6, 3], [6, 6, 6, 6], [6, 6, 6], [6, 3, 3, 6, 6, 6]],
    [[0, 0], [2, 2, 2, 2], [4, 4, 4], [2, 2, 2, 2, 2, 2]],
)
MIXNET_M = _stages(
    [[32, 32], [40, 40, 40, 40], [80, 80, 80, 80], [120, 120, 120, 120, 200, 200, 200, 200]],
    [[2, 2], [1, 2, 2, 2], [1, 2, 2, 2], [1, 2, 2, 2, 1, 1, 1, 1]],
    [[3, 1], [4, 2, 2, 2], [3, 4, 4, 4], [1, 4, 4, 4, 4, 4, 4, 4]],
    [[2, 2], [1, 2, 2, 2], [1, 2, 2, 2], [1, 2, 2, 2, 1, 2, 2, 2]],
    [[6, 3], [6, 6, 6, 6], [6, 6, 6, 6], [6, 3, 3, 3, 6, 6, 6, 6]],
    [[0, 0], [2, 2, 2, 2], [4, 4, 4, 4], [2, 2, 2, 2, 2, 2, 2, 2]],
)


def round_channels(c: float, divisor: int = 8) -> int:
    """The nearest multiple of ``divisor`` (at least ``divisor``), one more step up if that
    loses more than 10 %: MixNet's width scaling."""
    rounded = max(int(c + divisor / 2.0) // divisor * divisor, divisor)
    return rounded + divisor if rounded < 0.9 * c else rounded


def split_channels(channels: int, parts: int) -> list[int]:
    """``channels`` in ``parts`` equal chunks, the first taking the remainder."""
    sizes = [channels // parts] * parts
    sizes[0] += channels - sum(sizes)
    return sizes


def shuffle_even_odd(x: jax.Array) -> jax.Array:
    """The official channel shuffle with 2 groups: the even channels, then the odd ones."""
    return jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


def _per_chunk(layers, splits: list[int], x: jax.Array) -> jax.Array:
    """Layer j on channel chunk j of ``x`` (chunk sizes ``splits``), concatenated."""
    if len(layers) == 1:
        return layers[0](x)
    bounds = [sum(splits[:j]) for j in range(1, len(splits))]
    return jnp.concatenate([layer(chunk) for layer, chunk in zip(layers, jnp.split(x, bounds, axis=-1))], axis=-1)


class GroupedPointwise(nnx.Module):
    """A 1x1 conv made of ``groups`` independent convs on consecutive channel chunks (split
    by :func:`split_channels`, which may be unequal, so not a grouped conv)."""

    def __init__(self, cin: int, cout: int, groups: int, *, dtype, rngs: nnx.Rngs):
        self.splits = split_channels(cin, groups)
        self.convs = nnx.List(
            [conv(i, o, 1, dtype=dtype, rngs=rngs) for i, o in zip(self.splits, split_channels(cout, groups))]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return _per_chunk(self.convs, self.splits, x)


class MixDepthwise(nnx.Module):
    """Depthwise convs of kernels 3, 5, 7, ... on consecutive channel chunks."""

    def __init__(self, channels: int, kernels: int, *, stride: int, dtype, rngs: nnx.Rngs):
        self.splits = split_channels(channels, kernels)
        self.convs = nnx.List(
            [conv(c, c, 3 + 2 * j, stride=stride, groups=c, dtype=dtype, rngs=rngs) for j, c in enumerate(self.splits)]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return _per_chunk(self.convs, self.splits, x)


class MixUnit(nnx.Module):
    """Expansion (when ``expansion > 1``) -> mixed depthwise -> SE -> projection (+ residual)
    (-> even/odd shuffle)."""

    def __init__(self, cin: int, unit: Unit, *, stride: int, swish_act: bool, shuffle: bool, dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, rngs=rngs)
        mid = cin * unit.expansion
        make_act = (lambda c: swish) if swish_act else (lambda c: PReLU(c))
        if unit.expansion > 1:
            self.expand = GroupedPointwise(cin, mid, unit.expand_groups, **kw)
            self.expand_bn = batch_norm(mid, **kw)
            self.expand_act = make_act(mid)
        else:
            self.expand = None
        self.depthwise = MixDepthwise(mid, unit.kernels, stride=stride, **kw)
        self.depthwise_bn = batch_norm(mid, **kw)
        self.depthwise_act = make_act(mid)
        self.se = SqueezeExcite(mid, cin // unit.se, make_act(cin // unit.se), **kw) if unit.se else None
        self.project = GroupedPointwise(mid, unit.channels, unit.project_groups, **kw)
        self.project_bn = batch_norm(unit.channels, **kw)
        self.residual = cin == unit.channels and stride == 1
        self.shuffle = shuffle

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = lambda layer, y: layer(y, use_running_average=not train)
        y = x
        if self.expand is not None:
            y = self.expand_act(bn(self.expand_bn, self.expand(y)))
        y = self.depthwise_act(bn(self.depthwise_bn, self.depthwise(y)))
        if self.se is not None:
            y = self.se(y)
        y = bn(self.project_bn, self.project(y))
        if self.residual:
            y = y + x
        return shuffle_even_odd(y) if self.shuffle else y


class MixFaceNet(nnx.Module):
    """A MixFaceNet, [N, 112, 112, 3] -> [N, embedding_dim].

    Args:
      stages: the units of the four stages (:data:`MIXNET_S`, :data:`MIXNET_M`).
      stem_channels: output of the stride-2 stem conv (16 for S, 24 for M), before width.
      width: multiplier of every channel count (XS: 0.5), rounded by :func:`round_channels`.
      gdw: channels of the embedding's 1x1 conv and global depthwise conv.
      shuffle: shuffle channels after every unit (ShuffleMixFaceNet).
    """

    def __init__(
        self,
        stages=MIXNET_S,
        *,
        stem_channels: int = 16,
        width: float = 1.0,
        gdw: int = 1024,
        shuffle: bool = False,
        embedding_dim: int = 512,
        image_size: int = 112,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, rngs=rngs)
        scale = (lambda c: round_channels(c * width)) if width != 1.0 else (lambda c: c)
        c = scale(stem_channels)
        self.stem = conv(3, c, 3, stride=2, **kw)
        self.stem_bn = batch_norm(c, **kw)
        self.stem_act = PReLU(c)
        # The stem's residual unit (depthwise 3x3, 1x1) shuffles in every variant.
        self.stem_unit = MixUnit(c, Unit(c, 1, 1, 1, 1, 0), stride=1, swish_act=False, shuffle=True, **kw)
        units = []
        self.stage_starts = tuple(sum(len(s) for s in stages[:i]) for i in range(len(stages)))
        for i, stage in enumerate(stages):
            for j, unit in enumerate(stage):
                down = (i in (1, 2) and j == 0) or (i == 3 and j == len(stage) // 2)
                unit = dataclasses.replace(unit, channels=scale(unit.channels))
                units.append(MixUnit(c, unit, stride=2 if down else 1, swish_act=i > 0, shuffle=shuffle, **kw))
                c = unit.channels
        self.units = nnx.List(units)
        self.tail = conv(c, gdw, 1, **kw)
        self.tail_bn = batch_norm(gdw, **kw)
        self.tail_act = PReLU(gdw)
        side = image_size
        for _ in range(4):
            side = (side + 1) // 2
        self.gdc = conv(gdw, gdw, side, groups=gdw, padding=0, **kw)
        self.gdc_bn = batch_norm(gdw, **kw)
        self.linear = conv(gdw, embedding_dim, 1, **kw)
        self.features = batch_norm(embedding_dim, use_scale=False, **kw)

    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None) -> jax.Array:
        del dropout_key  # no dropout in this architecture
        bn = lambda layer, y: layer(y, use_running_average=not train)
        x = self.stem_unit(self.stem_act(bn(self.stem_bn, self.stem(x))), train)
        for unit in self.units:
            x = unit(x, train)
        x = self.tail_act(bn(self.tail_bn, self.tail(x)))
        x = self.linear(bn(self.gdc_bn, self.gdc(x)))
        return bn(self.features, x.reshape(x.shape[0], -1))
