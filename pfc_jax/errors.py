"""The two kinds of error every pfc_jax command reports (see :mod:`pfc_jax.cli`).

* :class:`InputError`: bad input or usage — a missing or damaged file, a malformed
  config, a wrong flag. The message says what is wrong and how to fix it; commands exit
  with status 2.
* :class:`RunError`: the run itself failed on good input — training diverged, an export
  failed its check. Commands exit with status 1.

Each module raises its own subclass (``ConfigError``, ``CheckpointError``, ...), so code
can catch precisely, and every command reports them the same way. This module imports
nothing, so a command can name these before it imports JAX.
"""


class InputError(ValueError):
    """Bad input or usage; the message names the problem and the fix."""


class RunError(RuntimeError):
    """The run failed on valid input; the message says what happened and what to try."""
