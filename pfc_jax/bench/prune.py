"""Times Face-NMS's suppression (``pfc_jax.data.prune``) on synthetic embeddings.

    python -m pfc_jax.bench prune --images 1000000 --dim 128

Random unit embeddings, identities with a Pareto law of images (as web-crawled face
datasets: most identities small, a long tail up to ``--max-images``), each identity a
cluster around its own center so that similarities within an identity are high, as a
trained proxy model gives them. Reports the time of one suppression at a fixed threshold,
of the search for a keep ratio, and the work: ``sum over identities of n^2`` similarity
entries, against ``N^2`` for comparing every pair of the dataset.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from pfc_jax.bench.report import Report


@dataclasses.dataclass
class PruneReport(Report):
    benchmark: str
    images: int
    identities: int
    dim: int
    max_images: int
    pair_entries: int  # sum of n_c^2
    setup_s: float  # ranking, bucketing, similarity matrices
    suppress_s: float  # one pass at --threshold
    kept_at_threshold: int
    threshold: float
    ratio: float
    search_s: float  # the --keep-ratio search
    kept_at_ratio: int
    ratio_threshold: float

    def title(self) -> str:
        return (
            f"Face-NMS suppression  {self.images:,} embeddings, {self.identities:,} identities "
            f"(at most {self.max_images} images), {self.dim}-d"
        )

    def rows(self):
        n = self.images
        return [
            ("similarity entries", f"{self.pair_entries:,} (sum of n_c^2; all pairs would be {n * n:,.3g})"),
            ("ranking + similarities", f"{self.setup_s:.2f} s"),
            (
                f"suppression at {self.threshold}",
                f"{self.suppress_s:.2f} s ({n / self.suppress_s:,.0f} images/s), kept {self.kept_at_threshold:,}",
            ),
            (
                f"--keep-ratio {self.ratio}",
                f"{self.search_s:.2f} s, kept {self.kept_at_ratio:,} at threshold {self.ratio_threshold:.4f}",
            ),
        ]


def add_arguments(p) -> None:
    from pfc_jax import cli

    p.add_argument("--images", type=cli.positive_int, default=1_000_000)
    p.add_argument("--dim", type=cli.positive_int, default=128)
    p.add_argument("--max-images", type=cli.positive_int, default=300, help="largest identity")
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--ratio", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)


def synthetic_embeddings(images: int, dim: int, max_images: int, seed: int = 0):
    """(features [N, dim] unit rows, labels [N]): Pareto-sized identities around centers."""
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < images:
        sizes.append(int(min(max_images, np.floor(2 * (1 - rng.uniform()) ** (-1 / 1.1)))))
    sizes[-1] -= sum(sizes) - images
    sizes = [s for s in sizes if s > 0]
    labels = np.repeat(np.arange(len(sizes)), sizes)
    centers = rng.normal(size=(len(sizes), dim)).astype(np.float32)
    features = centers[labels] + rng.normal(scale=0.6, size=(images, dim)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features, labels


def run(args) -> PruneReport:
    from pfc_jax.data import prune

    features, labels = synthetic_embeddings(args.images, args.dim, args.max_images, args.seed)
    sizes = np.bincount(labels)
    start = time.perf_counter()
    suppressor = prune.Suppressor(features, labels)
    setup = time.perf_counter()
    kept = int(suppressor.keep(args.threshold).sum())
    suppressed = time.perf_counter()
    threshold, mask = suppressor.for_ratio(args.ratio)
    searched = time.perf_counter()
    return PruneReport(
        benchmark="prune",
        images=args.images,
        identities=len(sizes),
        dim=args.dim,
        max_images=args.max_images,
        pair_entries=int((sizes.astype(np.int64) ** 2).sum()),
        setup_s=setup - start,
        suppress_s=suppressed - setup,
        kept_at_threshold=kept,
        threshold=args.threshold,
        ratio=args.ratio,
        search_s=searched - suppressed,
        kept_at_ratio=int(mask.sum()),
        ratio_threshold=float(threshold),
    )
