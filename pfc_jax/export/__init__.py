"""Export a trained backbone to ONNX, checked against JAX with onnxruntime.

    python -m pfc_jax.export --workdir /runs/r50 --output r50.onnx            # latest step
    python -m pfc_jax.export --workdir /runs/r50 --step 20000 --output r50.onnx --opset 13

The file follows the convention of face-recognition deployment code: one float32 input
``input`` [N, 3, S, S] (NCHW, RGB, pixels normalized as (x - 127.5) / 127.5 by the
caller), a symbolic batch N, and one output ``embedding`` [N, D], not L2-normalized.
The backbone runs in inference mode (BatchNorm running statistics, no dropout); the
conversion is :func:`pfc_jax.export.onnx.to_onnx`.

Before the file is put in place it is validated with ``onnx.checker`` and run by
onnxruntime on random batches of two sizes; an export whose largest absolute difference
from the JAX model exceeds ``atol + rtol * scale`` is not written, ``scale`` being the
largest absolute embedding value (deep backbones give embeddings in the tens, whose float32
rounding alone differs by more than a fixed absolute tolerance). Models larger than 2 GB keep
their weights in ``<output>.data`` beside the model file. Everything is written to a
hidden temporary folder next to the output and renamed into place once checked, so an
interrupted export leaves nothing that looks complete, and re-exporting to the same path
replaces both files.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from pfc_jax import cli
from pfc_jax.errors import InputError
from pfc_jax.export.onnx import (
    BATCH,
    DEFAULT_OPSET,
    INPUT,
    MIN_OPSET,
    NCHW,
    OUTPUT,
    ExportError,
    require_onnx,
    to_onnx,
)
from pfc_jax.inference import NORMALIZATION

__all__ = ["ExportError", "ExportReport", "check_against_jax", "export", "main", "to_onnx"]

# Protobuf cannot serialize a message of 2 GiB; keep headroom for the graph itself.
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def check_against_jax(
    model: nnx.Module, path: str | pathlib.Path, *, image_size: int, batch_sizes=(1, 3), seed: int = 0
) -> tuple[float, float]:
    """(largest |onnxruntime(path) - JAX model|, largest |JAX embedding|) over random
    uint8 images, in batches of each size."""
    from pfc_jax.inference import normalize_images
    from pfc_jax.inference.onnx import onnx_session

    session = onnx_session(path, providers=["CPUExecutionProvider"])
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x, train=False))
    rng, worst, scale = np.random.default_rng(seed), 0.0, 0.0
    for n in batch_sizes:
        images = rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8)
        x = normalize_images(images)
        with jax.default_matmul_precision("highest"):  # no TF32 on GPUs: compare fp32 with fp32
            want = np.asarray(forward(state, x), np.float32)
        got = session.run([OUTPUT], {INPUT: np.ascontiguousarray(x.transpose(NCHW))})[0]
        if got.shape != want.shape:
            raise ExportError(f"onnxruntime returned shape {got.shape} for a batch of {n}, JAX {want.shape}")
        diff = float(np.max(np.abs(got - want))) if got.size else 0.0
        worst = max(worst, diff if np.isfinite(diff) else float("inf"))
        scale = max(scale, float(np.max(np.abs(want))) if want.size else 0.0)
    return worst, scale


@dataclasses.dataclass
class ExportReport:
    """What :func:`export` wrote and measured; ``summary()`` is the CLI's printout."""

    path: pathlib.Path
    data_path: pathlib.Path | None  # external weights, for models over 2 GB
    backbone: str
    step: int
    opset: int
    input_shape: tuple
    output_shape: tuple
    max_abs_diff: float
    max_abs_embedding: float  # the scale the difference compares with
    batch_sizes: tuple
    num_bytes: int
    seconds: float

    def summary(self) -> str:
        fmt = lambda s: "[" + ", ".join(map(str, s)) + "]"
        data = f" + {self.data_path.name}" if self.data_path else ""
        return (
            f"exported {self.backbone} (step {self.step}) to {self.path}{data}\n"
            f"  opset {self.opset}; input  {INPUT!r} float32 {fmt(self.input_shape)} "
            f"(NCHW RGB, {NORMALIZATION})\n"
            f"            output {OUTPUT!r} float32 {fmt(self.output_shape)} (not normalized)\n"
            f"  onnxruntime vs JAX, batches of {' and '.join(map(str, self.batch_sizes))}: "
            f"max abs diff {self.max_abs_diff:.2e} (embedding values up to {self.max_abs_embedding:.3g})\n"
            f"  {self.num_bytes / 2**20:,.1f} MiB, {self.seconds:.1f} s"
        )


