"""IJB-B / IJB-C 1:1 verification (template-to-template TAR at fixed FAR).

Reads the layout of the standard release as insightface distributes it::

    ROOT/loose_crop/<image>                     face crops, not aligned
    ROOT/meta/<t>_name_5pts_score.txt           "<image> x1 y1 ... x5 y5 <detection score>"
    ROOT/meta/<t>_face_tid_mid.txt              "<image> <template id> <media id>"
    ROOT/meta/<t>_template_pair_label.txt       "<template 1> <template 2> <0|1>"

with ``<t>`` = ``ijbb`` or ``ijbc``. The protocol follows the field's evaluation
(insightface's ``eval_ijbc``, test mode N1D1F1):

* each crop is aligned to the 112x112 ArcFace template by the least-squares similarity
  transform of its five landmarks, warped as OpenCV's ``warpAffine`` does (bilinear,
  rounded, constant zero border; see :mod:`pfc_jax.evaluation.warp`);
* image feature = f(image) + f(flipped image), kept un-normalized (its norm acts as a
  quality weight) and, with ``detector_score``, multiplied by the detection score;
* template feature = sum over the template's media of the mean feature of that media's
  images, then L2-normalized; pair score = cosine of the two templates;
* TAR at FAR in {1e-6, ..., 1e-1}: the ROC point whose FAR is nearest to the target, the
  highest TAR among equally near points. ``readout="corners"`` (the default, and what
  the published tables use: scikit-learn's ``roc_curve`` with its default
  ``drop_intermediate=True``) reads it among the ROC's corners only: a point collinear
  with its two neighbours at equal steps (inside a horizontal, vertical or diagonal run)
  is dropped, so a target FAR inside a run reads the run's nearer end.
  ``readout="full"`` reads it among every point (one per distinct score).

Feature extraction writes the features to ``cache_dir`` in chunks and resumes from what
is there, so an interrupted run of the ~470K IJB-C crops does not start again; the cache
records the set, the warp and the model, and refuses to mix features of another.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable

import numpy as np

from pfc_jax.errors import InputError
from pfc_jax.evaluation.warp import WARPS, warp_affine
from pfc_jax.progress import Progress

# Where the five landmarks (eyes, nose tip, mouth corners) of an aligned 112x112 face lie.
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
    np.float64,
)
FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
TARGETS = ("IJBB", "IJBC")
READOUTS = ("corners", "full")


class IJBError(InputError):
    """A missing or malformed IJB file."""


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The 2x3 matrix of the rotation+scale+translation that best maps ``src`` to ``dst``.

    Least squares over the point pairs (no reflection); points are (x, y) pixel
    coordinates with pixel centers at integers.
    """
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    denom = (s**2).sum()
    if denom == 0:
        raise IJBError("degenerate landmarks: all five points coincide")
    a = (s[:, 0] * d[:, 0] + s[:, 1] * d[:, 1]).sum() / denom
    b = (s[:, 0] * d[:, 1] - s[:, 1] * d[:, 0]).sum() / denom
    rot = np.array([[a, -b], [b, a]])
    return np.concatenate([rot, (mu_d - rot @ mu_s)[:, None]], axis=1)


def align(image, landmarks: np.ndarray, size: int = 112, warp: str = "opencv") -> np.ndarray:
    """uint8 [size, size, 3]: ``image`` (uint8 [H, W, 3] or a PIL image) warped so ``landmarks``
    land on the template; ``warp`` picks the interpolation (:data:`pfc_jax.evaluation.warp.WARPS`)."""
    m = similarity_transform(landmarks, ARCFACE_TEMPLATE * (size / 112.0))
    return warp_affine(np.asarray(image, np.uint8), m, size, warp)


