"""Times the trainer's own step, built from a recipe as ``main`` builds it.

The full step (:meth:`pfc_jax.step.TrainStep.jit`: backbone forward/backward, head, both
optimizer updates) and the backbone's part of it alone
(:meth:`~pfc_jax.step.TrainStep.jit_backbone_step`: the same forward, backward and
optimizer, a stand-in loss instead of the head), timed on one fixed synthetic batch: the
ratio is the head's overhead. Both report XLA's compiled memory and the device's peak;
the backbone runs first, before the head's state exists, so its peak is its own. Flags
override the recipe's head, classes, sample rate, backbone, batch and dtype. With DCQ the
full step includes the EMA encoder's forward pass and update (the head's keys), so its
"head overhead" is that of the method.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from pfc_jax.bench.report import (
    Report,
    compiled_bytes,
    cores_available,
    device_peak_bytes,
    mib,
    select_devices,
    time_steps,
)
from pfc_jax.errors import InputError


@dataclasses.dataclass
class TrainReport(Report):
    benchmark: str
    config: str
    platform: str
    device_kind: str
    devices: int
    backbone: str
    dtype: str
    head: str
    classes: int
    rate: float | None  # Partial FC's sample rate
    batch: int
    steps: int
    ms_per_step: float
    samples_per_sec: float
    backbone_ms_per_step: float
    backbone_samples_per_sec: float
    head_overhead: float  # full / backbone alone - 1
    backbone_share: float  # backbone alone / full step
    cores_used: float  # the process's CPU time / wall time over the timed full steps
    backbone_cores_used: float  # the same over the backbone's steps
    cores: int  # the host cores the process may use
    xla_options: str  # XLA_FLAGS entries of pfc_jax.xla_defaults.OPTIONS in effect, "" for none
    compile_s: float
    compiled_temp_bytes: int | None
    compiled_total_bytes: int | None
    peak_bytes: int | None
    backbone_compiled_temp_bytes: int | None
    backbone_compiled_total_bytes: int | None
    backbone_peak_bytes: int | None

    def title(self) -> str:
        return (
            f"train step  {self.backbone} {self.dtype}, {self.head}"
            + (f" rate={self.rate}" if self.rate is not None else "")
            + f", C={self.classes:,} B={self.batch} "
            f"on {self.devices} x {self.device_kind} ({self.platform})"
        )

    def rows(self):
        return [
            (
                "full step",
                f"{self.samples_per_sec:,.1f} samples/s ({self.ms_per_step:.1f} ms/step, "
                f"compile {self.compile_s:.1f} s)",
            ),
            (
                "backbone alone",
                f"{self.backbone_samples_per_sec:,.1f} samples/s ({self.backbone_ms_per_step:.1f} ms/step)",
            ),
            ("head overhead", f"{100 * self.head_overhead:.1f}% (full / backbone = {1 + self.head_overhead:.3f})"),
            ("backbone share", f"{100 * self.backbone_share:.1f}% of the full step"),
            (
                "host cores busy",
                f"{self.cores_used:.2f} of {self.cores} (full step), {self.backbone_cores_used:.2f} (backbone alone)",
            ),
            ("XLA options", self.xla_options or "none of pfc_jax.xla_defaults"),
            (
                "memory, full step",
                f"compiled total {mib(self.compiled_total_bytes)}, temporaries {mib(self.compiled_temp_bytes)}, "
                f"peak {mib(self.peak_bytes)} (per device)",
            ),
            (
                "memory, backbone alone",
                f"compiled total {mib(self.backbone_compiled_total_bytes)}, "
                f"temporaries {mib(self.backbone_compiled_temp_bytes)}, peak {mib(self.backbone_peak_bytes)}",
            ),
        ]


def add_arguments(p) -> None:
    from pfc_jax import cli

    p.add_argument("--config", required=True, help="config file, e.g. configs/synthetic.py")
    p.add_argument(
        "--classes", type=cli.positive_int, default=None, help="number of identities (default: the config's)"
    )
    p.add_argument("--head", default=None, help="head name: partial_fc, dcq, f2c (default: the config's)")
    p.add_argument("--rate", type=float, default=None, help="partial_fc's sample rate (default: the config's)")
    p.add_argument("--backbone", default=None, help="backbone name (default: the config's)")
    p.add_argument("--batch", type=cli.positive_int, default=None, help="global batch (default: the config's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "bf16"), default=None)
    p.add_argument(
        "--devices", type=cli.positive_int, default=None, help="devices to use (default: all; on CPU, fakes this many)"
    )
    p.add_argument("--steps", type=cli.positive_int, default=10)
    p.add_argument("--warmup", type=cli.non_negative_int, default=2)


def load_config(path: str):
    """The recipe at ``path`` (its ``get_config()``); bad files are an :class:`InputError`."""
    import pathlib
    import runpy

    if not pathlib.Path(path).is_file():
        raise InputError(f"--config {path}: no such file (give a recipe such as configs/synthetic.py)")
    try:
        return runpy.run_path(path)["get_config"]()
    except Exception as e:  # noqa: BLE001 - whatever the recipe raised
        raise InputError(f"cannot load --config {path}: {type(e).__name__}: {e} (fix the recipe)") from None


def run(args) -> TrainReport:
    if args.rate is not None and not 0.0 <= args.rate <= 1.0:
        raise InputError(f"--rate must be in [0, 1], got {args.rate}")
    config = load_config(args.config)
    import jax
    import numpy as np

    from pfc_jax import heads, sharding, train, xla_defaults
    from pfc_jax.config_validation import validate

    devices = select_devices(args.devices)
    mesh = sharding.make_mesh(devices)
    if args.head is not None:
        config.head.name = args.head
    if args.rate is not None:
        config.head.sample_rate = args.rate
    if args.backbone is not None:
        config.model.name = args.backbone
    if args.batch is not None:
        config.global_batch_size = args.batch
    if args.dtype is not None:
        config.dtype = "bfloat16" if args.dtype == "bf16" else args.dtype
    config.total_steps = config.total_steps or 1000
    config.data.source, config.data.path = "synthetic", ""  # never read a dataset here
    config.eval.bins = ""
    validate(config, num_devices=len(devices))
    num_classes = args.classes or config.data.synthetic.num_identities
    setup = train.build(config, mesh, num_classes=num_classes, num_examples=10 * config.global_batch_size)
    trainer = setup.trainer
    b, size = config.global_batch_size, config.data.image_size
    rng = np.random.default_rng(0)
    batch = sharding.batch_sharding(mesh)
    images = jax.device_put(rng.integers(0, 256, (b, size, size, 3), dtype=np.uint8), batch)
    # Consecutive runs of the images per identity the head needs (DCQ: pairs), as its sampler gives.
    group = heads.HEADS[config.head.name].images_per_identity and heads.requirements(config).images_per_identity
    labels = rng.integers(0, num_classes, b // (group or 1)).repeat(group or 1).astype(np.int32)
    labels = jax.device_put(labels, batch)

    # The backbone alone first, on a state without the head: the device's peak memory
    # after it is its own (the peak only grows).
    without_head = jax.jit(
        lambda *a: trainer.init_state(*a)._replace(head=None), out_shardings=trainer.state_shardings._replace(head=None)
    )
    state = without_head(setup.params, setup.batch_stats, jax.random.key(config.seed))
    backbone = trainer.jit_backbone_step().lower(state, images).compile()
    backbone_cpu = []
    state, _, backbone_ms = time_steps(
        backbone, state, lambda i: (images,), warmup=args.warmup, steps=args.steps, cpu_ms=backbone_cpu
    )
    backbone_peak = device_peak_bytes(devices)
    backbone_memory = compiled_bytes(backbone.memory_analysis(), prefix="backbone_")

    # The full step: the same function main compiles, on the same batch.
    state = state._replace(
        head=jax.jit(trainer.head.init_state, out_shardings=trainer.head.state_shardings())(
            jax.random.key(config.seed + 1)
        )
    )
    start = time.perf_counter()
    full = trainer.jit().lower(state, images, labels).compile()
    compile_s = time.perf_counter() - start
    full_cpu = []
    state, _, full_ms = time_steps(
        full, state, lambda i: (images, labels), warmup=args.warmup, steps=args.steps, cpu_ms=full_cpu
    )

    full_med, backbone_med = statistics.median(full_ms), statistics.median(backbone_ms)
    return TrainReport(
        benchmark="train",
        config=args.config,
        platform=devices[0].platform,
        device_kind=devices[0].device_kind,
        devices=len(devices),
        backbone=config.model.name,
        dtype=config.dtype,
        head=config.head.name,
        classes=num_classes,
        rate=config.head.sample_rate if config.head.name == "partial_fc" else None,
        batch=b,
        steps=args.steps,
        ms_per_step=full_med,
        samples_per_sec=b / full_med * 1e3,
        backbone_ms_per_step=backbone_med,
        backbone_samples_per_sec=b / backbone_med * 1e3,
        head_overhead=full_med / backbone_med - 1.0,
        backbone_share=backbone_med / full_med,
        cores_used=sum(full_cpu) / sum(full_ms),
        backbone_cores_used=sum(backbone_cpu) / sum(backbone_ms),
        cores=cores_available(),
        xla_options=" ".join(xla_defaults.in_effect()),
        compile_s=compile_s,
        **compiled_bytes(full.memory_analysis()),
        peak_bytes=device_peak_bytes(devices),
        **backbone_memory,
        backbone_peak_bytes=backbone_peak,
    )
