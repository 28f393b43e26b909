"""Evaluate a trained backbone: .bin pair verification and IJB-B/C 1:1.

    python -m pfc_jax.evaluate --workdir /runs/r50 --bin /data/ms1m/lfw.bin /data/ms1m/cfp_fp.bin
    python -m pfc_jax.evaluate --workdir /runs/r50 --step 20000 --ijb /data/IJBC --ijb-target IJBC \\
        --cache-dir /tmp/ijbc_feats --save-scores /tmp/ijbc_r50_scores.csv --json
    python -m pfc_jax.evaluate --workdir /tmp/pfc_demo --bin synthetic

``--bin synthetic`` evaluates on held-out identities of the synthetic world the run was
trained on (read from the workdir's config.json). Only the backbone is loaded, never the
class centers. Prints a table; ``--json`` prints one JSON object instead. Progress
(the checkpoint, each pair set loading and embedding, IJB features) goes to stderr.
"""

from __future__ import annotations

import json
import pathlib
import sys

from pfc_jax import cli
from pfc_jax.errors import InputError


def _parser():
    p = cli.parser("pfc_jax.evaluate", __doc__)
    cli.add_workdir(p)
    cli.add_step(p)
    cli.add_encoder(p)
    p.add_argument(
        "--bin",
        nargs="+",
        default=[],
        metavar="NAME",
        help="pair sets, named as in config.eval.bins: a name (lfw, cfp_fp, agedb_30: <eval.dir or "
        "data.path of the run>/<name>.bin), a path ending in .bin, or 'synthetic'",
    )
    p.add_argument("--ijb", default=None, metavar="DIR", help="IJB release root (loose_crop/, meta/)")
    p.add_argument("--ijb-target", choices=("IJBB", "IJBC"), default="IJBC")
    p.add_argument("--no-detector-score", action="store_true", help="IJB: don't weight features by detection score")
    p.add_argument("--cache-dir", default=None, help="IJB: keep extracted features here; a rerun resumes")
    p.add_argument(
        "--warp",
        choices=("opencv", "exact"),
        default="opencv",
        help="IJB alignment: opencv = OpenCV 3.x/4.x warpAffine, byte for byte (the published pipeline); "
        "exact = float64 bilinear, rounded (OpenCV 5.x)",
    )
    p.add_argument(
        "--tar-readout",
        choices=("corners", "full"),
        default="corners",
        help="IJB: read TAR@FAR among the ROC's corners (scikit-learn's roc_curve, as the published "
        "tables) or among all its points",
    )
    p.add_argument(
        "--save-scores",
        default=None,
        metavar="FILE",
        help="IJB: write each template pair's label and score to FILE (.npy structured array or .csv)",
    )
    p.add_argument("--batch-size", type=cli.positive_int, default=256, help="images per forward over all devices")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _workdir_config(workdir: pathlib.Path, names: list[str]):
    """The run's config (config.json), needed to resolve names and 'synthetic'."""
    import ml_collections

    path = workdir / "config.json"
    if not path.is_file():
        raise InputError(
            f"{path} is missing: --bin {' '.join(names)} is resolved with the run's config "
            "(give paths ending in .bin instead)"
        )
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run(args) -> dict:
    from pfc_jax import evaluation
    from pfc_jax.evaluation import ijb
    from pfc_jax.inference import Embedder
    from pfc_jax.progress import Progress

    if not args.bin and not args.ijb:
        raise InputError("nothing to evaluate (give --bin NAME... and/or --ijb DIR)")
    if args.save_scores and not args.ijb:
        raise InputError("--save-scores writes IJB pair scores: give --ijb DIR too")
    workdir = pathlib.Path(args.workdir)
    protocol = ijb.IJBProtocol.load(args.ijb, args.ijb_target) if args.ijb else None  # fail before loading
    if args.save_scores:
        ijb.check_scores_path(args.save_scores)
    embedder = Embedder.from_workdir(workdir, args.step, encoder=args.encoder, batch_size=args.batch_size, log=_log)
    sets = []
    if args.bin:
        # Names resolve exactly as config.eval.bins does in training; paths need no config.
        needs_config = any(evaluation.needs_config(name) for name in args.bin)
        config = _workdir_config(workdir, args.bin) if needs_config else None
        sets = evaluation.make_pair_sets(config, args.bin, image_size=embedder.image_size, log=_log)
    out = {
        "workdir": str(workdir.absolute()),
        "step": embedder.step,
        "model": embedder.spec.to_dict(),
        "bins": {},
    }
    for s in sets:
        bar = Progress(len(s.images), f"embedding {s.name}", unit="images")
        bar.update(0)  # shown before the first batch (which compiles)
        try:
            result = s.evaluate(embedder, progress=bar.update)
        finally:
            bar.close()  # ends an unfinished line, so an error starts a line of its own
        out["bins"][s.name] = {"pairs": int(len(s.issame)), **result.to_dict()}
    if protocol is not None:
        model = {"workdir": str(workdir.absolute()), "step": embedder.step, "encoder": embedder.encoder}
        features = ijb.extract_features(
            protocol,
            embedder.embed_batches,
            batch_size=embedder.batch_size,
            image_size=embedder.image_size,
            warp=args.warp,
            model=model,
            cache_dir=args.cache_dir,
        )
        scores = ijb.protocol_scores(protocol, features, detector_score=not args.no_detector_score)
        tar = ijb.tar_at_far(scores, protocol.labels, readout=args.tar_readout)
        if args.save_scores:
            ijb.save_scores(args.save_scores, protocol, scores)
        out["ijb"] = {
            "target": args.ijb_target,
            "images": len(protocol.images),
            "templates": int(len(set(protocol.templates.tolist()))),
            "pairs": int(len(protocol.pairs)),
            "warp": args.warp,
            "tar_readout": args.tar_readout,
            "tar_at_far": {f"{far:.0e}": v for far, v in tar.items()},
            **({"scores": str(pathlib.Path(args.save_scores).absolute())} if args.save_scores else {}),
        }
    return out


def format_table(out: dict) -> str:
    lines = [f"{out['workdir']} step {out['step']} ({out['model']['name']}, {out['model']['embedding_dim']}-d)"]
    if out["bins"]:
        lines.append(f"{'set':<14}{'pairs':>7}  {'accuracy (10-fold)':<20}{'threshold':>10}  {'VAL@FAR=1e-3':>12}")
        for name, r in out["bins"].items():
            acc = f"{r['accuracy'] * 100:.2f} ± {r['accuracy_std'] * 100:.2f} %"
            lines.append(f"{name:<14}{r['pairs']:>7}  {acc:<20}{r['threshold']:>10.3f}  {r['val'] * 100:>10.2f} %")
    if "ijb" in out:
        j = out["ijb"]
        fars = list(j["tar_at_far"])
        lines.append(
            f"{j['target']} 1:1 verification: {j['images']:,} images, {j['templates']:,} templates, "
            f"{j['pairs']:,} pairs"
        )
        lines.append(f"TAR @ FAR ({j['tar_readout']} of the ROC, {j['warp']} warp)")
        lines.append("FAR        " + "".join(f"{f:>9}" for f in fars))
        lines.append("TAR        " + "".join(f"{j['tar_at_far'][f] * 100:>8.2f}%" for f in fars))
    return "\n".join(lines)


def _print(args) -> None:
    out = run(args)
    print(json.dumps(out) if args.json else format_table(out))


def main(argv=None) -> None:
    cli.run(_print, _parser(), argv)


if __name__ == "__main__":
    main()
