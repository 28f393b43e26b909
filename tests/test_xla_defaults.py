"""The XLA options the package sets for itself: only where jaxlib takes them, never over
the user's own choice, and off on request."""

import os
import subprocess
import sys

from pfc_jax import xla_defaults

OPTION, VALUE, _ = xla_defaults.OPTIONS[0]


def test_a_users_own_value_for_an_option_is_left_as_given():
    environ = {"XLA_FLAGS": f"--xla_force_host_platform_device_count=2 {OPTION}=dot"}
    assert xla_defaults.apply(environ) == []
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {OPTION}=dot"
    assert xla_defaults.in_effect(environ) == [f"{OPTION}=dot"]


def test_turned_off_it_touches_nothing(monkeypatch):
    def no_probe(flag):
        raise AssertionError("probed although turned off")

    monkeypatch.setattr(xla_defaults, "accepted", no_probe)
    for off in ("0", "false", "OFF"):
        environ = {"PFC_JAX_XLA_DEFAULTS": off}
        assert xla_defaults.apply(environ) == [] and "XLA_FLAGS" not in environ


def test_options_are_appended_to_the_users_flags(monkeypatch):
    monkeypatch.setattr(xla_defaults, "accepted", lambda flag: True)
    environ = {"XLA_FLAGS": " --xla_force_host_platform_device_count=2 "}
    assert xla_defaults.apply(environ) == [f"{OPTION}={VALUE}"]
    assert environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {OPTION}={VALUE}"
    monkeypatch.setattr(xla_defaults, "accepted", lambda flag: False)  # a jaxlib that lacks it
    environ = {}
    assert xla_defaults.apply(environ) == [] and "XLA_FLAGS" not in environ


def test_an_unknown_flag_is_refused_once_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    bogus = "--xla_pfc_jax_no_such_option=1"
    assert xla_defaults.accepted(bogus) is False  # jaxlib aborts on it: probed in a child
    assert list((tmp_path / "pfc_jax").iterdir()) == [tmp_path / "pfc_jax" / "xla_options.json"]

    def no_probe(*args, **kwargs):
        raise AssertionError("probed again")

    monkeypatch.setattr(subprocess, "run", no_probe)
    assert xla_defaults.accepted(bogus) is False


def test_importing_the_package_sets_what_jaxlib_accepts_and_jax_starts_with_it():
    env = {k: v for k, v in os.environ.items() if k != "PFC_JAX_XLA_DEFAULTS"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=3"
    script = "import os, pfc_jax, jax; print(len(jax.devices('cpu'))); print(os.environ['XLA_FLAGS'])"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    devices, flags = out.stdout.splitlines()
    assert devices == "3"
    expected = "--xla_force_host_platform_device_count=3"
    if xla_defaults.accepted(f"{OPTION}={VALUE}"):
        expected += f" {OPTION}={VALUE}"
    assert flags == expected
