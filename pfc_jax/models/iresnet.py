"""iResNet (Improved ResNet) as used throughout face recognition (insightface arcface_torch).

112x112 input, stem conv3x3-BN-PReLU at full resolution, four stages of ``IBasicBlock``
(BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus shortcut) each halving the
resolution, then BN -> dropout -> FC (C*7*7 -> D) -> BN1d with a fixed unit scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pfc_jax.models.layers import PReLU, batch_norm, conv

# Conv weights ~ N(0, 0.1^2) as in the reference implementation.
_CONV_INIT = nnx.initializers.normal(0.1)


class IBasicBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, stride: int, *, dtype, rngs: nnx.Rngs):
        self.bn1 = batch_norm(cin, dtype=dtype, rngs=rngs)
        self.conv1 = conv(cin, cout, 3, dtype=dtype, rngs=rngs, init=_CONV_INIT)
        self.bn2 = batch_norm(cout, dtype=dtype, rngs=rngs)
        self.prelu = PReLU(cout)
        self.conv2 = conv(cout, cout, 3, stride=stride, dtype=dtype, rngs=rngs, init=_CONV_INIT)
        self.bn3 = batch_norm(cout, dtype=dtype, rngs=rngs)
        if stride != 1 or cin != cout:
            self.down_conv = conv(cin, cout, 1, stride=stride, dtype=dtype, rngs=rngs, init=_CONV_INIT)
            self.down_bn = batch_norm(cout, dtype=dtype, rngs=rngs)
        else:
            self.down_conv = self.down_bn = None

    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        eval_bn = not train
        y = self.bn1(x, use_running_average=eval_bn)
        y = self.conv1(y)
        y = self.prelu(self.bn2(y, use_running_average=eval_bn))
        y = self.bn3(self.conv2(y), use_running_average=eval_bn)
        if self.down_conv is not None:
            x = self.down_bn(self.down_conv(x), use_running_average=eval_bn)
        return y + x


class IResNet(nnx.Module):
    """iResNet backbone mapping uint8-normalized images [N, 112, 112, 3] to embeddings [N, D].

    Args:
      layers: blocks per stage, e.g. (3, 4, 14, 3) for iResNet-50.
      widths: channels per stage, (64, 128, 256, 512) in the published models.
      embedding_dim: D.
      dropout: dropout rate before the FC layer.
      image_size: input side; the FC layer sees ``image_size / 16`` squared positions.
      dtype: computation dtype (parameters stay float32).
    """

    def __init__(
        self,
        layers: Sequence[int],
        widths: Sequence[int] = (64, 128, 256, 512),
        *,
        embedding_dim: int = 512,
        dropout: float = 0.0,
        image_size: int = 112,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        stem = widths[0]
        self.conv1 = conv(3, stem, 3, dtype=dtype, rngs=rngs, init=_CONV_INIT)
        self.bn1 = batch_norm(stem, dtype=dtype, rngs=rngs)
        self.prelu = PReLU(stem)
        blocks, cin = [], stem
        for n, cout in zip(layers, widths):
            for i in range(n):
                blocks.append(IBasicBlock(cin, cout, 2 if i == 0 else 1, dtype=dtype, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.bn2 = batch_norm(cin, dtype=dtype, rngs=rngs)
        self.dropout = nnx.Dropout(dropout)
        side = image_size
        for _ in layers:
            side = (side + 1) // 2  # stride-2 3x3 conv with padding 1
        self.fc = nnx.Linear(cin * side * side, embedding_dim, dtype=dtype, rngs=rngs)
        # BatchNorm1d with its scale frozen at 1 (a parameter that is never trained in the
        # reference, so it is left out here).
        self.features = batch_norm(embedding_dim, dtype=dtype, rngs=rngs, use_scale=False)

    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None) -> jax.Array:
        eval_bn = not train
        x = self.prelu(self.bn1(self.conv1(x), use_running_average=eval_bn))
        for block in self.blocks:
            x = block(x, train)
        x = self.bn2(x, use_running_average=eval_bn)
        # Flatten in (C, H, W) order like the reference, so weights port across frameworks.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = self.dropout(x, deterministic=not train, rngs=dropout_key)
        x = self.fc(x)
        return self.features(x, use_running_average=eval_bn)


IRESNET_LAYERS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}
