"""pfc_jax: Partial FC face-recognition training in JAX.

The package root imports nothing heavy, so that entry points (``pfc_jax.bench``,
``pfc_jax.main``) can configure JAX (device counts, platforms) before it initializes.
"""

__version__ = "0.1.0"

from pfc_jax import xla_defaults as _xla_defaults

_xla_defaults.apply()  # before JAX creates a backend: XLA reads XLA_FLAGS then