@dataclasses.dataclass
class IJBProtocol:
    """The metadata of one IJB release: per image, per template, per pair."""

    root: pathlib.Path
    images: list[str]
    landmarks: np.ndarray  # float [N, 5, 2]
    scores: np.ndarray  # detection scores [N]
    templates: np.ndarray  # template id per image [N]
    medias: np.ndarray  # media id per image [N]
    pairs: np.ndarray  # [M, 2] template ids
    labels: np.ndarray  # bool [M]

    @classmethod
    def load(cls, root: str | pathlib.Path, target: str) -> IJBProtocol:
        if target.upper() not in TARGETS:
            raise IJBError(f"IJB target must be one of {TARGETS}, got {target!r}")
        root = pathlib.Path(root)
        t = target.lower()
        meta = root / "meta"
        files = {k: meta / f"{t}_{k}.txt" for k in ("name_5pts_score", "face_tid_mid", "template_pair_label")}
        for f in [root / "loose_crop", *files.values()]:
            if not f.exists():
                raise IJBError(
                    f"{f} is missing: expected the IJB release layout ROOT/loose_crop/ and "
                    f"ROOT/meta/{t}_{{name_5pts_score,face_tid_mid,template_pair_label}}.txt"
                )
        names, points = _read_table(files["name_5pts_score"], 12)
        landmarks = points[:, :10].astype(np.float64).reshape(-1, 5, 2)
        scores = points[:, 10].astype(np.float64)
        names2, ids = _read_table(files["face_tid_mid"], 3)
        if names2 != names:
            raise IJBError(
                f"{files['face_tid_mid']} and {files['name_5pts_score']} list different images "
                "(or in a different order)"
            )
        _, pair_rows = _read_table(files["template_pair_label"], 3, first_is_name=False)
        pair_rows = pair_rows.astype(np.int64)
        templates, medias = ids[:, 0].astype(np.int64), ids[:, 1].astype(np.int64)
        unknown = np.setdiff1d(pair_rows[:, :2], templates)
        if unknown.size:
            raise IJBError(f"{files['template_pair_label']} names templates with no image, e.g. {unknown[:5]}")
        return cls(root, names, landmarks, scores, templates, medias, pair_rows[:, :2], pair_rows[:, 2] == 1)


def _read_table(path: pathlib.Path, columns: int, first_is_name: bool = True):
    names, rows = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != columns:
                raise IJBError(f"{path}:{n}: expected {columns} fields, got {len(parts)}: {line.strip()!r}")
            try:
                values = [float(v) for v in (parts[1:] if first_is_name else parts)]
            except ValueError:
                raise IJBError(f"{path}:{n}: non-numeric field in {line.strip()!r}") from None
            if first_is_name:
                names.append(parts[0])
            rows.append(values)
    if not rows:
        raise IJBError(f"{path} is empty")
    return names, np.asarray(rows)


