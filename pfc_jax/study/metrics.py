"""The study's measurements, as plain numpy functions of embeddings and weights."""

from __future__ import annotations

import numpy as np

from pfc_jax.evaluation.ijb import tar_at_far

FARS = (1e-3, 1e-4)
# Buckets of images per class in the training set (the long tail): [low, high).
IMAGE_BUCKETS = ((1, 3), (3, 5), (5, 10), (10, 50), (50, 100), (100, None))


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def staleness(weights: np.ndarray, embeddings: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """f64[C]: for every class, the cosine between its stored weight ``weights[c]`` and
    the mean of the normalized embeddings of its images (``labels == c``); NaN for a
    class without images. 1 means the weight points where the encoder now puts the
    class; a stale weight (rarely updated while the encoder moved on) scores lower."""
    weights, embeddings = _normalize(weights), _normalize(embeddings)
    labels = np.asarray(labels)
    num_classes = len(weights)
    if labels.shape != (len(embeddings),):
        raise ValueError(f"labels {labels.shape} do not match embeddings {embeddings.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels outside [0, {num_classes})")
    sums = np.zeros_like(weights)
    np.add.at(sums, labels, embeddings)
    counts = np.bincount(labels, minlength=num_classes)
    cos = np.full(num_classes, np.nan)
    seen = counts > 0
    cos[seen] = np.sum(_normalize(sums[seen]) * weights[seen], axis=1)
    return cos


def _summary(values: np.ndarray) -> dict:
    values = values[np.isfinite(values)]
    if not values.size:
        return {"classes": 0, "mean": None, "p10": None}
    return {"classes": int(values.size), "mean": float(values.mean()), "p10": float(np.percentile(values, 10))}


def by_buckets(cos: np.ndarray, key: np.ndarray, buckets) -> list[dict]:
    """Staleness summaries (classes, mean, 10th percentile) of the classes whose ``key``
    (e.g. images per class) falls in each ``[low, high)`` bucket (``high`` None: no end)."""
    out = []
    for low, high in buckets:
        inside = (key >= low) & (key < high if high is not None else True)
        out.append({"low": int(low), "high": None if high is None else int(high), **_summary(cos[inside])})
    return out


def quantile_buckets(key: np.ndarray, count: int = 5) -> list[tuple[int, int | None]]:
    """Up to ``count`` buckets of ``key`` with about as many classes each (fewer when
    values repeat, e.g. one bucket when every class was sampled equally often)."""
    edges = np.unique(np.quantile(np.asarray(key), np.linspace(0, 1, count + 1)[:-1], method="lower").astype(int))
    return [(int(lo), int(hi)) for lo, hi in zip(edges[:-1], edges[1:])] + [(int(edges[-1]), None)]


def tar_all_pairs(embeddings: np.ndarray, labels: np.ndarray, fars=FARS) -> dict:
    """TAR at each FAR over every pair of images (cosine scores), with the pair counts."""
    x = _normalize(embeddings).astype(np.float32)
    labels = np.asarray(labels)
    upper = np.triu_indices(len(x), k=1)
    scores = (x @ x.T)[upper]
    same = labels[upper[0]] == labels[upper[1]]
    # Every ROC point (not IJB's corner readout): the study's operating points stay where
    # its recorded results read them.
    tar = tar_at_far(scores, same, fars, readout="full")
    return {
        **{f"tar_at_far_{far:g}": value for far, value in tar.items()},
        "genuine_pairs": int(same.sum()),
        "impostor_pairs": int((~same).sum()),
    }