def _install(staged: pathlib.Path, output: pathlib.Path, external: bool) -> None:
    """Moves the checked files from ``staged`` to ``output`` (and ``output.data``)."""
    data = output.with_name(output.name + ".data")
    if external:
        # No model at `output` while its weights file is being swapped: an interruption
        # here leaves no model that pairs old and new parts.
        output.unlink(missing_ok=True)
        os.replace(staged / data.name, data)
        os.replace(staged / output.name, output)
    else:
        os.replace(staged / output.name, output)
        data.unlink(missing_ok=True)  # the weights of an earlier external-data export


def export(
    workdir: str | pathlib.Path,
    output: str | pathlib.Path,
    *,
    step: int | None = None,
    encoder: str | None = None,
    opset: int = DEFAULT_OPSET,
    atol: float = 1e-4,
    rtol: float = 1e-5,
    batch_sizes=(1, 3),
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
) -> ExportReport:
    """Exports the backbone of ``workdir``'s checkpoint ``step`` (default: latest) to
        ``output``, checked by onnxruntime against JAX within ``atol + rtol * scale`` (``scale``:
    the largest absolute embedding value of the check batches). ``encoder``:
        ``"online"`` or ``"ema"``; default: the run's ``eval.encoder`` (DCQ: the EMA).

        Raises :class:`~pfc_jax.checkpoint.CheckpointError` for a missing or incomplete
        checkpoint and :class:`ExportError` when the conversion or the check fails (nothing
        is written then).
    """
    require_onnx()
    import onnx

    from pfc_jax import checkpoint

    start = time.perf_counter()
    output = pathlib.Path(output)
    cli.require_writable(output, "--output")  # before the work, not after it
    model, spec, step, encoder = checkpoint.load_backbone(workdir, step, encoder=encoder)
    image_size = spec.image_size
    proto = to_onnx(
        model,
        image_size=image_size,
        opset=opset,
        metadata={
            "backbone": spec.name,
            "step": step,
            "encoder": encoder,
            "embedding_dim": spec.embedding_dim,
            "image_size": image_size,
            "input_layout": "NCHW RGB",
            "input_normalization": NORMALIZATION,
        },
    )
    external = sum(len(t.raw_data) for t in proto.graph.initializer) > external_data_threshold

    output.parent.mkdir(parents=True, exist_ok=True)
    staged = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        path = staged / output.name
        if external:
            onnx.save_model(
                proto,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=output.name + ".data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(proto, str(path))
        del proto
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as e:  # noqa: BLE001 - checker and shape inference raise several types
            raise ExportError(f"onnx.checker rejects the exported model: {e}") from None
        diff, scale = check_against_jax(model, path, image_size=image_size, batch_sizes=batch_sizes)
        tolerance = atol + rtol * scale
        if not diff <= tolerance:
            raise ExportError(
                f"onnxruntime's output differs from the JAX model by up to {diff:.3g} (max abs), more than "
                f"the tolerance {tolerance:.3g} (atol {atol:g} + rtol {rtol:g} x embedding scale {scale:.3g}): "
                f"the export is wrong and {output} was not written"
            )
        num_bytes = sum(f.stat().st_size for f in staged.iterdir())
        _install(staged, output, external)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return ExportReport(
        output,
        output.with_name(output.name + ".data") if external else None,
        spec.name,
        step,
        opset,
        (BATCH, 3, image_size, image_size),
        (BATCH, spec.embedding_dim),
        diff,
        scale,
        tuple(batch_sizes),
        num_bytes,
        time.perf_counter() - start,
    )


def _parser():
    p = cli.parser("pfc_jax.export", __doc__)
    cli.add_workdir(p)
    cli.add_step(p)
    cli.add_encoder(p)
    p.add_argument("--output", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, {MIN_OPSET} or later")
    p.add_argument(
        "--atol",
        type=float,
        default=1e-4,
        help="largest accepted |onnxruntime - JAX| on the check batches, plus --rtol x the embedding scale",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=1e-5,
        help="the part of the tolerance relative to the largest absolute embedding value",
    )
    return p


def _export(args) -> None:
    if args.opset < MIN_OPSET:
        raise InputError(f"--opset {args.opset} is too old (use {MIN_OPSET} or later)")
    report = export(
        args.workdir,
        args.output,
        step=args.step,
        encoder=args.encoder,
        opset=args.opset,
        atol=args.atol,
        rtol=args.rtol,
    )
    print(report.summary())


def main(argv=None) -> None:
    cli.run(_export, _parser(), argv)
