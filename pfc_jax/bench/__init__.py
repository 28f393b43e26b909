"""Throughput and memory benchmarks.

    python -m pfc_jax.bench head --classes 1000000 --batch 256 --dim 512 --rate 0.1
    python -m pfc_jax.bench train --config configs/synthetic.py
    python -m pfc_jax.bench conv --depth 18 --batch 32
    python -m pfc_jax.bench data --source rec:/data/ms1m-retinaface-t1 --workers 4
    python -m pfc_jax.bench flops --backbone vit_s
    python -m pfc_jax.bench prune --images 1000000

``head`` (:mod:`pfc_jax.bench.head`) times one whole Partial FC head step; ``train``
(:mod:`pfc_jax.bench.train`) the trainer's own step built from a recipe, and the
backbone's part of it alone; ``conv`` (:mod:`pfc_jax.bench.conv`) each convolution of an
iResNet alone, forward and both gradients; ``data`` (:mod:`pfc_jax.bench.data`) the input pipeline;
``flops`` (:mod:`pfc_jax.bench.flops`) parameters and multiply-adds of backbones;
``prune`` (:mod:`pfc_jax.bench.prune`) Face-NMS's suppression on synthetic embeddings.
Each prints a table, or one JSON object with ``--json``.
"""

from __future__ import annotations

import sys

from pfc_jax import cli


def _modules():
    """name -> its module: ``add_arguments(parser)``, ``run(args) -> Report``, and a
    docstring whose first line is the sub-command's help."""
    from pfc_jax.bench import conv, data, flops, head, prune, train

    return {"head": head, "train": train, "conv": conv, "data": data, "flops": flops, "prune": prune}


def _parser():
    modules = _modules()
    p = cli.parser("pfc_jax.bench", __doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=cli.ArgumentParser)
    for name, module in modules.items():
        doc = module.__doc__
        one = sub.add_parser(name, help=doc.strip().splitlines()[0], description=doc, formatter_class=cli.HelpFormatter)
        module.add_arguments(one)
        one.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return p


def _run(args) -> None:
    report = _modules()[args.command].run(args)
    print(report.to_json() if args.json else report.table())


def main(argv=None) -> None:
    cli.run(_run, _parser(), sys.argv[1:] if argv is None else argv)
