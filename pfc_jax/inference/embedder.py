"""Embeddings from a trained backbone, data-parallel over the device mesh.

    embedder = Embedder.from_workdir("/runs/r50")        # latest checkpoint
    feats = embedder(images)                             # uint8 [N, 112, 112, 3] -> [N, D]
    feats = embedder(images, flip=True)                  # f(x) + f(flip(x)), the eval protocol

Batches are split over every device; the last batch is padded up to the batch size (one
compiled shape), and the padding rows are dropped from the result. Embeddings are
returned un-normalized (float32 numpy), as the ONNX export returns them.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from pfc_jax import sharding
from pfc_jax.inference import normalize_images
from pfc_jax.models import ModelSpec


@dataclasses.dataclass
class Embedder:
    """Inference-mode forward of a backbone over a mesh.

    Attributes:
      model: the backbone (NNX); it is run with ``train=False`` (running BatchNorm
        statistics, no dropout).
      batch_size: images per forward; rounded up to a multiple of the device count.
      spec: the backbone's description (name, embedding size, image size) and
      step, encoder: the checkpoint's step and which of its backbones (``"online"`` or
        ``"ema"``), when built with :meth:`from_workdir`.
    """

    model: nnx.Module
    batch_size: int = 256
    mesh: jax.sharding.Mesh | None = None
    spec: ModelSpec | None = None
    step: int | None = None
    encoder: str | None = None

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        self.mesh = self.mesh or sharding.make_mesh()
        n = sharding.num_shards(self.mesh)
        self.batch_size = -(-self.batch_size // n) * n
        graphdef, params, batch_stats = nnx.split(self.model, nnx.Param, nnx.BatchStat)
        in_sharding = sharding.batch_sharding(self.mesh)

        def forward(weights, images, *, flip):
            model = nnx.merge(graphdef, *weights)
            x = normalize_images(images, jnp.float32)
            out = model(x, train=False).astype(jnp.float32)
            if flip:
                out = out + model(x[:, :, ::-1, :], train=False).astype(jnp.float32)
            return out

        replicated = sharding.replicated(self.mesh)
        self._replicated = replicated
        self.set_weights(nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats))
        self._forward = {
            flip: jax.jit(
                functools.partial(forward, flip=flip), in_shardings=(replicated, in_sharding), out_shardings=in_sharding
            )
            for flip in (False, True)
        }
        self._in_sharding = in_sharding

    def set_weights(self, params, batch_stats) -> None:
        """Embed with these backbone weights from now on (same shapes: nothing recompiles).

        The trainer's evaluators use this with the current state's params and batch stats.
        """
        self._weights = jax.device_put((params, batch_stats), self._replicated)

    @classmethod
    def from_workdir(
        cls,
        workdir: str | pathlib.Path,
        step: int | None = None,
        *,
        encoder: str | None = None,
        log: Callable[[str], object] | None = None,
        **kw,
    ) -> Embedder:
        """The backbone of ``workdir``'s checkpoint ``step`` (default: the latest);
        ``encoder``: ``"online"`` or ``"ema"`` (default: the run's ``eval.encoder``);
        ``log`` gets a line once the step is known, before it is read."""
        from pfc_jax import checkpoint

        model, spec, step, encoder = checkpoint.load_backbone(workdir, step, encoder=encoder, log=log)
        return cls(model, spec=spec, step=step, encoder=encoder, **kw)

    @property
    def image_size(self) -> int | None:
        return self.spec.image_size if self.spec else None

    def embed_batches(self, batches: Iterable[np.ndarray], *, flip: bool = False) -> Iterator[np.ndarray]:
        """Embeds each uint8 [n, S, S, 3] chunk (n <= batch_size), yielding [n, D] float32."""
        for images in batches:
            images = np.asarray(images)
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
                raise ValueError(f"expected uint8 images [N, H, W, 3], got {images.dtype} {images.shape}")
            n = len(images)
            if n > self.batch_size:
                raise ValueError(f"a chunk of {n} images exceeds batch_size {self.batch_size}")
            if n < self.batch_size:
                pad = np.zeros((self.batch_size - n, *images.shape[1:]), np.uint8)
                images = np.concatenate([images, pad])
            # Every process passes the same images (a multi-process mesh takes its part of them).
            x = jax.make_array_from_callback(
                images.shape, self._in_sharding, lambda index, images=images: images[index]
            )
            out = self._forward[bool(flip)](self._weights, x)
            if not out.is_fully_addressable:
                out = multihost_utils.process_allgather(out, tiled=True)
            yield np.asarray(out)[:n]

    def __call__(
        self, images: np.ndarray, *, flip: bool = False, progress: Callable[[int], object] | None = None
    ) -> np.ndarray:
        """Embeddings of all ``images`` (uint8 [N, S, S, 3]) as float32 [N, D].
        ``progress(n)`` is called after each chunk of ``n`` images (e.g. ``Progress.update``)."""
        images = np.asarray(images)
        chunks = (images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size))
        out = []
        for features in self.embed_batches(chunks, flip=flip):
            out.append(features)
            if progress is not None:
                progress(len(features))
        if not out:
            dim = self.spec.embedding_dim if self.spec else 0
            return np.zeros((0, dim), np.float32)
        return np.concatenate(out)
