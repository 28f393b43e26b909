"""Writes the procedural synthetic identities as a real insightface dataset.

    python -m pfc_jax.data.synth --out /tmp/synth --identities 1000 --images-per-id 20

produces ``train.rec`` / ``train.idx`` / ``property`` (JPEG images, insightface's
header and identity records) and ``synth_val.bin``, an insightface verification pair
file (a pickle of ``(list of JPEG bytes, list of is-same bools)``) built from held-out
identities that never appear in ``train.rec``. The whole real data path (RecordIO,
TFDS build, verification) can then run anywhere without a download.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil

import numpy as np

from pfc_jax import cli
from pfc_jax.data import recordio
from pfc_jax.data.synthetic import SyntheticIdentities
from pfc_jax.errors import InputError
from pfc_jax.progress import Progress


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def verification_pairs(source: SyntheticIdentities, num_pairs: int, seed: int, quality: int):
    """(bins, issame): alternating same / different pairs of ``source``'s identities."""
    if source.num_identities < 2 or source.images_per_identity < 2:
        raise InputError("verification pairs need >= 2 held-out identities with >= 2 images each")
    rng = np.random.default_rng([seed, 7])
    bins, issame = [], []
    for p in range(num_pairs):
        same = p % 2 == 0
        if same:
            identity = int(rng.integers(source.num_identities))
            i, j = rng.choice(source.images_per_identity, 2, replace=False)
            a, b = source.render(identity, int(i)), source.render(identity, int(j))
        else:
            x, y = rng.choice(source.num_identities, 2, replace=False)
            a = source.render(int(x), int(rng.integers(source.images_per_identity)))
            b = source.render(int(y), int(rng.integers(source.images_per_identity)))
        bins += [encode_jpeg(a, quality), encode_jpeg(b, quality)]
        issame.append(same)
    return bins, issame


def held_out_identities(
    identities: int, images_per_id: int, image_size: int, seed: int, count: int = 100
) -> SyntheticIdentities:
    """``count`` identities of the same synthetic world that a training set of
    ``identities`` does not contain (the verification pairs are made of them)."""
    return SyntheticIdentities(
        count, max(images_per_id, 2), image_size=image_size, seed=seed, first_identity=identities
    )


def write(
    out: str,
    *,
    identities: int,
    images_per_id: int,
    image_size: int = 112,
    seed: int = 0,
    pairs: int = 600,
    holdout_identities: int = 100,
    quality: int = 95,
    progress: bool = True,
    overwrite: bool = False,
) -> None:
    """Writes the dataset into ``out`` atomically (a temporary folder renamed at the end;
    removed if anything fails). ``out`` may be missing or an empty folder; a folder with
    files in it is replaced only with ``overwrite`` (otherwise nothing is written)."""
    _check_out(out, overwrite)
    if pairs and holdout_identities < 2:
        raise InputError(
            f"verification pairs need >= 2 held-out identities, got {holdout_identities} "
            "(raise --holdout-identities, or --pairs 0 for no pair file)"
        )
    train = SyntheticIdentities(identities, images_per_id, image_size=image_size, seed=seed)
    tmp = out.rstrip("/") + ".incomplete"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        bar = Progress(len(train), "images") if progress else None
        images, labels = [], []
        for i in range(len(train)):
            example = train[i]
            images.append(encode_jpeg(example["image"], quality))
            labels.append(example["label"])
            if bar:
                bar.update()
        recordio.write_dataset(tmp, images, labels, identities, (image_size, image_size))
        if pairs:
            held_out = held_out_identities(identities, images_per_id, image_size, seed, holdout_identities)
            bins, issame = verification_pairs(held_out, pairs, seed, quality)
            with open(os.path.join(tmp, "synth_val.bin"), "wb") as f:
                pickle.dump((bins, issame), f, protocol=4)
        if overwrite and os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)  # onto an empty folder too; fails if files appeared in it meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_out(out: str, overwrite: bool) -> None:
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise InputError(f"{out} exists and is not a folder (choose another --out)")
    if os.listdir(out) and not overwrite:
        raise InputError(f"{out} exists and is not empty (choose another --out, or pass --overwrite to replace it)")


def _parser():
    p = cli.parser("pfc_jax.data.synth", __doc__)
    p.add_argument("--out", required=True, help="output folder: new or empty, unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it holds files")
    p.add_argument("--identities", type=cli.positive_int, required=True)
    p.add_argument("--images-per-id", type=cli.positive_int, required=True)
    p.add_argument("--image-size", type=cli.positive_int, default=112)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pairs", type=cli.non_negative_int, default=600, help="verification pairs in synth_val.bin (0: none)"
    )
    p.add_argument("--holdout-identities", type=cli.positive_int, default=100)
    p.add_argument("--quality", type=cli.positive_int, default=95, help="JPEG quality")
    return p


def _synth(args) -> None:
    write(
        args.out,
        identities=args.identities,
        images_per_id=args.images_per_id,
        image_size=args.image_size,
        seed=args.seed,
        pairs=args.pairs,
        holdout_identities=args.holdout_identities,
        quality=args.quality,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {args.out}: {args.identities * args.images_per_id} images of {args.identities} "
        f"identities" + (f", {args.pairs} verification pairs" if args.pairs else "")
    )


def main(argv=None) -> None:
    cli.run(_synth, _parser(), argv)


if __name__ == "__main__":
    main()
