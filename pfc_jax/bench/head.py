"""Times one whole Partial FC head step on a fixed batch of embeddings.

Sample, gather, forward, backward and the sparse optimizer update, with a new sampling
key every step. Reports the median / min / max milliseconds per step, the per-device
sizes that dominate memory (centers + optimizer rows, the logits) and the peak device
memory where the backend reports it (GPU/TPU), else XLA's compiled estimate.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from pfc_jax.bench.report import Report, compiled_bytes, device_peak_bytes, mib, select_devices, time_steps
from pfc_jax.errors import InputError


@dataclasses.dataclass
class HeadReport(Report):
    benchmark: str
    platform: str
    device_kind: str
    devices: int
    classes: int
    batch: int
    dim: int
    rate: float
    optimizer: str
    logits_dtype: str
    num_local: int
    num_sample: int
    steps: int
    ms_per_step: float
    ms_min: float
    ms_max: float
    compile_s: float
    loss_first: float
    loss_last: float
    centers_and_state_bytes: int  # per device: what dominates memory
    logits_bytes: int
    compiled_temp_bytes: int | None
    compiled_total_bytes: int | None
    peak_bytes: int | None

    def title(self) -> str:
        return (
            f"head step  C={self.classes:,} B={self.batch} D={self.dim} rate={self.rate} "
            f"on {self.devices} x {self.device_kind} ({self.platform})"
        )

    def rows(self):
        return [
            ("sampled per shard", f"{self.num_sample:,} of {self.num_local:,} rows"),
            (
                "ms/step",
                f"median {self.ms_per_step:.2f}  min {self.ms_min:.2f}  max {self.ms_max:.2f}  "
                f"({self.steps} steps; compile {self.compile_s:.1f} s)",
            ),
            ("centers + optimizer rows", f"{mib(self.centers_and_state_bytes)} per device"),
            ("logits", f"{mib(self.logits_bytes)} per device"),
            ("compiled", f"temporaries {mib(self.compiled_temp_bytes)}, total {mib(self.compiled_total_bytes)}"),
            ("peak", mib(self.peak_bytes)),
            ("loss", f"{self.loss_first:.3f} -> {self.loss_last:.3f}"),
        ]


def add_arguments(p) -> None:
    from pfc_jax import cli

    p.add_argument("--classes", type=cli.positive_int, required=True, help="number of identities C")
    p.add_argument("--batch", type=cli.positive_int, default=256, help="global batch B")
    p.add_argument("--dim", type=cli.positive_int, default=512, help="embedding size D")
    p.add_argument("--rate", type=float, default=0.1, help="sample rate in [0, 1]")
    p.add_argument(
        "--devices",
        type=cli.positive_int,
        default=None,
        help="devices to shard over (default: all; on CPU, fakes this many)",
    )
    p.add_argument("--steps", type=cli.positive_int, default=10, help="timed steps")
    p.add_argument("--warmup", type=cli.non_negative_int, default=2, help="untimed steps after compiling")
    p.add_argument(
        "--optimizer", choices=("sgd", "adamw"), default="sgd", help="sgd: momentum 0.9, wd 5e-4 (the field's recipe)"
    )
    p.add_argument("--margin", choices=("arcface", "cosface"), default="arcface")
    p.add_argument("--logits-dtype", choices=("float32", "bfloat16"), default="float32")


def run(args) -> HeadReport:
    if not 0.0 <= args.rate <= 1.0:
        raise InputError(f"--rate must be in [0, 1], got {args.rate}")
    import jax
    import jax.numpy as jnp

    from pfc_jax import optim, sharding
    from pfc_jax.heads import margins
    from pfc_jax.heads.partial_fc import PartialFC

    devices = select_devices(args.devices)
    if args.batch % len(devices):
        raise InputError(f"--batch {args.batch} must be a multiple of --devices {len(devices)}")
    mesh = sharding.make_mesh(devices)
    tx = optim.sgd(0.1, 0.9, 5e-4) if args.optimizer == "sgd" else optim.adamw(1e-3)
    head = PartialFC(
        mesh,
        num_classes=args.classes,
        embedding_dim=args.dim,
        sample_rate=args.rate,
        margin=margins.arcface() if args.margin == "arcface" else margins.cosface(),
        optimizer=tx,
        logits_dtype=jnp.dtype(args.logits_dtype),
    )
    k_state, k_emb, k_lab, k_step = jax.random.split(jax.random.key(0), 4)
    batch = sharding.batch_sharding(mesh)
    state = head.init(k_state)
    embeddings = jax.device_put(jax.random.normal(k_emb, (args.batch, args.dim)), batch)
    labels = jax.device_put(jax.random.randint(k_lab, (args.batch,), 0, args.classes), batch)

    start = time.perf_counter()
    compiled = head.jit_step().lower(state, embeddings, labels, k_step).compile()
    compile_s = time.perf_counter() - start
    state, outputs, times = time_steps(
        compiled,
        state,
        lambda i: (embeddings, labels, jax.random.fold_in(k_step, i)),
        warmup=args.warmup,
        steps=args.steps,
    )
    losses = [float(metrics["loss"]) for _, metrics in outputs]
    row_leaves = sum(1 for leaf in jax.tree.leaves(state.opt_state) if leaf.shape == state.centers.shape)
    return HeadReport(
        benchmark="head",
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        devices=len(devices),
        classes=args.classes,
        batch=args.batch,
        dim=args.dim,
        rate=args.rate,
        optimizer=args.optimizer,
        logits_dtype=args.logits_dtype,
        num_local=head.num_local,
        num_sample=head.num_sample(args.batch),
        steps=args.steps,
        ms_per_step=statistics.median(times),
        ms_min=min(times),
        ms_max=max(times),
        compile_s=compile_s,
        loss_first=losses[0],
        loss_last=losses[-1],
        centers_and_state_bytes=head.num_local * args.dim * 4 * (1 + row_leaves),
        logits_bytes=args.batch * head.num_sample(args.batch) * 4,
        **compiled_bytes(compiled.memory_analysis()),
        peak_bytes=device_peak_bytes(devices),
    )
