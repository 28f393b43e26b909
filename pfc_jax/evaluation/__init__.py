"""Evaluation: ``.bin`` pair verification (verification.py) and IJB-B/C (ijb.py).

:func:`make_pair_sets` resolves the names in ``config.eval.bins`` for the trainer's
evaluators and for ``python -m pfc_jax.evaluate``:

* ``synthetic``: pairs of held-out identities of the built-in synthetic world (the ones
  ``python -m pfc_jax.data.synth`` writes to ``synth_val.bin``), or of the hard benchmark
  when the run trains on ``hard_synthetic``, made in memory;
* a name such as ``lfw``: the file ``<eval.dir>/lfw.bin`` (``eval.dir`` defaults to
  ``data.path``, where insightface's datasets keep their pair files);
* a path ending in ``.bin``: that file.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np

from pfc_jax.evaluation.verification import PairFileError, PairSet, VerificationResult, decode_images

SYNTHETIC = "synthetic"


def bin_names(spec: str) -> list[str]:
    """``"lfw, cfp_fp"`` -> ``["lfw", "cfp_fp"]``."""
    return [n.strip() for n in spec.split(",") if n.strip()]


def resolve_bin(name: str, directory: str) -> pathlib.Path:
    """The ``.bin`` file a configured name refers to (not checked for existence)."""
    if not needs_config(name):
        return pathlib.Path(name)
    return pathlib.Path(directory) / f"{name}.bin"


def synthetic_pairs(config, num_pairs: int = 600, *, log: Callable[[str], object] | None = None) -> PairSet:
    """Pairs of identities the synthetic training set does not contain. For
    ``data.source = "hard_synthetic"``: its held-out pair set
    (``config.data.hard_synthetic_eval``); otherwise the same pairs ``python -m
    pfc_jax.data.synth`` writes to ``synth_val.bin`` for the default world."""
    from pfc_jax.data.synth import held_out_identities, verification_pairs

    if config.data.source == "hard_synthetic":
        from pfc_jax.data import hard_synthetic as hard

        world = hard.World.from_config(config.data.hard_synthetic)
        held = hard.HeldOut.from_config(config.data.hard_synthetic_eval)
        if log is not None:
            log(f"loading {SYNTHETIC}: {held.pairs} pairs of held-out hard_synthetic identities")
        source = hard.held_out(world, held, config.data.image_size, "pairs")
        images, issame = hard.verification_pairs(source, held.pairs)
        return PairSet(SYNTHETIC, images, issame)

    if log is not None:
        log(f"loading {SYNTHETIC}: {num_pairs} pairs")
    syn = config.data.synthetic
    held_out = held_out_identities(syn.num_identities, syn.images_per_identity, config.data.image_size, syn.seed)
    encoded, issame = verification_pairs(held_out, num_pairs, syn.seed, quality=95)
    images = decode_images(encoded, config.data.image_size, name=SYNTHETIC)
    return PairSet(SYNTHETIC, images, np.asarray(issame, bool))


def needs_config(name: str) -> bool:
    """Whether resolving ``name`` needs a run's config (a bare name or 'synthetic')."""
    return name == SYNTHETIC or not (name.endswith(".bin") or "/" in name)


class _Deferred:
    """A pair set made on first use (the synthetic one costs seconds to render, and can
    not fail to load, so a run makes it at its first evaluation rather than at start)."""

    def __init__(self, name: str, make):
        self.name, self._make, self._set = name, make, None

    def evaluate(self, embed, **kwargs) -> VerificationResult:
        self._set = self._set or self._make()
        return self._set.evaluate(embed, **kwargs)


def make_pair_sets(
    config,
    names: list[str] | None = None,
    *,
    image_size: int | None = None,
    log: Callable[[str], object] | None = None,
    defer_synthetic: bool = False,
) -> list[PairSet]:
    """Loads every pair set named in ``config.eval.bins`` (or ``names``), images resized
    to ``image_size`` (default ``config.data.image_size``). ``config`` may be None when
    every name is a path. ``log`` gets ``"loading NAME: P pairs"`` as each one starts.
    Files are read now (a bad one raises here); with ``defer_synthetic`` the synthetic
    set is made when first evaluated."""
    names = bin_names(config.eval.bins) if names is None else names
    image_size = image_size or config.data.image_size
    sets = []
    for name in names:
        if name == SYNTHETIC:
            make = lambda: synthetic_pairs(config, log=log)
            sets.append(_Deferred(SYNTHETIC, make) if defer_synthetic else make())
        else:
            directory = (config.eval.dir or config.data.path) if needs_config(name) else ""
            sets.append(PairSet.load(resolve_bin(name, directory), image_size, log=log))
    return sets


def run_pair_sets(pair_sets: list[PairSet], embedder) -> dict[str, VerificationResult]:
    """``{name: result}`` with flip-summed embeddings from ``embedder``."""
    return {s.name: s.evaluate(embedder) for s in pair_sets}


def summary_line(results: dict[str, VerificationResult]) -> str:
    return "  ".join(
        f"{name} {r.accuracy * 100:.2f}±{r.accuracy_std * 100:.2f}% (VAL@FAR1e-3 {r.val * 100:.2f}%)"
        for name, r in results.items()
    )


__all__ = [
    "PairFileError",
    "PairSet",
    "VerificationResult",
    "bin_names",
    "make_pair_sets",
    "needs_config",
    "resolve_bin",
    "run_pair_sets",
    "summary_line",
    "synthetic_pairs",
]
