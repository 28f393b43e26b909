"""The backbone zoo, chosen by name (``config.model.name``).

Every backbone maps normalized images [N, H, W, 3] (float, [-1, 1]) to embeddings
[N, embedding_dim] and is called as ``model(x, train=..., dropout_key=...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pfc_jax.models.iresnet import IRESNET_LAYERS, IResNet
from pfc_jax.models.mobilefacenet import MobileFaceNet


class MLP(nnx.Module):
    """Flatten -> Linear -> ReLU -> Linear: no BatchNorm, no dropout. For tests and debugging
    (its gradients do not depend on how a batch is split into micro-batches)."""

    def __init__(self, *, embedding_dim: int, image_size: int, hidden: int = 64, dtype=jnp.float32, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(image_size * image_size * 3, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, embedding_dim, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool, dropout_key: jax.Array | None = None) -> jax.Array:
        del train, dropout_key
        return self.fc2(jax.nn.relu(self.fc1(x.reshape(x.shape[0], -1))))


def _iresnet(layers, widths=(64, 128, 256, 512)):
    def build(*, dropout, **kw):
        return IResNet(layers, widths, dropout=dropout, **kw)

    return build


def _no_dropout(cls, **arch):
    def build(*, dropout, **kw):
        if dropout:
            raise ValueError("this backbone has no dropout; set config.model.dropout=0")
        return cls(**arch, **kw)

    return build


# name -> builder(embedding_dim=, image_size=, dropout=, dtype=, rngs=)
BACKBONES: dict[str, Callable[..., nnx.Module]] = {
    **{f"iresnet{depth}": _iresnet(layers) for depth, layers in IRESNET_LAYERS.items()},
    # One block per stage at 1/8 width: for CPU runs and tests.
    "iresnet_narrow": _iresnet((1, 1, 1, 1), (8, 16, 32, 64)),
    "mobilefacenet": _no_dropout(MobileFaceNet),
    "mobilefacenet_narrow": _no_dropout(
        MobileFaceNet,
        blocks=(1, 1, 1, 1),
        widths=(32, 64),
        hidden=(32, 32, 32, 64, 64, 128, 64),
        stem_groups=16,
        head_channels=128,
    ),
    "mlp": _no_dropout(MLP),
}


def create(
    name: str,
    *,
    embedding_dim: int,
    image_size: int = 112,
    dropout: float = 0.0,
    dtype=jnp.float32,
    seed: int = 0,
) -> nnx.Module:
    """Builds backbone ``name`` with parameters initialized from ``seed``."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[name](
        embedding_dim=embedding_dim,
        image_size=image_size,
        dropout=dropout,
        dtype=dtype,
        rngs=nnx.Rngs(seed),
    )


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (BatchNorm running statistics excluded)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
