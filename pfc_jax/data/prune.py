"""Face-NMS: prune a face dataset to a core set before training.

    python -m pfc_jax.data.prune --source rec:/data/webface42m --workdir /runs/proxy \\
        --keep-ratio 0.6 --out /data/webface42m_core
    python -m pfc_jax.data.prune --source folder:/data/faces --onnx proxy.onnx --threshold 0.9 \\
        --out /data/faces_core --write rec

After Chen, Huang et al., "Face-NMS: A Core-set Selection Approach for Efficient Face
Recognition" (arXiv 2109.04698), from the paper's description:

1. A proxy model (any pfc_jax workdir, or an ONNX file) embeds every image; the features
   are L2-normalized. Each process embeds its own contiguous slice of the dataset on its
   own devices (data-parallel over the local mesh), in chunks cached under
   ``--cache`` (default ``OUT/cache``): an interrupted run resumes from the chunks there.
2. Ranking (the global view): within each identity, faces are ordered by their cosine to
   the identity's mean feature, highest first (ties: lower index first): the typical
   faces of an identity come first, so that of two near-duplicates the more typical one
   survives. *The paper ranks by a face's potential contribution to the overall sparsity
   without a formula that could be followed here; this score is pfc_jax's choice.*
3. Suppression (local sparsity), per identity, greedy as non-maximum suppression: walk
   the ranked faces; a face is kept unless its cosine to an already *kept* face of its
   identity is greater than the threshold (equal is kept). An identity's first face is
   always kept, so no identity loses its last image. Only faces of one identity are
   compared: the cost is ``sum over identities of n_c^2 * D``, linear in the dataset for
   bounded identity sizes, never quadratic in the whole dataset.
4. ``--keep-ratio R`` bisects the threshold until the images kept overall are as close to
   ``R`` x N as the similarities allow (the count moves in jumps where many pairs share one
   similarity, e.g. exact copies); ``--threshold T`` uses T.

Written to ``--out``: ``keep.npy`` (int64 indices of the kept images in the source: set
``config.data.keep_list`` to it and train on the original dataset without copying it),
with ``--write rec`` or ``both`` a new insightface RecordIO (``train.rec``, ``train.idx``,
``property``; labels unchanged, images in the source's order), and ``report.json`` with
the counts, threshold, per-identity histogram and times (also printed).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np

from pfc_jax import cli
from pfc_jax.errors import InputError
from pfc_jax.progress import Progress

WRITES = ("keep-list", "rec", "both")
CHUNK = 8192  # images per cached feature chunk
SIMILARITY_BUDGET = 2 << 30  # bytes of per-identity similarity matrices kept across --keep-ratio passes


class PruneError(InputError):
    """Bad input to the pruning; the message names it and the fix."""


# ---- step 1: features -------------------------------------------------------------------


def open_source(spec: str):
    """``rec:DIR``, ``folder:DIR``, ``tfds:NAME@DATA_DIR``, or ``config:FILE``: the training
    set of a pfc_jax config file (e.g. a synthetic world; its keep-list not applied)."""
    from pfc_jax.data import prepare
    from pfc_jax.data.sources import TFDSDataset, make_source

    kind, _, rest = spec.partition(":")
    if kind == "config":
        if not pathlib.Path(rest).is_file():
            raise PruneError(f"--source {spec!r}: no config file {rest}")
        import runpy

        config = runpy.run_path(rest)["get_config"]()
        config.data.keep_list = ""
        return make_source(config.data)
    if kind == "tfds":
        name, _, data_dir = rest.partition("@")
        if not name or not data_dir:
            raise PruneError(f"--source {spec!r}: give tfds:NAME@DATA_DIR")
        return TFDSDataset(data_dir, name)
    try:
        return prepare.open_source(spec)
    except InputError as e:
        raise PruneError(f"{e} (or tfds:NAME@DATA_DIR, config:FILE)") from None


def _decode_batch(source, indices, image_size, pool):
    from pfc_jax.data.augment import decode

    return np.stack(list(pool.map(lambda i: decode(source[int(i)], image_size), indices)))


def embed_source(
    source,
    embed_batches,
    *,
    image_size: int,
    batch_size: int,
    cache_dir: str | pathlib.Path,
    fingerprint: dict,
    start: int = 0,
    stop: int | None = None,
    threads: int = 8,
    progress: bool = True,
    chunk: int = CHUNK,
) -> np.ndarray:
    """L2-normalized features of ``source[start:stop]`` (float32 [n, D]), resumable:
    chunks of ``chunk`` images are saved in ``cache_dir`` as they complete, with
    ``fingerprint`` (which dataset, which model), and a later call reads them back instead
    of embedding again. A cache written for another fingerprint is refused."""
    stop = len(source) if stop is None else stop
    cache = pathlib.Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    fingerprint = {**json.loads(json.dumps(fingerprint)), "start": start, "stop": stop, "chunk": chunk}
    info = cache / "info.json"
    if info.exists():
        there = json.loads(info.read_text())
        if there != fingerprint:
            differ = ", ".join(
                f"{k}: {there.get(k)!r} there, {fingerprint.get(k)!r} now"
                for k in sorted(set(there) | set(fingerprint))
                if there.get(k) != fingerprint.get(k)
            )
            raise PruneError(f"{cache} holds features of another run ({differ}); give another --cache or delete it")
    else:
        tmp = cache / "info.json.tmp"
        tmp.write_text(json.dumps(fingerprint))
        os.replace(tmp, info)
    bounds = list(range(start, stop, chunk))
    bar = Progress(stop - start, "embedding", unit="images", enabled=progress)
    chunks = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for a in bounds:
            b = min(a + chunk, stop)
            path = cache / f"chunk_{a:012d}.npy"
            if path.exists():
                feats = np.load(path)
                if len(feats) != b - a:
                    raise PruneError(f"{path} holds {len(feats)} features, not {b - a}: delete it to redo it")
            else:
                batches = (
                    _decode_batch(source, range(i, min(i + batch_size, b)), image_size, pool)
                    for i in range(a, b, batch_size)
                )
                feats = np.concatenate([np.asarray(f, np.float32) for f in embed_batches(batches)])
                feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
                tmp = path.with_suffix(".npy.tmp")
                with open(tmp, "wb") as f:
                    np.save(f, feats)
                os.replace(tmp, path)  # a chunk is there whole or not at all
            chunks.append(feats)
            bar.update(b - a)
    bar.close()
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


# ---- steps 2-4: ranking and suppression ------------------------------------------------


def rank_order(features: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Image indices grouped by label (ascending); within a label by cosine to the
    label's mean feature, highest first; ties by index."""
    labels = np.asarray(labels)
    n = len(labels)
    classes, inverse = np.unique(labels, return_inverse=True)
    means = np.zeros((len(classes), features.shape[1]), np.float64)
    np.add.at(means, inverse, features)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    score = np.einsum("nd,nd->n", features, means[inverse].astype(np.float32))
    return np.lexsort((np.arange(n), -score, labels))


