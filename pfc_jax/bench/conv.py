"""Times each convolution of an iResNet alone: forward, input gradient, weight gradient.

The minimal benchmark behind the train step's backbone figure: for every distinct
convolution of ``--depth`` (NHWC activations, HWIO kernels, computed as the models compute
them: :func:`pfc_jax.models.layers.conv_general_dilated`) it times the three passes a
training step runs, on random data, each as its own compiled program, and reports
milliseconds and GFLOP/s (2 FLOPs per multiply-add) per pass. The total weights each
convolution by how often the network has it: the convolutions' share of one backbone
step, to set beside ``bench train --backbone iresnetN``. ``benchmarks/torch_conv.py``
prints the same table for PyTorch. XLA reads its options when the process starts, so
compare option sets with two runs (e.g. ``PFC_JAX_XLA_DEFAULTS=0``; see
:mod:`pfc_jax.xla_defaults`).
"""

from __future__ import annotations

import dataclasses
import statistics

from pfc_jax.bench.report import Report, cores_available, time_calls
from pfc_jax.errors import InputError

PASSES = ("forward", "input_grad", "weight_grad")


def iresnet_convolutions(layers, widths=(64, 128, 256, 512), size: int = 112):
    """The distinct convolutions of an iResNet on ``size``² inputs, in network order:
    dicts of name, height (of the input), cin, cout, kernel, stride, count (how many the
    network has)."""
    convs = [dict(name=f"stem 3→{widths[0]}", height=size, cin=3, cout=widths[0], kernel=3, stride=1, count=1)]
    cin, h = widths[0], size
    for n, c in zip(layers, widths):
        convs += [
            dict(name=f"{h}² {cin}→{c}", height=h, cin=cin, cout=c, kernel=3, stride=1, count=1),
            dict(name=f"{h}² {c}→{c} /2", height=h, cin=c, cout=c, kernel=3, stride=2, count=1),
            dict(name=f"{h}² {cin}→{c} 1×1 /2", height=h, cin=cin, cout=c, kernel=1, stride=2, count=1),
        ]
        h //= 2
        if n > 1:
            convs.append(dict(name=f"{h}² {c}→{c}", height=h, cin=c, cout=c, kernel=3, stride=1, count=2 * (n - 1)))
        cin = c
    return convs


@dataclasses.dataclass
class ConvReport(Report):
    benchmark: str
    platform: str
    depth: int
    batch: int
    size: int
    dtype: str
    steps: int
    cores: int
    xla_options: str
    layers: list  # per convolution: its shape, count, and for each pass ms and gflops
    total_ms: dict  # per pass: sum over convolutions of ms x count
    cores_used: float  # the process's CPU time / wall time over all timed passes

    def title(self) -> str:
        return (
            f"convolutions  iresnet{self.depth} {self.dtype}, batch {self.batch} of {self.size}×{self.size} "
            f"on {self.platform} ({self.cores} cores, {self.cores_used:.2f} busy); "
            "ms (GFLOP/s): forward / input grad / weight grad"
        )

    def rows(self):
        rows = [
            (
                f"{layer['name']} ×{layer['count']}",
                " / ".join(f"{layer[p]['ms']:8.1f} ({layer[p]['gflops']:5.1f})" for p in PASSES),
            )
            for layer in self.layers
        ]
        total = sum(self.total_ms.values())
        rows.append(("all, × count", " / ".join(f"{self.total_ms[p]:8.0f}" for p in PASSES) + f"  = {total:,.0f} ms"))
        rows.append(("XLA options", self.xla_options or "none of pfc_jax.xla_defaults"))
        return rows


def add_arguments(p) -> None:
    from pfc_jax import cli

    p.add_argument("--depth", type=int, default=18, help="iResNet depth: 18, 34, 50, 100 or 200")
    p.add_argument("--batch", type=cli.positive_int, default=32)
    p.add_argument("--size", type=cli.positive_int, default=112, help="input height and width")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "bf16"), default="float32")
    p.add_argument("--steps", type=cli.positive_int, default=5)
    p.add_argument("--warmup", type=cli.non_negative_int, default=1)


def _passes(stride: int, kernel: int):
    import jax

    from pfc_jax.models import layers

    def conv(x, w):  # as the backbones run it (nnx.Conv with layers.conv_general_dilated)
        pad = kernel // 2
        dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        return layers.conv_general_dilated(x, w, (stride, stride), [(pad, pad)] * 2, dimension_numbers=dims)

    def input_grad(x, w, g):
        return jax.vjp(lambda x: conv(x, w), x)[1](g)[0]

    def weight_grad(x, w, g):
        return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]

    return {"forward": lambda x, w, g: conv(x, w), "input_grad": input_grad, "weight_grad": weight_grad}


def run(args) -> ConvReport:
    from pfc_jax.models.iresnet import IRESNET_LAYERS

    if args.depth not in IRESNET_LAYERS:
        raise InputError(f"--depth {args.depth}: iResNet depths are {', '.join(map(str, IRESNET_LAYERS))}")
    if args.size % 16:
        raise InputError(f"--size {args.size}: an iResNet halves the input four times; give a multiple of 16")
    import jax
    import jax.numpy as jnp

    from pfc_jax import xla_defaults

    dtype = jnp.bfloat16 if args.dtype in ("bfloat16", "bf16") else jnp.float32
    key = jax.random.key(0)
    layers, totals, cpu_ms, wall_ms = [], dict.fromkeys(PASSES, 0.0), [], []
    for conv in iresnet_convolutions(IRESNET_LAYERS[args.depth], size=args.size):
        b, h, k, s = args.batch, conv["height"], conv["kernel"], conv["stride"]
        ho = h // s
        kx, kw, kg = jax.random.split(jax.random.fold_in(key, len(layers)), 3)
        x = jax.random.normal(kx, (b, h, h, conv["cin"]), dtype)
        w = jax.random.normal(kw, (k, k, conv["cin"], conv["cout"]), dtype)
        g = jax.random.normal(kg, (b, ho, ho, conv["cout"]), dtype)
        flops = 2.0 * b * ho * ho * conv["cout"] * conv["cin"] * k * k
        row = dict(conv)
        for name, fn in _passes(s, k).items():
            compiled = jax.jit(fn).lower(x, w, g).compile()
            cpu = []
            ms = time_calls(compiled, (x, w, g), warmup=args.warmup, steps=args.steps, cpu_ms=cpu)
            med = statistics.median(ms)
            row[name] = {"ms": med, "gflops": flops / med / 1e6}
            totals[name] += med * conv["count"]
            cpu_ms += cpu
            wall_ms += ms
        layers.append(row)
    return ConvReport(
        benchmark="conv",
        platform=jax.devices()[0].platform,
        depth=args.depth,
        batch=args.batch,
        size=args.size,
        dtype=jnp.dtype(dtype).name,
        steps=args.steps,
        cores=cores_available(),
        xla_options=" ".join(xla_defaults.in_effect()),
        layers=layers,
        total_ms=totals,
        cores_used=sum(cpu_ms) / sum(wall_ms),
    )