def extract_features(
    protocol: IJBProtocol,
    embed_batches: Callable,
    *,
    batch_size: int,
    image_size: int = 112,
    warp: str = "opencv",
    model: dict | None = None,
    cache_dir: str | pathlib.Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Flip-summed features [N, D] of every crop, aligned; resumable through ``cache_dir``.

    ``embed_batches(iterable of uint8 [n, S, S, 3], flip=True)`` yields [n, D] (an
    :meth:`~pfc_jax.inference.Embedder.embed_batches`). ``model`` (JSON-able: which
    checkpoint embeds) is recorded in the cache with the set, the warp and the image size,
    so a cache is never resumed with features of another model or alignment.
    """
    from PIL import Image

    if warp not in WARPS:
        raise IJBError(f"warp must be one of {WARPS}, got {warp!r}")
    n = len(protocol.images)
    done, chunks = 0, []
    cache = pathlib.Path(cache_dir) if cache_dir else None
    fingerprint = _fingerprint(protocol, warp=warp, image_size=image_size, model=model)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        done, chunks = _load_cache(cache, fingerprint)
    bar = Progress(n, "IJB features", enabled=progress)
    bar.update(done)

    def batches():
        for start in range(done, n, batch_size):
            out = []
            for i in range(start, min(start + batch_size, n)):
                path = protocol.root / "loose_crop" / protocol.images[i]
                try:
                    with Image.open(path) as im:
                        rgb = np.asarray(im.convert("RGB"))
                except OSError as e:
                    raise IJBError(f"cannot read {path}: {e}") from None
                out.append(align(rgb, protocol.landmarks[i], image_size, warp))
            yield np.stack(out)

    for feats in embed_batches(batches(), flip=True):
        chunks.append(np.asarray(feats, np.float32))
        bar.update(len(feats))
        if cache is not None:
            _save_chunk(cache, len(chunks) - 1, chunks[-1], fingerprint)
    bar.close()
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def _fingerprint(protocol: IJBProtocol, **extraction) -> dict:
    return {
        "root": str(protocol.root.absolute()),
        "images": len(protocol.images),
        "first": protocol.images[0],
        "last": protocol.images[-1],
        **json.loads(json.dumps(extraction)),  # as it reads back from info.json
    }


def _load_cache(cache: pathlib.Path, fingerprint: dict):
    info_path = cache / "info.json"
    if not info_path.exists():
        return 0, []
    info = json.loads(info_path.read_text())
    cached = info.get("protocol", {})
    if cached != fingerprint:
        differ = ", ".join(
            f"{k}: {cached.get(k, '(not recorded)')!r} there, {fingerprint.get(k)!r} now"
            for k in sorted(set(cached) | set(fingerprint))
            if cached.get(k) != fingerprint.get(k)
        )
        raise IJBError(
            f"{cache} holds IJB features extracted differently ({differ}); use another --cache-dir or delete it"
        )
    chunks = [np.load(cache / f"chunk_{i:06d}.npy") for i in range(info["chunks"])]
    return sum(len(c) for c in chunks), chunks


def _save_chunk(cache: pathlib.Path, index: int, feats: np.ndarray, fingerprint: dict) -> None:
    # The chunk first, then the index that counts it: a crash between the two loses one chunk only.
    tmp = cache / f"chunk_{index:06d}.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, feats)
    os.replace(tmp, cache / f"chunk_{index:06d}.npy")
    info_tmp = cache / "info.json.tmp"
    info_tmp.write_text(json.dumps({"protocol": fingerprint, "chunks": index + 1}))
    os.replace(info_tmp, cache / "info.json")


def template_features(
    features: np.ndarray, protocol: IJBProtocol, *, detector_score: bool = True, norm_score: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """``(template ids, normalized template features)`` by media-then-template pooling."""
    f = np.asarray(features, np.float64)
    if not norm_score:
        f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    if detector_score:
        f = f * protocol.scores[:, None]
    ids = np.unique(protocol.templates)
    # Mean within each (template, media), then sum over a template's media.
    keys = np.stack([protocol.templates, protocol.medias], axis=1)
    groups, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    media_sum = np.zeros((len(groups), f.shape[1]))
    np.add.at(media_sum, inverse, f)
    media_mean = media_sum / np.bincount(inverse, minlength=len(groups))[:, None]
    template_index = np.searchsorted(ids, groups[:, 0])
    pooled = np.zeros((len(ids), f.shape[1]))
    np.add.at(pooled, template_index, media_mean)
    pooled /= np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
    return ids, pooled


def pair_scores(ids: np.ndarray, feats: np.ndarray, pairs: np.ndarray, chunk: int = 1 << 20) -> np.ndarray:
    """Cosine score of each template pair [M]."""
    a, b = np.searchsorted(ids, pairs[:, 0]), np.searchsorted(ids, pairs[:, 1])
    out = np.empty(len(pairs))
    for s in range(0, len(pairs), chunk):
        out[s : s + chunk] = (feats[a[s : s + chunk]] * feats[b[s : s + chunk]]).sum(axis=1)
    return out


def roc(scores: np.ndarray, labels: np.ndarray, readout: str = "corners") -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` from (0, 0) up, one point per distinct score (``"full"``) or only the
    corners (``"corners"``: scikit-learn's ``roc_curve(drop_intermediate=True)``)."""
    if readout not in READOUTS:
        raise IJBError(f"readout must be one of {READOUTS}, got {readout!r}")
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    if labels.all() or not labels.any():
        raise IJBError("TAR@FAR needs both genuine and impostor pairs (check the template pair file)")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    # Accepting every pair scoring >= each distinct score: counts of genuine / impostor pairs.
    last = np.r_[s[1:] != s[:-1], True]
    tps, fps = np.cumsum(y)[last], np.cumsum(~y)[last]
    if readout == "corners" and len(tps) > 2:
        # A point is dropped when both counts change by the same step before and after it.
        keep = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        tps, fps = tps[keep], fps[keep]
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]]