@dataclasses.dataclass
class _Groups:
    """Identities bucketed by size (powers of two), each as a padded index matrix."""

    buckets: list  # (index [G, m] int64 with -1 padding)

    @classmethod
    def of(cls, order: np.ndarray, labels: np.ndarray, max_rows: int = 1 << 22) -> _Groups:
        sorted_labels = np.asarray(labels)[order]
        n = len(order)
        starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]) if n else np.zeros(0, int)
        sizes = np.diff(np.r_[starts, n])
        buckets = []
        width = 1
        while len(sizes) and width < 2 * sizes.max():
            chosen = (
                np.flatnonzero((sizes <= width) & (sizes > width // 2)) if width > 1 else np.flatnonzero(sizes == 1)
            )
            if len(chosen):
                cols = np.arange(width)
                index = starts[chosen, None] + cols[None, :]
                index = np.where(cols[None, :] < sizes[chosen, None], order[np.minimum(index, n - 1)], -1)
                per = max(1, max_rows // (width * width))  # identities per piece: bounded similarity memory
                buckets += [index[i : i + per] for i in range(0, len(index), per)]
            width *= 2
        return cls(buckets)


def _similarities(features: np.ndarray, index: np.ndarray) -> np.ndarray:
    f = np.where(index[..., None] >= 0, features[np.maximum(index, 0)], 0.0).astype(np.float32)
    return f @ f.transpose(0, 2, 1)  # batched BLAS


def _greedy(sim: np.ndarray, valid: np.ndarray, threshold: float) -> np.ndarray:
    """Greedy NMS of [G, m, m] similarities (rows in rank order): kept [G, m]."""
    g, m = valid.shape
    suppressed = ~valid
    kept = np.zeros((g, m), bool)
    later = np.arange(m)
    for i in range(m):
        k = ~suppressed[:, i]
        kept[:, i] = k
        if i + 1 < m and k.any():
            suppressed |= k[:, None] & (sim[:, i, :] > threshold) & (later > i)[None, :]
    return kept


class Suppressor:
    """Greedy per-identity suppression of ``features`` (L2-normalized) at any threshold;
    the similarity matrices are computed once and kept while they fit
    :data:`SIMILARITY_BUDGET` (else recomputed per threshold)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.features, self.labels = np.asarray(features, np.float32), np.asarray(labels)
        self.order = rank_order(self.features, self.labels)
        self.groups = _Groups.of(self.order, self.labels)
        self._sims = None
        total = sum(b.shape[0] * b.shape[1] ** 2 * 4 for b in self.groups.buckets)
        if total <= SIMILARITY_BUDGET:
            self._sims = [_similarities(self.features, b) for b in self.groups.buckets]
        self.num_identities = len(np.unique(self.labels))

    def keep(self, threshold: float) -> np.ndarray:
        """Boolean mask over the images: kept at ``threshold``."""
        mask = np.zeros(len(self.labels), bool)
        for k, index in enumerate(self.groups.buckets):
            sim = self._sims[k] if self._sims is not None else _similarities(self.features, index)
            kept = _greedy(sim, index >= 0, threshold)
            mask[index[kept]] = True
        return mask

    def for_ratio(self, ratio: float, iterations: int = 40) -> tuple[float, np.ndarray]:
        """(threshold, mask) whose count is closest to ``ratio`` x N (bisection)."""
        n = len(self.labels)
        target = ratio * n
        if target < self.num_identities:
            raise PruneError(
                f"--keep-ratio {ratio:g} keeps {target:,.0f} of {n:,} images, fewer than the {self.num_identities:,} "
                f"identities, each of which keeps at least one image: use --keep-ratio >= {self.num_identities / n:.4f}"
            )
        lo, hi = -1.0, 1.0 + 1e-6  # above 1 nothing is suppressed
        best = (hi, self.keep(hi))
        for _ in range(iterations):
            mid = (lo + hi) / 2
            mask = self.keep(mid)
            count = int(mask.sum())
            if abs(count - target) < abs(int(best[1].sum()) - target):
                best = (mid, mask)
            if count == round(target):
                break
            lo, hi = (mid, hi) if count < target else (lo, mid)
        return best


# ---- outputs ----------------------------------------------------------------------------


def write_recordio(source, keep: np.ndarray, labels: np.ndarray, directory: pathlib.Path, image_size: int) -> None:
    """The kept images of ``source`` as an insightface RecordIO folder (their order and
    labels; identity records when the kept labels are grouped)."""
    from pfc_jax.data import recordio

    kept_labels = labels[keep]
    grouped = bool(np.all(np.diff(kept_labels) >= 0))
    n, num_classes = len(keep), int(source.num_classes)
    with recordio.Writer(str(directory / "train.rec"), str(directory / "train.idx")) as w:
        if grouped:
            w.write(0, recordio.pack(recordio.IRHeader(2, np.array([n + 1, n + 1 + num_classes], np.float32), 0, 0)))
        for key, i in enumerate(keep, 1):
            example = source[int(i)]
            w.write(key, recordio.pack(recordio.IRHeader(0, float(labels[i]), key, 0), _encoded(example)))
        if grouped:
            first = np.searchsorted(kept_labels, np.arange(num_classes), "left") + 1
            last = np.searchsorted(kept_labels, np.arange(num_classes), "right") + 1
            for c in range(num_classes):
                w.write(n + 1 + c, recordio.pack(recordio.IRHeader(2, np.array([first[c], last[c]], np.float32), 0, 0)))
    (directory / "property").write_text(f"{num_classes},{image_size},{image_size}\n")


def _encoded(example: dict) -> bytes:
    if "encoded" in example:
        return bytes(example["encoded"])
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.asarray(example["image"], np.uint8)).save(out, format="PNG")  # lossless
    return out.getvalue()


def histogram(labels: np.ndarray, keep_mask: np.ndarray) -> dict:
    """Identities per bucket of images before, with the mean fraction each keeps."""
    classes, before = np.unique(labels, return_counts=True)
    after = np.bincount(np.searchsorted(classes, labels[keep_mask]), minlength=len(classes))
    edges = [1, 2, 6, 11, 21, 51, 101, 10**12]
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (before >= lo) & (before < hi)
        if sel.any():
            name = f"{lo}-{hi - 1}" if hi < 10**12 else f"{lo}+"
            out.append(
                {
                    "images": name,
                    "identities": int(sel.sum()),
                    "images_before": int(before[sel].sum()),
                    "images_after": int(after[sel].sum()),
                }
            )
    return {"buckets": out, "min_kept_per_identity": int(after.min()) if len(after) else 0}


def prune(
    source_spec: str,
    out: str | pathlib.Path,
    *,
    workdir: str | None = None,
    onnx: str | None = None,
    keep_ratio: float | None = None,
    threshold: float | None = None,
    write: str = "keep-list",
    cache: str | pathlib.Path | None = None,
    batch_size: int = 256,
    threads: int = 8,
    progress: bool = True,
    say=print,
) -> dict:
    """Steps 1-4 and the outputs (see the module docstring); returns the report."""
    import jax

    if (workdir is None) == (onnx is None):
        raise PruneError("give the proxy model: --workdir PROXY_RUN or --onnx MODEL (one of them)")
    if (keep_ratio is None) == (threshold is None):
        raise PruneError("give --keep-ratio R or --threshold T (one of them)")
    if keep_ratio is not None and not 0 < keep_ratio <= 1:
        raise PruneError(f"--keep-ratio {keep_ratio}: must be in (0, 1] (the fraction of images kept)")
    if threshold is not None and not -1 <= threshold <= 1:
        raise PruneError(f"--threshold {threshold}: a cosine similarity, in [-1, 1]")
    if write not in WRITES:
        raise PruneError(f"--write {write!r}: one of {', '.join(WRITES)}")
    out = pathlib.Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise PruneError(f"--out {out} is a file (give a folder)")
    for name in ("keep.npy", "train.rec", "report.json"):
        if (out / name).exists():
            raise PruneError(f"--out {out} already holds {name} (give a new folder, or delete the old result)")
    timer = {"start": time.perf_counter()}
    source = open_source(source_spec)
    labels = np.asarray(source.labels())
    # the proxy model
    if workdir is not None:
        from pfc_jax import sharding
        from pfc_jax.inference import Embedder

        embedder = Embedder.from_workdir(
            workdir, batch_size=batch_size, mesh=sharding.make_mesh(jax.local_devices()), log=say
        )
        image_size, model = (
            embedder.image_size,
            {"workdir": str(pathlib.Path(workdir).absolute()), "step": embedder.step},
        )
    else:
        from pfc_jax.inference.onnx import OnnxEmbedder

        if not pathlib.Path(onnx).is_file():
            raise PruneError(f"--onnx {onnx}: no such file")
        embedder = OnnxEmbedder(onnx, batch_size=batch_size)
        image_size, model = embedder.image_size, {"onnx": str(pathlib.Path(onnx).absolute())}
        if image_size is None:
            raise PruneError(f"--onnx {onnx}: its input has no fixed image size (export it with pfc_jax.export)")
    # step 1, each process its slice
    p, count = jax.process_index(), jax.process_count()
    n = len(source)
    bounds = [n * k // count for k in range(count + 1)]
    cache = pathlib.Path(cache) if cache else out / "cache"
    fingerprint = {"source": source_spec, "images": n, "model": model, "image_size": image_size}
    mine = embed_source(
        source,
        embedder.embed_batches,
        image_size=image_size,
        batch_size=embedder.batch_size,
        cache_dir=cache / f"process_{p}",
        fingerprint=fingerprint,
        start=bounds[p],
        stop=bounds[p + 1],
        threads=threads,
        progress=progress and p == 0,
    )
    timer["embedded"] = time.perf_counter()
    if count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("pfc_jax.data.prune: features embedded")
        if p != 0:
            return {}
        parts = [mine] + [
            np.concatenate([np.load(f) for f in sorted((cache / f"process_{k}").glob("chunk_*.npy"))])
            for k in range(1, count)
        ]
        features = np.concatenate(parts)
    else:
        features = mine
    # steps 2-4
    suppressor = Suppressor(features, labels)
    if keep_ratio is not None:
        threshold, mask = suppressor.for_ratio(keep_ratio)
    else:
        mask = suppressor.keep(threshold)
    keep = np.flatnonzero(mask).astype(np.int64)
    timer["suppressed"] = time.perf_counter()
    # outputs, staged and renamed into place
    out.mkdir(parents=True, exist_ok=True)
    staged = pathlib.Path(tempfile.mkdtemp(prefix=".prune.", dir=out))
    try:
        np.save(staged / "keep.npy", keep)
        if write in ("rec", "both"):
            write_recordio(source, keep, labels, staged, image_size)
        timer["written"] = time.perf_counter()
        report = {
            "source": source_spec,
            "model": model,
            "images_before": int(n),
            "images_after": int(len(keep)),
            "kept": len(keep) / n,
            "identities": int(suppressor.num_identities),
            "keep_ratio": keep_ratio,
            "threshold": float(threshold),
            "ranking": "cosine to the identity's mean feature, highest first",
            "histogram": histogram(labels, mask),
            "seconds": {
                "embedding": timer["embedded"] - timer["start"],
                "suppression": timer["suppressed"] - timer["embedded"],
                "writing": timer["written"] - timer["suppressed"],
            },
            "outputs": ["keep.npy"] + (["train.rec", "train.idx", "property"] if write in ("rec", "both") else []),
        }
        (staged / "report.json").write_text(json.dumps(report, indent=1))
        for name in ("train.rec", "train.idx", "property", "keep.npy", "report.json"):  # report last
            if (staged / name).exists():
                os.replace(staged / name, out / name)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    say(summary(report, out))
    return report


def summary(report: dict, out: pathlib.Path) -> str:
    lines = [
        f"kept {report['images_after']:,} of {report['images_before']:,} images ({report['kept']:.1%}), "
        f"{report['identities']:,} identities, threshold {report['threshold']:.4f}",
        f"{'images per identity':>20} {'identities':>11} {'images before':>14} {'after':>10}",
    ]
    for b in report["histogram"]["buckets"]:
        lines.append(f"{b['images']:>20} {b['identities']:>11,} {b['images_before']:>14,} {b['images_after']:>10,}")
    s = report["seconds"]
    lines.append(
        f"time: embedding {s['embedding']:.1f} s, suppression {s['suppression']:.1f} s, writing {s['writing']:.1f} s"
    )
    lines.append(f"written to {out}: {', '.join(report['outputs'])}, report.json")
    if "keep.npy" in report["outputs"]:
        lines.append(f"train on the core set: --config.data.keep_list={out / 'keep.npy'} (with the original dataset)")
    return "\n".join(lines)


def _parser():
    p = cli.parser("pfc_jax.data.prune", __doc__)
    p.add_argument("--source", required=True, help="rec:DIR | folder:DIR | tfds:NAME@DATA_DIR | config:FILE")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--workdir", help="the proxy model: a pfc_jax workdir (its latest checkpoint)")
    model.add_argument("--onnx", help="the proxy model: an ONNX file (pfc_jax.export's layout)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--keep-ratio", type=float, help="fraction of images to keep, in (0, 1]")
    how.add_argument("--threshold", type=float, help="cosine above which the lesser of two faces goes")
    p.add_argument("--out", required=True, help="folder for keep.npy, report.json (and the RecordIO)")
    p.add_argument("--write", choices=WRITES, default="keep-list", help="keep-list only, a new RecordIO, or both")
    p.add_argument("--cache", default=None, help="feature cache folder (default: OUT/cache)")
    p.add_argument("--batch-size", type=cli.positive_int, default=256)
    p.add_argument("--threads", type=cli.positive_int, default=8, help="image decoding threads")
    return p


def _run(args) -> None:
    from pfc_jax import distributed

    distributed.initialize()  # a multi-process job (SLURM, TPU pod, or JAX's variables): each process its slice
    prune(
        args.source,
        args.out,
        workdir=args.workdir,
        onnx=args.onnx,
        keep_ratio=args.keep_ratio,
        threshold=args.threshold,
        write=args.write,
        cache=args.cache,
        batch_size=args.batch_size,
        threads=args.threads,
    )


def main(argv=None) -> None:
    cli.run(_run, _parser(), argv)


if __name__ == "__main__":
    main()
