"""Random-access data sources behind one interface.

Every source has ``len(source)``, ``source.num_classes``, ``source.labels()`` (int32 label
of every example) and ``source[i]``, a dict with ``"label"`` (int in ``[0,
num_classes)``) and either ``"image"`` (uint8 [H, W, 3] RGB) or ``"encoded"`` (JPEG/PNG
bytes, decoded by the pipeline's workers). Sources open files lazily and pickle
cheaply, so data-loader worker processes can carry them.

* ``synthetic``: :class:`pfc_jax.data.synthetic.SyntheticIdentities`;
* ``hard_synthetic``: :class:`pfc_jax.data.hard_synthetic.HardSyntheticIdentities`, the
  long-tailed benchmark of ``python -m pfc_jax.study``;
* ``recordio``: :class:`pfc_jax.data.recordio.RecordIODataset` (insightface folders);
* ``folder``: :class:`ImageFolder`, one sub-folder of aligned faces per identity;
* ``tfds``: :class:`TFDSDataset`, an ArrayRecord dataset built by
  ``python -m pfc_jax.data.prepare``.

``config.data.keep_list`` (a core set written by ``python -m pfc_jax.data.prune``) wraps
any of them in a :class:`Subset`: the listed images, in the source's order, labels
unchanged.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from pfc_jax.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class SourceError(InputError):
    """A dataset that cannot be opened as asked; the message says why and what to do."""


class ImageFolder:
    """``root/<identity>/<image>``: labels are the identity folders' sorted order."""

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise SourceError(f"image folder {root} does not exist")
        identities = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not identities:
            raise SourceError(f"{root} has no identity sub-folders (expected root/<identity>/<image files>)")
        self.root = root
        self.identities = identities
        paths, labels = [], []
        for label, identity in enumerate(identities):
            files = sorted(f for f in os.listdir(os.path.join(root, identity)) if f.lower().endswith(IMAGE_EXTENSIONS))
            paths += [os.path.join(identity, f) for f in files]
            labels += [label] * len(files)
        if not paths:
            raise SourceError(f"{root} has identity folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
        self.paths = paths
        self._labels = np.asarray(labels, np.int32)
        self.num_classes = len(identities)

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFolder({self.root!r}, {len(self)} images, {self.num_classes} classes)"

    def __getitem__(self, i: int) -> dict:
        with open(os.path.join(self.root, self.paths[i]), "rb") as f:
            return {"encoded": f.read(), "label": int(self._labels[i])}

    def labels(self) -> np.ndarray:
        return self._labels


def import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise SourceError("TFDS datasets need tensorflow-datasets: pip install 'pfc_jax[tfds]'") from None
    return tfds


def _tfds_dir(data_dir: str, name: str) -> str:
    """The newest complete version folder of ``name`` under ``data_dir``."""
    base = os.path.join(data_dir, name)
    versions = []
    if os.path.isdir(base):
        for v in os.listdir(base):
            if os.path.exists(os.path.join(base, v, "dataset_info.json")):
                versions.append(v)
    if not versions:
        raise SourceError(
            f"no complete TFDS dataset {name!r} in {data_dir} (an interrupted build leaves none); "
            f"build it with: python -m pfc_jax.data.prepare --source rec:DIR --name {name} --data-dir {data_dir}"
        )
    return os.path.join(base, max(versions, key=lambda v: tuple(int(x) for x in v.split("."))))


class TFDSDataset:
    """A face dataset built by :mod:`pfc_jax.data.prepare` (TFDS, ArrayRecord), read
    without TensorFlow. Images are returned encoded; the pipeline decodes them."""

    def __init__(self, data_dir: str, name: str, split: str = "train"):
        self.path = _tfds_dir(data_dir, name)
        self.data_dir, self.name, self.split = data_dir, name, split
        builder = self._builder()
        self.num_classes = builder.info.features["label"].num_classes
        self._len = builder.info.splits[split].num_examples
        self._source = None

    def _builder(self):
        return import_tfds().builder_from_directory(self.path)

    def __getstate__(self):
        return {**self.__dict__, "_source": None}

    def _open(self):
        tfds = import_tfds()
        self._source = self._builder().as_data_source(split=self.split, decoders={"image": tfds.decode.SkipDecoding()})
        return self._source

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TFDSDataset({self.path!r}, {self._len} images, {self.num_classes} classes)"

    def __getitem__(self, i: int) -> dict:
        example = (self._source or self._open())[int(i)]
        return {"encoded": example["image"], "label": int(example["label"])}

    def labels(self) -> np.ndarray:
        source = self._source or self._open()
        return np.asarray([int(source[i]["label"]) for i in range(len(self))], np.int32)


def _synthetic(d):
    from pfc_jax.data.synthetic import SyntheticIdentities

    s = d.synthetic
    return SyntheticIdentities(s.num_identities, s.images_per_identity, image_size=d.image_size, seed=s.seed)


def _hard_synthetic(d):
    from pfc_jax.data.hard_synthetic import HardSyntheticIdentities, World

    return HardSyntheticIdentities(World.from_config(d.hard_synthetic), image_size=d.image_size)


def _recordio(d):
    from pfc_jax.data.recordio import RecordIODataset

    return RecordIODataset(d.path)


def _check_synthetic(c) -> None:
    c.positive_int("data.synthetic.num_identities")
    c.positive_int("data.synthetic.images_per_identity")


def _check_hard_synthetic(c) -> None:
    from pfc_jax.data.hard_synthetic import HeldOut, World

    for group, cls in (("data.hard_synthetic", World), ("data.hard_synthetic_eval", HeldOut)):
        try:
            cls(**c.get(group).to_dict())
        except (InputError, TypeError) as e:
            c.fail_group(group, e)


def _check_tfds(c) -> None:
    name = c.config.data.tfds_name
    c.that(
        bool(name), "data.tfds_name", name, "data.source='tfds' needs the dataset name given to pfc_jax.data.prepare"
    )


@dataclasses.dataclass(frozen=True)
class SourceEntry:
    """A registered data source.

    Attributes:
      open: ``open(config.data) -> source``.
      path: what ``config.data.path`` must name ("" when the source reads no files).
      check: ``check(c)`` validates the source's other fields (a config_validation.Check).
    """

    open: Callable[[Any], Any]
    path: str = ""
    check: Callable[[Any], None] = lambda c: None


# config.data.source -> entry; config validation and the trainer read this.
SOURCES: dict[str, SourceEntry] = {
    "synthetic": SourceEntry(_synthetic, check=_check_synthetic),
    "hard_synthetic": SourceEntry(_hard_synthetic, check=_check_hard_synthetic),
    "recordio": SourceEntry(_recordio, "the folder with train.rec, train.idx and property"),
    "tfds": SourceEntry(lambda d: TFDSDataset(d.path, d.tfds_name), "the TFDS data_dir", _check_tfds),
    "folder": SourceEntry(lambda d: ImageFolder(d.path), "the root of the identity folders"),
}


def make_source(data_config):
    """The source named by a run's ``config.data`` (see :data:`SOURCES`), restricted to
    ``data_config.keep_list`` when one is set."""
    if data_config.source not in SOURCES:
        raise SourceError(f"unknown data source {data_config.source!r} (choose one of {', '.join(SOURCES)})")
    source = SOURCES[data_config.source].open(data_config)
    keep_list = data_config.keep_list
    return Subset(source, read_keep_list(keep_list, len(source))) if keep_list else source


def read_keep_list(path: str, size: int) -> np.ndarray:
    """The image indices of a keep-list file (``.npy`` of int64, or text with one index
    per line and ``#`` comments), checked: strictly increasing, within ``[0, size)``."""
    if not os.path.isfile(path):
        raise SourceError(f"config.data.keep_list: {path} does not exist (a keep.npy written by pfc_jax.data.prune)")
    try:
        if path.endswith(".npy"):
            indices = np.load(path, allow_pickle=False)
        else:
            with open(path) as f:
                indices = np.asarray([int(t) for line in f if (t := line.split("#", 1)[0].strip())], np.int64)
    except (ValueError, OSError) as e:
        raise SourceError(f"config.data.keep_list: {path} cannot be read as a keep-list ({e})") from None
    if indices.ndim != 1 or indices.dtype.kind not in "iu":
        raise SourceError(f"config.data.keep_list: {path} must hold one integer index per image kept")
    if len(indices) == 0:
        raise SourceError(f"config.data.keep_list: {path} keeps no image")
    if np.any(np.diff(indices) <= 0):
        raise SourceError(f"config.data.keep_list: {path} must list image indices in increasing order, each once")
    if indices[0] < 0 or indices[-1] >= size:
        bad = int(indices[-1] if indices[-1] >= size else indices[0])
        raise SourceError(
            f"config.data.keep_list: {path} names image {bad}, but the dataset has {size} images "
            f"(0 ... {size - 1}): the list was written for another dataset"
        )
    return indices.astype(np.int64)


class Subset:
    """The images ``indices`` of ``source``, in that order; labels and classes unchanged."""

    def __init__(self, source, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        self.num_classes = source.num_classes

    def __len__(self) -> int:
        return len(self.indices)

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, {len(self)} images)"

    def __getitem__(self, i: int) -> dict:
        return self.source[int(self.indices[i])]

    def labels(self) -> np.ndarray:
        return self.source.labels()[self.indices]
