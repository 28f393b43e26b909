"""Face verification on insightface ``.bin`` pair files (LFW, CFP-FP, AgeDB-30, ...).

A ``.bin`` file is a pickle of ``(images, issame)``: ``2 * P`` encoded images (JPEG/PNG
bytes, pair ``i`` is images ``2i`` and ``2i + 1``) and ``P`` same/different booleans.
:func:`load_bin` reads it with an unpickler that builds nothing but lists, tuples,
bytes, strings, numbers and booleans: a crafted file is refused, never executed.

The protocol is the one the field's figures come from (insightface's verification):

* embedding = f(image) + f(flipped image), then L2-normalized;
* distance = squared Euclidean distance of the two normalized embeddings, "same" when
  ``distance < threshold``;
* 10 folds in file order (not shuffled; the first ``P % 10`` folds get one extra pair);
  for each fold the threshold in ``arange(0, 4, 0.01)`` with the best accuracy on the
  other nine folds (the first on ties) is applied to the held-out fold;
* reported: mean and std of the 10 held-out accuracies, the mean chosen threshold, and
  VAL@FAR=1e-3 (per fold, the threshold in ``arange(0, 4, 0.001)`` at which the
  nine-fold FAR reaches 1e-3; its VAL and FAR on the held-out fold, averaged).

The VAL threshold follows insightface's ``interp1d(far, thresholds, kind="slinear")``
exactly, ties included. The nine-fold FAR is a step function of the threshold, so it
often equals the target over a stretch of consecutive grid thresholds; then the *last*
of them is taken (a linear spline through repeated abscissae evaluates at the rightmost
one). Otherwise the threshold is interpolated linearly between the last grid point below
the target and the first above it; a FAR that never reaches the target gives 0.
"""

from __future__ import annotations

import dataclasses
import io
import pathlib
import pickle
from collections.abc import Callable

import numpy as np

from pfc_jax.errors import InputError

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
VAL_THRESHOLDS = np.arange(0, 4, 0.001)
NUM_FOLDS = 10


class PairFileError(InputError):
    """A ``.bin`` pair file that is missing, malformed, or not plain data."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Builds containers and scalars only; any class or function reference is refused.

    The one exception is ``_codecs.encode``, which Python 3 emits for ``bytes`` pickled
    with protocol < 3; it is replaced by a function that only turns a latin-1 string
    back into bytes.
    """

    def find_class(self, module, name):
        if (module, name) in {("_codecs", "encode"), ("codecs", "encode")}:
            return _latin1_bytes
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: a verification pair file holds only image bytes "
            "and booleans, so this file was not written by insightface or pfc_jax"
        )


def _latin1_bytes(text, encoding="latin1"):
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing a codecs.encode call other than latin-1 bytes")
    return text.encode("latin1")


def load_bin(path: str | pathlib.Path) -> tuple[list[bytes], np.ndarray]:
    """``(encoded images, issame bool[P])`` from an insightface ``.bin`` pair file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise PairFileError(
            f"pair file {path} does not exist (insightface's datasets ship lfw.bin, "
            "cfp_fp.bin, agedb_30.bin next to train.rec)"
        )
    try:
        with open(path, "rb") as f:
            # encoding="bytes": files pickled by Python 2 store the images as str.
            data = _PlainDataUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError) as e:
        raise PairFileError(f"{path}: not a verification pair file: {e}") from None
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise PairFileError(f"{path}: expected a pickle of (images, issame), got {type(data).__name__}")
    images, issame = data
    if not isinstance(images, (list, tuple)) or not all(isinstance(b, (bytes, bytearray)) for b in images):
        raise PairFileError(f"{path}: the first item must be a list of encoded images (bytes)")
    if not isinstance(issame, (list, tuple)) or not all(isinstance(s, (bool, int)) for s in issame):
        raise PairFileError(f"{path}: the second item must be a list of same/different booleans")
    if len(images) != 2 * len(issame) or not issame:
        raise PairFileError(f"{path}: {len(images)} images for {len(issame)} pairs (expected 2 per pair)")
    return [bytes(b) for b in images], np.asarray(issame, bool)


def decode_images(encoded: list[bytes], image_size: int, name: str = "") -> np.ndarray:
    """uint8 [N, S, S, 3] RGB; images of another size are resized (bilinear)."""
    from PIL import Image

    out = np.empty((len(encoded), image_size, image_size, 3), np.uint8)
    for i, b in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(b)) as im:
                im = im.convert("RGB")
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                out[i] = np.asarray(im)
        except OSError as e:
            raise PairFileError(f"{name}: image {i} cannot be decoded: {e}") from None
    return out


def _folds(n: int, k: int = NUM_FOLDS) -> list[np.ndarray]:
    return np.array_split(np.arange(n), k)


def _accuracy(dist: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy at each threshold: [T]."""
    predict = dist[None, :] < thresholds[:, None]
    return (predict == issame[None, :]).mean(axis=1)


