"""Embeddings of aligned face images, from an ONNX export or a training workdir.

    python -m pfc_jax.embed --onnx r50.onnx --images faces/ --out feats.npy
    python -m pfc_jax.embed --workdir /runs/r50 --images list.txt --out feats.npy --flip
    python -m pfc_jax.embed compare a.jpg b.jpg --onnx r50.onnx

``--images`` is a folder, searched recursively for .jpg, .jpeg and .png files (sorted by
path), or a text file with one image path per line (relative paths are relative to the
list's folder). Images must be aligned faces of the model's size (112x112 for the
published recipes). ``--out feats.npy`` receives float32 [N, D] embeddings, not
normalized, one row per image in the order of ``feats.paths.txt``. With ``--flip`` an
embedding is f(image) + f(mirrored image), the verification protocol.

``--onnx`` runs onnxruntime (CUDA when onnxruntime-gpu sees a GPU, else the CPU);
``--workdir`` runs the JAX backbone of a checkpoint on every local device
(:class:`pfc_jax.inference.Embedder`). ``compare`` prints the cosine similarity of two
images.
"""

from __future__ import annotations

import collections
import os
import pathlib
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from pfc_jax import cli
from pfc_jax.errors import InputError
from pfc_jax.progress import Progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class EmbedError(InputError):
    """A missing, unreadable or wrongly sized input; the message names the file."""


def find_images(source: str | pathlib.Path) -> list[pathlib.Path]:
    """The images of a folder (recursive, sorted) or of a list file (in its order)."""
    source = pathlib.Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not paths:
            raise EmbedError(f"no {', '.join(IMAGE_SUFFIXES)} images under {source}")
        return paths
    if not source.is_file():
        raise EmbedError(f"--images {source}: no such folder or list file")
    lines = [line.strip() for line in source.read_text().splitlines()]
    paths = [source.parent / line for line in lines if line]  # an absolute line stays absolute
    if not paths:
        raise EmbedError(f"{source} lists no images")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise EmbedError(f"{source} lists {len(missing)} missing file(s), the first: {missing[0]}")
    return paths


def read_image(path: str | pathlib.Path, size: int) -> np.ndarray:
    """uint8 [size, size, 3] RGB, or an :class:`EmbedError` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            image = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise EmbedError(f"{path}: no such file") from None
    except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "not an image"
        raise EmbedError(f"cannot decode {path}: {e}") from None
    if image.shape[:2] != (size, size):
        raise EmbedError(
            f"{path} is {image.shape[1]}x{image.shape[0]}; the model takes aligned "
            f"{size}x{size} faces (align and crop first)"
        )
    return image


def load_embedder(
    *,
    onnx: str | None = None,
    workdir: str | None = None,
    step: int | None = None,
    encoder: str | None = None,
    batch_size: int = 64,
):
    """An :class:`~pfc_jax.inference.OnnxEmbedder` or, for a workdir, an :class:`~pfc_jax.inference.Embedder`."""
    if onnx is not None:
        from pfc_jax.inference.onnx import OnnxEmbedder

        return OnnxEmbedder(onnx, batch_size)
    from pfc_jax.inference import Embedder

    return Embedder.from_workdir(workdir, step, encoder=encoder, batch_size=batch_size)


def _decoded_batches(paths: Sequence[pathlib.Path], size: int, batch_size: int) -> Iterator[np.ndarray]:
    """uint8 batches, decoded by threads two batches ahead of the model (PIL releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        pending = collections.deque()
        for start in range(0, len(paths), batch_size):
            pending.append([pool.submit(read_image, p, size) for p in paths[start : start + batch_size]])
            if len(pending) > 2:
                yield np.stack([f.result() for f in pending.popleft()])
        while pending:
            yield np.stack([f.result() for f in pending.popleft()])


def embed_images(
    embedder, paths: Sequence[pathlib.Path], *, flip: bool = False, batch_size: int = 64, progress: bool = True
) -> np.ndarray:
    """float32 [len(paths), D] embeddings, in order."""
    size = embedder.image_size or 112
    bar = Progress(len(paths), "images", enabled=progress)
    out = []
    try:
        for feats in embedder.embed_batches(_decoded_batches(paths, size, batch_size), flip=flip):
            out.append(np.asarray(feats, np.float32))
            bar.update(len(feats))
    finally:
        bar.close()
    return np.concatenate(out)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


def _replace(path: pathlib.Path, write) -> None:
    """Writes ``path`` through a temporary file and a rename: never half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def _parse(argv):
    compare = bool(argv) and argv[0] == "compare"
    if compare:
        parser = cli.parser("pfc_jax.embed compare", "cosine similarity of two aligned face images")
        parser.add_argument("image_a")
        parser.add_argument("image_b")
    else:
        parser = cli.parser("pfc_jax.embed", __doc__)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--onnx", help="an exported model (python -m pfc_jax.export)")
    cli.add_workdir(model, required=False, help="a training workdir (its checkpoint's backbone, run by JAX)")
    cli.add_step(parser)
    cli.add_encoder(parser)
    parser.add_argument("--flip", action="store_true", help="add the embedding of the mirrored image")
    if not compare:
        parser.add_argument("--images", required=True, help="a folder of images, or a text file of image paths")
        parser.add_argument(
            "--out", required=True, help="the .npy file to write; the image paths go beside it in <name>.paths.txt"
        )
        parser.add_argument("--batch-size", type=cli.positive_int, default=64, help="images per forward")
    args = parser.parse_args(argv[1:] if compare else argv)
    args.command = "compare" if compare else "embed"
    if args.step is not None and args.onnx:
        parser.error("--step goes with --workdir")
    if args.encoder is not None and args.onnx:
        parser.error("--encoder goes with --workdir")
    return args


def _compare(args) -> None:
    for image in (args.image_a, args.image_b):  # before the (slower) model load
        if not pathlib.Path(image).is_file():
            raise EmbedError(f"{image}: no such file")
    embedder = load_embedder(onnx=args.onnx, workdir=args.workdir, step=args.step, encoder=args.encoder, batch_size=2)
    size = embedder.image_size or 112
    pair = np.stack([read_image(args.image_a, size), read_image(args.image_b, size)])
    a, b = next(iter(embedder.embed_batches([pair], flip=args.flip)))
    print(f"{cosine(a, b):.6f}")


def _embed(args) -> None:
    out = pathlib.Path(args.out)
    listing = out.with_suffix(".paths.txt")
    if pathlib.Path(args.images).resolve() == listing.resolve():
        raise EmbedError(f"--out {out} would overwrite the image list {listing} (choose another name)")
    cli.require_writable(out, "--out")  # before the work, not after it
    cli.require_writable(listing, "--out")
    paths = find_images(args.images)
    embedder = load_embedder(
        onnx=args.onnx, workdir=args.workdir, step=args.step, encoder=args.encoder, batch_size=args.batch_size
    )
    feats = embed_images(embedder, paths, flip=args.flip, batch_size=args.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    _replace(out, lambda f: np.save(f, feats))
    _replace(listing, lambda f: f.write("".join(f"{p}\n" for p in paths).encode()))
    print(f"wrote {feats.shape[0]} x {feats.shape[1]} embeddings to {out} (image paths in {listing})")


def main(argv=None) -> None:
    args = _parse(sys.argv[1:] if argv is None else argv)
    cli.guard(lambda: (_compare if args.command == "compare" else _embed)(args))


if __name__ == "__main__":
    main()
