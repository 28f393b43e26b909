"""The backbone zoo, chosen by name (``config.model.name``).

Every backbone maps normalized images [N, H, W, 3] (float, [-1, 1]) to embeddings
[N, embedding_dim] and is called as ``model(x, train=..., dropout_key=...)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pfc_jax.models.iresnet import IRESNET_LAYERS, IResNet
from pfc_jax.models.mixfacenet import MIXNET_M, MIXNET_S, MixFaceNet, Unit
from pfc_jax.models.mobilefacenet import MobileFaceNet
from pfc_jax.models.vargfacenet import VarGFaceNet
from pfc_jax.models.vit import VisionTransformer


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
    # arcface_torch's ViTs as its WebFace42M recipes train them (vit_t_dp005_mask0,
    # vit_s_dp005_mask_0, vit_b_dp005_mask_005, vit_l_dp005_mask_005: drop path 0.05; the
    # "mask_005" ones drop 10 % of the tokens in training, which is what that code does).
    **{
        f"vit_{size}": _no_dropout(
            VisionTransformer, embed_dim=dim, depth=depth, num_heads=8, drop_path_rate=0.05, mask_ratio=mask
        )
        for size, dim, depth, mask in (
            ("t", 256, 12, 0.0),
            ("s", 512, 12, 0.0),
            ("b", 512, 24, 0.1),
            ("l", 768, 24, 0.1),
        )
    },
    "vit_narrow": _no_dropout(
        VisionTransformer, embed_dim=32, depth=2, num_heads=2, patch_size=8, drop_path_rate=0.1, mask_ratio=0.1
    ),
    "vargfacenet": _no_dropout(VarGFaceNet),
    "vargfacenet_narrow": _no_dropout(VarGFaceNet, widths=(8, 16, 32, 64), units=(1, 1, 2), last_channels=128),
    # MixFaceNet-XS/S/M and their Shuffle variants (the paper's models, from the official code).
    **{
        f"{prefix}mixfacenet_{size}": _no_dropout(
            MixFaceNet, stages=stages, stem_channels=stem, width=width, gdw=gdw, shuffle=bool(prefix)
        )
        for prefix in ("", "shuffle")
        for size, stages, stem, width, gdw in (
            ("xs", MIXNET_S, 16, 0.5, 512),
            ("s", MIXNET_S, 16, 1.0, 1024),
            ("m", MIXNET_M, 24, 1.0, 1024),
        )
    },
    # One unit per stage (two in the last), every kind of layer: mixed kernels, grouped
    # 1x1s, SE, shuffle.
    "shufflemixfacenet_narrow": _no_dropout(
        MixFaceNet,
        stages=(
            (Unit(8, 2, 1, 2, 3, 0),),
            (Unit(16, 1, 3, 2, 3, 2),),
            (Unit(16, 2, 2, 2, 3, 4),),
            (Unit(24, 1, 2, 1, 3, 2), Unit(32, 2, 3, 2, 3, 2)),
        ),
        stem_channels=8,
        gdw=64,
        shuffle=True,
    ),
    "mlp": _no_dropout(MLP),
}


# Compute dtypes by name (config.dtype, config.head.logits_dtype).
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Everything needed to build a backbone: the one description of a model.

    Built from a run's config (:meth:`from_config`), saved in every checkpoint's metadata
    (:meth:`to_dict`) and read back by every consumer (:meth:`from_dict`: resume,
    inference, evaluation, export), so that they all build the same network.

    Attributes:
      name: a key of :data:`BACKBONES`.
      embedding_dim: size of the embedding.
      image_size: side of the square input images.
      dropout: dropout rate before the final FC (backbones that have one).
      dtype: training compute dtype, a key of :data:`DTYPES` (parameters stay float32).
        It does not change the parameters: a checkpoint loads under any dtype.
    """

    name: str
    embedding_dim: int
    image_size: int = 112
    dropout: float = 0.0
    dtype: str = "float32"

    @classmethod
    def from_config(cls, config) -> ModelSpec:
        m = config.model
        return cls(m.name, m.embedding_dim, config.data.image_size, m.dropout, config.dtype)

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        """From :meth:`to_dict`; also reads the metadata of checkpoints written before the
        spec existed (no ``dtype``: float32)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model fields {sorted(unknown)} (written by a newer pfc_jax?)")
        return cls(**d)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def same_network(self, other: ModelSpec) -> bool:
        """True when both build the same parameters (the compute dtype may differ)."""
        return dataclasses.replace(self, dtype=other.dtype) == other

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    def create(self, seed: int = 0, *, dtype: str | None = None) -> nnx.Module:
        """The backbone with parameters initialized from ``seed``, computing in ``dtype``
        (default: the spec's; inference uses float32)."""
        return create(
            self.name,
            embedding_dim=self.embedding_dim,
            image_size=self.image_size,
            dropout=self.dropout,
            dtype=DTYPES[dtype or self.dtype],
            seed=seed,
        )


# XLA options for programs that run once (initialization): compile fast, run slower.
_QUICK_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_once(fn, *args, **jit_kwargs):
    """``jax.jit(fn, **jit_kwargs)(*args)`` compiled without XLA's backend optimizations:
    for programs that run once, such as initialization, whose compile time would
    otherwise dominate (e.g. ~6 s vs ~1.5 s for a narrow iResNet's initializers on a
    2-core CPU)."""
    try:
        compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile(_QUICK_COMPILE)
    except Exception:  # noqa: BLE001 - a backend that rejects the options: compile as usual
        compiled = jax.jit(fn, **jit_kwargs).lower(*args).compile()
    return compiled(*args)


def init(spec: ModelSpec, seed: int = 0) -> nnx.Module:
    """``spec.create(seed)`` as one compiled program: the same parameters, but one XLA
    compilation instead of one per initializer (tens of them, ~9 s for a narrow iResNet
    on a 2-core CPU), see :func:`run_once`."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: spec.create(seed)))
    return nnx.merge(graphdef, run_once(lambda: nnx.state(spec.create(seed))))


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