def tar_at_far(scores: np.ndarray, labels: np.ndarray, fars=FARS, readout: str = "corners") -> dict[float, float]:
    """TAR at each target FAR (see the module docstring for the operating point chosen)."""
    fpr, tpr = roc(scores, labels, readout)
    out = {}
    for far in fars:
        gap = np.abs(fpr - far)
        out[far] = float(tpr[gap == gap.min()].max())
    return out


def protocol_scores(
    protocol: IJBProtocol, features: np.ndarray, *, detector_score: bool = True, norm_score: bool = True
) -> np.ndarray:
    """The cosine score of each template pair of ``protocol`` [M], from per-image features."""
    ids, feats = template_features(features, protocol, detector_score=detector_score, norm_score=norm_score)
    return pair_scores(ids, feats, protocol.pairs)


def evaluate(
    protocol: IJBProtocol,
    features: np.ndarray,
    *,
    detector_score: bool = True,
    norm_score: bool = True,
    fars=FARS,
    readout: str = "corners",
) -> dict[float, float]:
    """TAR at each FAR from per-image features."""
    pair = protocol_scores(protocol, features, detector_score=detector_score, norm_score=norm_score)
    return tar_at_far(pair, protocol.labels, fars, readout)


def save_scores(path: str | pathlib.Path, protocol: IJBProtocol, values: np.ndarray) -> None:
    """Per-pair ``template_1, template_2, label, score`` to ``.npy`` (a structured array) or
    ``.csv`` (with a header; scores with 17 significant digits, so they read back exactly)."""
    path = pathlib.Path(path)
    check_scores_path(path)
    if len(values) != len(protocol.pairs):
        raise ValueError(f"{len(values)} scores for {len(protocol.pairs)} pairs")
    tmp = path.with_name(path.name + ".tmp")
    try:
        if path.suffix == ".npy":
            fields = [("template_1", "<i8"), ("template_2", "<i8"), ("label", "u1"), ("score", "<f8")]
            table = np.zeros(len(values), fields)
            table["template_1"], table["template_2"] = protocol.pairs[:, 0], protocol.pairs[:, 1]
            table["label"], table["score"] = protocol.labels, values
            with open(tmp, "wb") as f:
                np.save(f, table)
        else:
            rows = zip(protocol.pairs.tolist(), protocol.labels.tolist(), np.asarray(values, np.float64).tolist())
            with open(tmp, "w") as f:
                f.write("template_1,template_2,label,score\n")
                f.writelines(f"{a},{b},{int(label)},{score:.17g}\n" for (a, b), label, score in rows)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only there when writing failed


def check_scores_path(path: str | pathlib.Path) -> None:
    """Fail before any work when ``save_scores`` could not write ``path``."""
    path = pathlib.Path(path)
    if path.suffix not in (".npy", ".csv"):
        raise IJBError(f"--save-scores {path}: the file must end in .npy or .csv")
    if not path.parent.is_dir():
        raise IJBError(f"--save-scores {path}: the folder {path.parent} does not exist")
