"""XLA options the package sets for itself, before JAX creates its backends.

XLA's CPU backend routes convolutions through its YNNPACK fusion path by default. For the
convolutions of face backbones that path is slow: on a 2-core CPU its weight gradients
run at ~10 GFLOP/s on about one core (iResNet-18's first-stage weight gradient 2.59 s vs
0.30 s on XLA's other convolution path), and the backbone step takes 2.5x as long as it
needs to. ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` keeps
convolutions off that path; results are the same up to floating-point rounding.

The option is experimental: a jaxlib that does not know it aborts at start-up on an unknown
flag. So each option is tried once in a child process per installed jaxlib, and the answer
is kept in ``$XDG_CACHE_HOME/pfc_jax/xla_options.json`` (default ``~/.cache``). An option
the user already gives in ``XLA_FLAGS`` (with any value) is left as given.
``PFC_JAX_XLA_DEFAULTS=0`` turns all of this off.

:func:`apply` runs when :mod:`pfc_jax` is imported. XLA reads ``XLA_FLAGS`` when JAX
creates its first backend, so importing JAX earlier is fine, but a program that has already
run a JAX computation before importing pfc_jax keeps the options it started with.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

# (option, value, why): options XLA reads from XLA_FLAGS.
OPTIONS = (
    (
        "--xla_cpu_experimental_ynn_fusion_type",
        "-individual_convolution",
        "CPU convolutions on XLA's faster path for face backbones (2.5x backbone step)",
    ),
)
_PROBE = "import jax; jax.devices('cpu')"


def _given(flags: str, option: str) -> bool:
    return any(token == option or token.startswith(option + "=") for token in flags.split())


def _cache_file() -> pathlib.Path:
    root = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(root) / "pfc_jax" / "xla_options.json"


def _jaxlib_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None


def accepted(flag: str) -> bool:
    """Whether the installed jaxlib starts with ``flag`` in ``XLA_FLAGS`` (cached per jaxlib)."""
    version = _jaxlib_version()
    if version is None:
        return False
    key = f"jaxlib {version}: {flag}"
    path = _cache_file()
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), bool):
        return known[key]
    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu", "PFC_JAX_XLA_DEFAULTS": "0"}
    try:
        ok = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False  # not known either way: leave the option out, try again next time
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**(known if isinstance(known, dict) else {}), key: ok}, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache: probe again in the next process
    return ok


def apply(environ=None) -> list[str]:
    """Adds the :data:`OPTIONS` that the user has not given and jaxlib accepts to
    ``XLA_FLAGS``; returns the flags added."""
    environ = os.environ if environ is None else environ
    if environ.get("PFC_JAX_XLA_DEFAULTS", "1").strip().lower() in ("0", "false", "no", "off"):
        return []
    flags = environ.get("XLA_FLAGS", "")
    added = [f"{o}={v}" for o, v, _ in OPTIONS if not _given(flags, o) and accepted(f"{o}={v}")]
    if added:
        environ["XLA_FLAGS"] = " ".join([flags.strip(), *added]).strip()
    return added


def in_effect(environ=None) -> list[str]:
    """The ``XLA_FLAGS`` entries for the :data:`OPTIONS` (set by :func:`apply` or the user)."""
    flags = (os.environ if environ is None else environ).get("XLA_FLAGS", "")
    return [t for t in flags.split() if any(t == o or t.startswith(o + "=") for o, _, _ in OPTIONS)]
