"""Times the input pipeline alone: read, JPEG decode, augment, batch.

Reports images/s and images per CPU-second (all of the process's and its workers' CPU
time). Without ``--source`` it writes a temporary synthetic RecordIO dataset of 112x112
JPEGs, removed afterwards whatever happens.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time

from pfc_jax.bench.report import Report


@dataclasses.dataclass
class DataReport(Report):
    benchmark: str
    source: str
    images: int
    workers: int
    threads: int
    augment: str
    images_per_sec: float
    images_per_cpu_sec: float | None
    cpu_count: int | None

    def title(self) -> str:
        return (
            f"data pipeline  {self.source}, augment={self.augment}, {self.workers} worker process(es), "
            f"{self.threads} thread(s)"
        )

    def rows(self):
        per_cpu = "n/a" if self.images_per_cpu_sec is None else f"{self.images_per_cpu_sec:,.0f}"
        return [
            ("images/s", f"{self.images_per_sec:,.0f} ({self.images} images)"),
            ("images per CPU-second", f"{per_cpu} ({self.cpu_count} CPUs)"),
        ]


def add_arguments(p) -> None:
    from pfc_jax import cli

    p.add_argument(
        "--source",
        default=None,
        help="rec:DIR | folder:DIR | tfds:NAME@DATA_DIR | synthetic (default: a temporary RecordIO of JPEGs)",
    )
    p.add_argument("--workers", type=cli.non_negative_int, default=0, help="worker processes (0: threads only)")
    p.add_argument("--threads", type=cli.positive_int, default=2, help="reader threads per process")
    p.add_argument("--batch", type=cli.positive_int, default=256)
    p.add_argument("--batches", type=cli.positive_int, default=20, help="timed batches")
    p.add_argument(
        "--augment",
        choices=("flip", "all"),
        default="flip",
        help="flip: random horizontal flips only; all: every augmentation with probability 0.5",
    )


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live descendants (Linux /proc)."""
    total = sum(os.times()[:2])
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        children = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append((int(pid), (int(fields[11]) + int(fields[12])) / ticks))
        stack = [os.getpid()]
        while stack:
            for pid, seconds in children.get(stack.pop(), []):
                total += seconds
                stack.append(pid)
    except (OSError, ValueError):
        pass
    return total


def _open(spec: str):
    from pfc_jax.data.prepare import open_source
    from pfc_jax.data.sources import TFDSDataset
    from pfc_jax.data.synthetic import SyntheticIdentities

    if spec == "synthetic":
        return SyntheticIdentities(1000, 50)
    if spec.startswith("tfds:"):
        name, _, data_dir = spec[5:].partition("@")
        return TFDSDataset(data_dir, name)
    return open_source(spec)


def run(args) -> DataReport:
    from pfc_jax.data import pipeline, synth
    from pfc_jax.data.augment import Augment

    tmp = tempfile.mkdtemp(prefix="pfc_bench_data_") if args.source is None else None
    try:
        spec = args.source
        if tmp is not None:
            synth.write(os.path.join(tmp, "rec"), identities=100, images_per_id=30, pairs=0, progress=False)
            spec = f"rec:{os.path.join(tmp, 'rec')}"
        source = _open(spec)
        size = source[0]["image"].shape[0] if "image" in source[0] else 112
        augment = Augment() if args.augment == "flip" else Augment(0.5, 0.5, 0.5, 0.5, 0.5)
        it = pipeline.make_iterator(
            source,
            global_batch=args.batch,
            seed=0,
            image_size=size,
            augment=augment,
            threads=args.threads,
            workers=args.workers,
        )
        try:
            for _ in range(3):  # start workers, fill buffers
                next(it)
            cpu0, t0 = cpu_seconds(), time.perf_counter()
            for _ in range(args.batches):
                next(it)
            wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        finally:
            it.close()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    n = args.batches * args.batch
    return DataReport(
        benchmark="data",
        source=args.source or "temporary RecordIO (synthetic 112x112 JPEGs, q95)",
        images=n,
        workers=args.workers,
        threads=args.threads,
        augment=args.augment,
        images_per_sec=n / wall,
        images_per_cpu_sec=n / cpu if cpu > 0 else None,
        cpu_count=os.cpu_count(),
    )
