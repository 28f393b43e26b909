"""Checks of pfc_jax's command-line convention (see pfc_jax/cli.py)."""

import contextlib
import re

import pytest


@contextlib.contextmanager
def exits_with(capsys, pattern: str, code: int = 2):
    """The block exits with ``code`` and one ``error:`` line matching ``pattern`` on
    stderr, no traceback (for a CLI's ``main(argv)`` called in-process)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        yield
    err = capsys.readouterr().err
    assert info.value.code == code, err
    lines = err.splitlines()  # a progress line may come first
    assert "Traceback" not in err and lines and lines[-1].startswith("error: ") and err.count("error: ") == 1, err
    assert re.search(pattern, err), err
