"""TFDS builders (ArrayRecord files, no TensorFlow) for face datasets.

``build(source, name, data_dir)`` writes ``data_dir/<name>/1.0.0`` with one ``train``
split of ``{"image": JPEG 112x112x3, "label": ClassLabel}``. TFDS writes into an
``incomplete.*`` folder and renames it only when the build is complete, so an
interrupted build never loads as a dataset.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow_datasets as tfds

from pfc_jax.data.sources import SourceError

VERSION = "1.0.0"


def _as_jpeg(encoded: bytes) -> bytes:
    if encoded[:2] == b"\xff\xd8":  # already JPEG: store as is
        return encoded
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(encoded)).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _image_shape(source) -> tuple[int, int, int]:
    example = source[0]
    if "image" in example:
        return tuple(np.shape(example["image"]))
    from PIL import Image

    w, h = Image.open(io.BytesIO(example["encoded"])).size
    return (h, w, 3)


class FaceDatasetBuilder(tfds.core.GeneratorBasedBuilder):
    """Builds a face-recognition dataset from any :mod:`pfc_jax.data.sources` source."""

    VERSION = tfds.core.Version(VERSION)

    def __init__(self, *, source, **kwargs):
        self._face_source = source
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"Aligned faces converted by pfc_jax from {self._face_source!r}.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=_image_shape(self._face_source), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(num_classes=self._face_source.num_classes),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        source = self._face_source
        for i in range(len(source)):
            example = source[i]
            if "image" in example:
                from pfc_jax.data.synth import encode_jpeg

                image = encode_jpeg(np.asarray(example["image"], np.uint8))
            else:
                image = _as_jpeg(example["encoded"])
            yield i, {"image": image, "label": example["label"]}


def build(source, name: str, data_dir: str) -> str:
    """Builds ``name`` from ``source`` into ``data_dir``; returns the dataset folder."""
    if not name.isidentifier() or name.lower() != name:
        raise SourceError(f"dataset name {name!r} must be lower_snake_case (letters, digits, _; e.g. ms1mv3)")
    with tfds.core.registered.skip_registration():
        cls = type(f"Pfc_{name}", (FaceDatasetBuilder,), {"name": name})
    builder = cls(source=source, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_path)
