"""Parameters and multiply-adds of backbones, beside the published figures.

    python -m pfc_jax.bench flops --backbone vit_s
    python -m pfc_jax.bench flops --backbone all

MACs are the multiply-accumulates of every convolution and matrix product of one
inference forward pass at batch 1, counted on the traced program (a convolution:
output elements x kernel taps x input channels per group; a matrix product: output
elements x contracted size; ViT's attention products included). That is the convention
of arcface_torch's table ("GFLOPs" there are MACs), up to the BatchNorm, activation and
bias elements some counters add. VarGFaceNet's and MixFaceNets' papers count FLOPs as
about 2 x MACs (their own counters: see :data:`PUBLISHED`). XLA's cost analysis of the
compiled forward pass is given beside it: 2 flops per MAC plus every elementwise
operation, as XLA counts them.
"""

from __future__ import annotations

import dataclasses
import math

from pfc_jax.bench.report import Report
from pfc_jax.errors import InputError

# name -> (parameters of the official code, trainable; published cost; its source and convention).
PUBLISHED = {
    "iresnet18": (24_025_088, "2.6 G", "arcface_torch README; MACs incl. BN/PReLU (ptflops)"),
    "iresnet34": (34_138_816, "-", "not in arcface_torch's table"),
    "iresnet50": (43_590_336, "6.3 G", "arcface_torch README; MACs incl. BN/PReLU (ptflops)"),
    "iresnet100": (65_155_648, "12.1 G", "arcface_torch README; MACs incl. BN/PReLU (ptflops)"),
    "iresnet200": (118_833_408, "23.5 G", "arcface_torch README; MACs incl. BN/PReLU (ptflops)"),
    "mobilefacenet": (2_059_520, "0.45 G", "arcface_torch README ('mbf'); MACs incl. BN/PReLU"),
    "vit_t": (19_137_792, "1.5 G", "arcface_torch README; MACs incl. attention"),
    "vit_s": (76_023_296, "5.7 G", "arcface_torch README; MACs incl. attention"),
    "vit_b": (113_833_472, "11.4 G", "arcface_torch README; MACs incl. attention"),
    "vit_l": (255_684_352, "25.3 G", "arcface_torch README; MACs incl. attention"),
    "vargfacenet": (5_198_292, "1022 M", "paper and official README; FLOPs ~ 2 x MACs (insightface's counter)"),
    "mixfacenet_xs": (1_040_354, "161.9 M", "paper Table 2; FLOPs = 2 x MACs + BN, activation, pooling"),
    "mixfacenet_s": (3_072_598, "451.7 M", "paper Table 2; FLOPs = 2 x MACs + BN, activation, pooling"),
    "mixfacenet_m": (3_952_534, "626.1 M", "paper Table 2; FLOPs = 2 x MACs + BN, activation, pooling"),
    "shufflemixfacenet_xs": (1_040_354, "161.9 M", "paper Table 2; as MixFaceNet-XS"),
    "shufflemixfacenet_s": (3_072_598, "451.7 M", "paper Table 2; as MixFaceNet-S"),
    "shufflemixfacenet_m": (3_952_534, "626.1 M", "paper Table 2; as MixFaceNet-M"),
}


@dataclasses.dataclass
class FlopsReport(Report):
    benchmark: str
    image_size: int
    embedding_dim: int
    backbones: list  # one dict per backbone: name, params, macs, macs_conv, macs_matmul, xla_flops, published...

    def title(self) -> str:
        return (
            f"backbones at {self.image_size}x{self.image_size}, {self.embedding_dim}-d embedding, batch 1 "
            "(MACs: convolutions and matrix products; XLA: its cost analysis)"
        )

    def rows(self):
        out = []
        for b in self.backbones:
            official = b["official_params"]
            check = (
                "" if official is None else (" = official" if b["params"] == official else f" (official {official:,})")
            )
            published = f"; published {b['published']}" if b["published"] else ""
            out.append(
                (
                    b["name"],
                    f"{b['params']:,} params{check}; {b['macs'] / 1e6:,.1f} M MACs "
                    f"(conv {b['macs_conv'] / 1e6:,.1f} + matmul {b['macs_matmul'] / 1e6:,.1f}); "
                    f"XLA {b['xla_flops'] / 1e6:,.1f} M flops{published}",
                )
            )
        return out


def add_arguments(p) -> None:
    from pfc_jax import cli

    p.add_argument("--backbone", required=True, help="a backbone name, several separated by commas, or 'all'")
    p.add_argument("--image-size", type=cli.positive_int, default=112)
    p.add_argument("--embedding-dim", type=cli.positive_int, default=512)


def count_macs(jaxpr) -> tuple[int, int]:
    """(convolution MACs, matrix-product MACs) of a jaxpr, nested jaxprs included."""
    conv = matmul = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out, rhs = eqn.outvars[0].aval, eqn.invars[1].aval
            spec = eqn.params["dimension_numbers"].rhs_spec  # (out, in, spatial...)
            taps = math.prod(rhs.shape[a] for a in spec[2:])
            conv += math.prod(out.shape) * taps * rhs.shape[spec[1]]
        elif name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            matmul += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs.shape[a] for a in contract)
        for sub in _subjaxprs(eqn):
            c, m = count_macs(sub)
            conv, matmul = conv + c, matmul + m
    return conv, matmul


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if hasattr(v, "eqns"):
                yield v
            elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
                yield v.jaxpr


def measure(name: str, *, image_size: int = 112, embedding_dim: int = 512) -> dict:
    """Parameters, MACs and XLA's flops of backbone ``name``'s inference forward at batch 1."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from pfc_jax import models

    model = nnx.eval_shape(lambda: models.create(name, embedding_dim=embedding_dim, image_size=image_size))
    graphdef, state = nnx.split(model)
    forward = lambda state, x: nnx.merge(graphdef, state)(x, train=False)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    conv, matmul = count_macs(jax.make_jaxpr(forward)(state, x).jaxpr)
    cost = jax.jit(forward).lower(state, x).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    official, published, source = PUBLISHED.get(name, (None, None, None))
    return {
        "name": name,
        "params": models.count_params(model),
        "official_params": official,
        "macs": conv + matmul,
        "macs_conv": conv,
        "macs_matmul": matmul,
        "xla_flops": int(cost.get("flops", 0)) if cost else None,
        "published": published if published != "-" else None,
        "published_source": source,
    }


def run(args) -> FlopsReport:
    from pfc_jax import models

    names = sorted(models.BACKBONES) if args.backbone == "all" else [n.strip() for n in args.backbone.split(",")]
    unknown = [n for n in names if n not in models.BACKBONES]
    if unknown:
        raise InputError(f"--backbone: unknown {', '.join(unknown)} (backbones: {', '.join(sorted(models.BACKBONES))})")
    return FlopsReport(
        benchmark="flops",
        image_size=args.image_size,
        embedding_dim=args.embedding_dim,
        backbones=[measure(n, image_size=args.image_size, embedding_dim=args.embedding_dim) for n in names],
    )
