"""The convention every ``python -m pfc_jax.<tool>`` command follows.

* Success exits 0.
* Bad input or usage — a wrong or missing flag, a missing file or workdir, a damaged
  checkpoint, a malformed config or dataset (:class:`~pfc_jax.errors.InputError`) — prints
  one line ``error: <what> (<fix>)`` on stderr and exits 2, with no traceback.
* A failure of the run itself on good input — training diverged, an export failed its
  check (:class:`~pfc_jax.errors.RunError`) — prints ``error: ...`` and exits 1.

Commands build their parser with :func:`parser`, declare the shared arguments with
:func:`add_workdir` and :func:`add_step`, and run their body through :func:`run`.
This module imports no JAX, so ``--help`` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable

from pfc_jax.errors import InputError, RunError

EXIT_FAILED = 1
EXIT_USAGE = 2

# OS errors that mean "the path you gave is wrong", not "the machine failed".
_BAD_PATH = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def fail(message: str, code: int = EXIT_USAGE):
    """Prints ``error: message`` on one line of stderr and exits with ``code``."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with pfc_jax's one-line usage errors (exit 2)."""

    def error(self, message: str):
        fail(f"{message} (see {self.prog} --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` keeps the docstring's layout and shows every option's default, also for
    an option without a help text; not for flags, a default of None or an empty list (not
    given), nor where the help text already says what the default is."""

    def _get_help_string(self, action):
        help = action.help or ""
        if _shows_default(action) and "%(default)" not in help and "(default" not in help:
            help += " (default: %(default)s)" if help else "(default: %(default)s)"
        return help

    def _format_action(self, action):
        if not action.help and _shows_default(action):
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


def _shows_default(action: argparse.Action) -> bool:
    if action.default in (None, argparse.SUPPRESS, [], ()) or action.nargs == 0:
        return False
    return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)


def parser(prog: str, doc: str | None, **kwargs) -> ArgumentParser:
    """A parser for ``python -m <prog>`` described by the first line of ``doc`` (the
    module docstring), with the rest of it as the epilog of ``--help``."""
    first, _, rest = (doc or "").strip().partition("\n")
    return ArgumentParser(
        prog=f"python -m {prog}",
        description=first,
        epilog=rest.strip("\n").rstrip() or None,  # keeps the first line's indent
        formatter_class=HelpFormatter,
        **kwargs,
    )


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_workdir(p: argparse.ArgumentParser, *, required: bool = True, help: str | None = None):
    """``--workdir``: a pfc_jax training workdir (the one the trainer wrote)."""
    return p.add_argument(
        "--workdir", required=required, help=help or "a pfc_jax training workdir (its checkpoints/ and config.json)"
    )


def add_step(p: argparse.ArgumentParser):
    """``--step``: the checkpoint step (default: the latest)."""
    return p.add_argument(
        "--step", type=non_negative_int, default=None, help="checkpoint step of --workdir (default: the latest)"
    )


def add_encoder(p: argparse.ArgumentParser):
    """``--encoder``: which backbone of the checkpoint (default: the run's eval.encoder)."""
    return p.add_argument(
        "--encoder",
        choices=("online", "ema"),
        default=None,
        help="online: the trained backbone; ema: its moving average, where the run kept one "
        "(default: the run's eval.encoder; DCQ: ema)",
    )


def require_writable(path, flag: str) -> None:
    """Raises :class:`InputError` unless a file can be written at ``path`` (given as
    ``flag``): checked before the work, not after it. Probes by creating and removing a
    temporary file in the nearest existing folder; creates nothing else."""
    import pathlib
    import tempfile

    path = pathlib.Path(path).absolute()
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory (give a file name)")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: {folder} is a file, not a folder (choose another path)")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e}) (choose another path)") from None


def guard(body: Callable[[], object]):
    """Runs ``body()``, turning pfc_jax's errors into the exit codes of the convention."""
    try:
        return body()
    except InputError as e:
        fail(str(e), EXIT_USAGE)
    except _BAD_PATH as e:
        fail(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ") + " (check the path)", EXIT_USAGE)
    except RunError as e:
        fail(str(e), EXIT_FAILED)
    except KeyboardInterrupt:
        fail("interrupted", 130)


def run(body: Callable[[argparse.Namespace], object], p: argparse.ArgumentParser, argv=None):
    """Parses ``argv`` (default: the command line) with ``p`` and runs ``body(args)``
    under :func:`guard`."""
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return guard(lambda: body(args))


def absl_flags_parser(prog: str, load_config: Callable[[], object]):
    """A ``flags_parser`` for ``absl.app.run`` with this convention: flag errors and a
    config file that does not load (missing, failing, an unknown ``--config.<field>``)
    print one ``error:`` line and exit 2. ``prog`` is the module (``pfc_jax.main``);
    ``load_config()`` reads the config flag."""

    def parse(argv):
        from absl import flags

        try:
            rest = flags.FLAGS(argv)
        except SystemExit as e:  # absl's --help prints the usage and exits 1; here help succeeds
            asked = any(a.split("=")[0] in ("-h", "-?", "--help", "--helpshort", "--helpfull") for a in argv[1:])
            sys.exit(0 if asked and e.code == 1 else e.code)
        except flags.Error as e:
            fail(f"{e} (see python -m {prog} --help)")
        except Exception as e:  # noqa: BLE001 - ml_collections raises what the config file raised
            fail(f"cannot load the config: {_describe(e)} (check --config and the --config.* flags)")
        if len(rest) > 1:
            fail(f"unexpected arguments: {' '.join(rest[1:])} (flags take the form --name=value)")
        try:
            load_config()
        except Exception as e:  # noqa: BLE001 - the config file's own error, whatever it is
            fail(f"cannot load the config: {_describe(e)} (check --config and the --config.* flags)")
        return rest

    return parse


def _describe(error: BaseException) -> str:
    """``Type: message`` of an exception, unwrapping the exception-in-an-exception and the
    quoted key of ``KeyError`` that ml_collections raises for an unknown field."""
    name = type(error).__name__
    while len(error.args) == 1 and isinstance(error.args[0], BaseException):
        error = error.args[0]
    message = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    return f"{name}: {message}"
