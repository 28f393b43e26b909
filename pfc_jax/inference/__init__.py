"""Inference: embeddings from a trained backbone, in JAX or from an ONNX export.

* :class:`Embedder` (:mod:`pfc_jax.inference.embedder`): the JAX backbone of a workdir,
  data-parallel over the device mesh;
* :class:`OnnxEmbedder` (:mod:`pfc_jax.inference.onnx`): an exported model run by
  onnxruntime, without JAX;
* :func:`normalize_images`: the pixel convention both use, and the train step too.

Both embedders take uint8 RGB images [N, S, S, 3] and return float32 [N, D] embeddings,
not normalized, through ``embed_batches(chunks, flip=...)``. This package imports only
numpy until an embedder is asked for, so the ONNX path never starts JAX.
"""

from __future__ import annotations

import numpy as np

# insightface models take (x - 127.5) / 127.5: pixels in [0, 255] to [-1, 1].
PIXEL_MEAN = 127.5
PIXEL_STD = 127.5
NORMALIZATION = f"(x - {PIXEL_MEAN}) / {PIXEL_STD}"


def normalize_images(images, dtype=np.float32):
    """uint8 [0, 255] -> [-1, 1] in ``dtype``; numpy in, numpy out; JAX in, JAX out."""
    return ((images.astype(np.float32) - PIXEL_MEAN) / PIXEL_STD).astype(dtype)


def __getattr__(name: str):
    # The embedders load on first use: the JAX one imports JAX, the ONNX one onnxruntime.
    if name == "Embedder":
        from pfc_jax.inference.embedder import Embedder

        return Embedder
    if name in ("OnnxEmbedder", "onnx_session"):
        from pfc_jax.inference import onnx

        return getattr(onnx, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["NORMALIZATION", "PIXEL_MEAN", "PIXEL_STD", "Embedder", "OnnxEmbedder", "normalize_images", "onnx_session"]
