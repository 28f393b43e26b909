"""An exported backbone (``python -m pfc_jax.export``) run by onnxruntime, without JAX.

    embedder = OnnxEmbedder("r50.onnx")
    feats = np.concatenate(list(embedder.embed_batches([images], flip=True)))

The model takes ``(x - 127.5) / 127.5`` NCHW float32 and returns un-normalized float32
embeddings; :class:`OnnxEmbedder` takes uint8 NHWC images like
:class:`~pfc_jax.inference.Embedder` and does the conversion.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from pfc_jax.errors import InputError
from pfc_jax.inference import normalize_images

# The providers tried in order; the first that onnxruntime has is used.
DEFAULT_PROVIDERS = ("CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxModelError(InputError):
    """An ONNX file that is missing, unreadable or not a face embedding model."""


def onnx_session(path: str | pathlib.Path, providers: Sequence[str] = DEFAULT_PROVIDERS):
    """An onnxruntime session on ``path`` with the first available of ``providers``,
    quiet (errors only). Raises :class:`OnnxModelError` when the file cannot be loaded."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise OnnxModelError("onnxruntime is not installed (pip install 'pfc_jax[onnx]')") from None
    if not pathlib.Path(path).is_file():
        raise OnnxModelError(f"{path}: no such ONNX file (export one with python -m pfc_jax.export)")
    available = ort.get_available_providers()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), options, providers=[p for p in providers if p in available])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise OnnxModelError(f"cannot load {path} with onnxruntime: {e}") from None


class OnnxEmbedder:
    """An exported backbone run by onnxruntime; the interface of :class:`~pfc_jax.inference.Embedder`."""

    def __init__(self, path: str | pathlib.Path, batch_size: int = 64, providers: Sequence[str] = DEFAULT_PROVIDERS):
        self.session = onnx_session(path, providers)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        shape = inputs[0].shape
        if len(inputs) != 1 or len(outputs) != 1 or len(shape) != 4 or shape[1] != 3:
            raise OnnxModelError(
                f"{path} is not a face embedding model: expected one input [N, 3, S, S] "
                f"and one output, got inputs {[(i.name, i.shape) for i in inputs]}"
            )
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.image_size = shape[2] if isinstance(shape[2], int) else None
        self.batch_size = batch_size

    def run(self, x: np.ndarray) -> np.ndarray:
        """The model on already normalized NCHW float32 input."""
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(x)})[0]

    def embed_batches(self, batches: Iterable[np.ndarray], *, flip: bool = False) -> Iterator[np.ndarray]:
        """Embeds each uint8 [n, S, S, 3] chunk, yielding float32 [n, D]."""
        for images in batches:
            x = normalize_images(np.asarray(images)).transpose(0, 3, 1, 2)
            out = self.run(x)
            if flip:
                out = out + self.run(x[..., ::-1])
            yield out.astype(np.float32)
