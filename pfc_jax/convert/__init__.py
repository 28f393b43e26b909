"""Bring models from other codebases into pfc_jax.

    python -m pfc_jax.convert from-arcface-torch --backbone model.pt --model iresnet50 --workdir DIR
        [--centers RUN_DIR [--num-classes C]] [--embedding-dim D] [--image-size S]

``from-arcface-torch`` (:mod:`pfc_jax.convert.arcface_torch`) reads insightface
arcface_torch's ``.pt`` / ``.pth`` files without PyTorch (:mod:`pfc_jax.convert.torch_file`)
and writes a pfc_jax workdir with a checkpoint at step 0.
"""

from __future__ import annotations

from pfc_jax import cli

# Kept here, not read from pfc_jax.convert.arcface_torch, so that --help imports no JAX.
FROM_ARCFACE_TORCH = """Writes a pfc_jax workdir with a checkpoint at step 0 from arcface_torch files.

--backbone: a torch.save of a backbone's state_dict() (backbone.pth / model.pt) or a
checkpoint_gpu_<rank>.pt; a 'module.' prefix is accepted. --centers: the folder of one run's
softmax_fc_gpu_<rank>.pt (or checkpoint_gpu_<rank>.pt, or 2021's rank_<rank>_softmax_weight.pt);
rank r of W holds C // W + (r < C % W) classes, in rank order. evaluate, export and embed read
the workdir as any run's; main on it trains from it; config.init_from starts another run from it.
"""


def _parser():
    p = cli.parser("pfc_jax.convert", __doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    one = sub.add_parser(
        "from-arcface-torch",
        help="an arcface_torch backbone (and its sharded class centers) -> a pfc_jax workdir",
        description=FROM_ARCFACE_TORCH,
        formatter_class=cli.HelpFormatter,
    )
    one.add_argument("--backbone", required=True, help="backbone.pth / model.pt (a state dict) or checkpoint_gpu_0.pt")
    one.add_argument("--model", required=True, help="our backbone name, e.g. iresnet50, mobilefacenet, vit_s")
    cli.add_workdir(one, help="the pfc_jax workdir to create (new or empty)")
    one.add_argument(
        "--centers", default=None, help="folder of the run's softmax_fc_gpu_<rank>.pt (or checkpoint_gpu_<rank>.pt)"
    )
    one.add_argument(
        "--num-classes", type=cli.positive_int, default=None, help="the run's class count (default: the centers' rows)"
    )
    one.add_argument(
        "--embedding-dim", type=cli.positive_int, default=None, help="default: the centers' width, else 512"
    )
    one.add_argument("--image-size", type=cli.positive_int, default=112)
    return p


def _run(args) -> None:
    from pfc_jax.convert import arcface_torch

    if args.num_classes is not None and args.centers is None:
        from pfc_jax.errors import InputError

        raise InputError("--num-classes is checked against --centers: give --centers too")
    converted = arcface_torch.convert(
        args.backbone,
        args.model,
        args.workdir,
        centers=args.centers,
        num_classes=args.num_classes,
        embedding_dim=args.embedding_dim,
        image_size=args.image_size,
    )
    print(converted.summary())


def main(argv=None) -> None:
    cli.run(_run, _parser(), argv)
