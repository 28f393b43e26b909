"""Compare training methods on equal terms: ``python -m pfc_jax.study``.

An *arm* is a head with its settings (:mod:`pfc_jax.study.arms`). Every arm trains the
same backbone on the same data stream for the same steps from the same seeds, each in
its own workdir (:mod:`pfc_jax.study.runner`), and is measured the same way
(:mod:`pfc_jax.study.metrics`): held-out verification accuracy, TAR at FAR 1e-3 / 1e-4,
training images/s, the head's memory, and the *staleness* of the class weights per
class frequency. :mod:`pfc_jax.study.report` writes the summary.
"""

from pfc_jax.study.arms import Arm, parse_arms
from pfc_jax.study.runner import Options, run_study

__all__ = ["Arm", "Options", "parse_arms", "run_study"]
