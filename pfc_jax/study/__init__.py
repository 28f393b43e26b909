"""Compare training methods on equal terms: ``python -m pfc_jax.study``.

An *arm* is a head with its settings (:mod:`pfc_jax.study.arms`). Every arm trains the
same backbone on the same data stream for the same steps from the same seeds, each in
its own workdir (:mod:`pfc_jax.study.runner`), and is measured the same way
(:mod:`pfc_jax.study.metrics`): held-out verification accuracy, TAR at FAR 1e-3 / 1e-4,
training images/s, the head's memory, and the *staleness* of the class weights per
class frequency. :mod:`pfc_jax.study.report` writes the summary.
"""

import importlib

# Imported on first use, so that ``python -m pfc_jax.study --help`` does not import JAX.
_WHERE = {"Arm": "arms", "parse_arms": "arms", "Options": "runner", "run_study": "runner"}

__all__ = ["Arm", "Options", "parse_arms", "run_study"]


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"pfc_jax.study.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'pfc_jax.study' has no attribute {name!r}")