def _val_far(dist, issame, thresholds):
    """(VAL, FAR) at each threshold: rates of accepted same / different pairs."""
    accept = dist[None, :] < np.asarray(thresholds)[:, None]
    same, diff = issame.sum(), (~issame).sum()
    val = (accept & issame).sum(axis=1) / max(same, 1)
    far = (accept & ~issame).sum(axis=1) / max(diff, 1)
    return val, far


def _threshold_at_far(far: np.ndarray, thresholds: np.ndarray, target: float) -> float:
    """The threshold where the (non-decreasing) FAR curve reaches ``target``.

    An exact hit gives the last grid threshold whose FAR equals ``target``; else the
    linear interpolation between the last point below and the first point above; 0.0
    when the FAR stays below ``target`` (see the module docstring).
    """
    if far[-1] < target:
        return 0.0
    hits = np.flatnonzero(far == target)
    if hits.size:
        return float(thresholds[hits[-1]])
    above = int(np.argmax(far > target))  # first grid point past the target
    if above == 0:
        return float(thresholds[0])
    below = above - 1
    t = (target - far[below]) / (far[above] - far[below])
    return float(thresholds[below] + t * (thresholds[above] - thresholds[below]))


@dataclasses.dataclass(frozen=True)
class VerificationResult:
    accuracy: float  # mean held-out accuracy over the folds
    accuracy_std: float
    threshold: float  # mean chosen squared-distance threshold
    val: float  # VAL (true accept rate) at FAR=1e-3, mean over folds
    val_std: float
    far: float  # the FAR actually obtained on the held-out folds, mean
    fold_accuracies: tuple[float, ...]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def metrics(self) -> dict[str, float]:
        """The scalars logged during training."""
        return {
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "threshold": self.threshold,
            "val_at_far_1e-3": self.val,
        }


def evaluate_pairs(
    embeddings: np.ndarray, issame: np.ndarray, *, far_target: float = 1e-3, num_folds: int = NUM_FOLDS
) -> VerificationResult:
    """The 10-fold protocol on embeddings [2P, D] (pair i = rows 2i, 2i+1; normalized here)."""
    embeddings = np.asarray(embeddings, np.float64)
    issame = np.asarray(issame, bool)
    if embeddings.ndim != 2 or len(embeddings) != 2 * len(issame):
        raise ValueError(f"embeddings {embeddings.shape} do not match {len(issame)} pairs")
    if len(issame) < num_folds:
        raise PairFileError(
            f"{len(issame)} pairs cannot be split into {num_folds} folds (a pair set needs >= {num_folds} pairs)"
        )
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    embeddings = embeddings / np.maximum(norms, 1e-12)
    dist = ((embeddings[0::2] - embeddings[1::2]) ** 2).sum(axis=1)
    accs, thresholds, vals, fars = [], [], [], []
    for test in _folds(len(issame), num_folds):
        train = np.setdiff1d(np.arange(len(issame)), test)
        best = int(np.argmax(_accuracy(dist[train], issame[train], ACCURACY_THRESHOLDS)))
        threshold = ACCURACY_THRESHOLDS[best]
        accs.append(float(_accuracy(dist[test], issame[test], np.array([threshold]))[0]))
        thresholds.append(float(threshold))
        _, far_train = _val_far(dist[train], issame[train], VAL_THRESHOLDS)
        t = _threshold_at_far(far_train, VAL_THRESHOLDS, far_target)
        val, far = _val_far(dist[test], issame[test], [t])
        vals.append(float(val[0]))
        fars.append(float(far[0]))
    return VerificationResult(
        accuracy=float(np.mean(accs)),
        accuracy_std=float(np.std(accs)),
        threshold=float(np.mean(thresholds)),
        val=float(np.mean(vals)),
        val_std=float(np.std(vals)),
        far=float(np.mean(fars)),
        fold_accuracies=tuple(accs),
    )


@dataclasses.dataclass
class PairSet:
    """A loaded ``.bin`` file: decoded images uint8 [2P, S, S, 3] and issame bool[P]."""

    name: str
    images: np.ndarray
    issame: np.ndarray

    @classmethod
    def load(
        cls, path: str | pathlib.Path, image_size: int = 112, *, log: Callable[[str], object] | None = None
    ) -> PairSet:
        """Reads and decodes a ``.bin`` file; ``log`` gets ``"loading NAME: P pairs"``
        before the images are decoded."""
        encoded, issame = load_bin(path)
        name = pathlib.Path(path).stem
        if log is not None:
            log(f"loading {name}: {len(issame)} pairs")
        return cls(name, decode_images(encoded, image_size, name=str(path)), issame)

    def evaluate(
        self,
        embed: Callable[..., np.ndarray],
        *,
        flip: bool = True,
        progress: Callable[[int], object] | None = None,
    ) -> VerificationResult:
        """``embed(images, flip=...)`` -> [N, D] (e.g. an :class:`~pfc_jax.inference.Embedder`).
        With ``progress``, ``embed`` is also passed ``progress=`` (the Embedder calls it with
        the number of images of each chunk it has embedded)."""
        extra = {} if progress is None else {"progress": progress}
        return evaluate_pairs(embed(self.images, flip=flip, **extra), self.issame)
