"""Every test runs on 8 fake CPU devices; this must happen before JAX is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import pfc_jax  # noqa: E402, F401 - adds the package's XLA options before JAX starts, as for users

jax.config.update("jax_default_matmul_precision", "highest")
