"""How Partial FC stores its centers and their optimizer rows: float32, or bfloat16.

bfloat16 halves the head's memory (the state is most of a device's memory at scale); the
arithmetic stays float32: every row read is widened, and every row written is rounded
back (:func:`narrow`). A bfloat16 array is kept in the state as its bits, ``uint16``:
XLA's CPU backend gathers from and scatters into a bfloat16 array only after converting
all of it to float32 (a full copy of the centers each step, measured: 4 GiB and 55 s for
1M x 512 centers), and a bitcast of the whole array is not free there either, while
``uint16`` rows move as they are. A block of rows is bitcast, never the whole array.

Rounding to bfloat16 is to nearest, or stochastic: rounded up with probability equal to
the fraction of a bfloat16 step the value lies above the one below, so the rounding error
is zero in expectation and updates smaller than half a step still move a stored value
(to nearest, a center of norm ~1 ignores every update below ~0.4 % of its size).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# config.head.storage_dtype -> the dtype of the arrays in the state.
STORED = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(np.uint16)}
ROUNDINGS = ("nearest", "stochastic")


def stored_dtype(name: str) -> np.dtype:
    """The state's array dtype for storage ``name`` (a key of :data:`STORED`)."""
    return STORED[name]


def widen(a: jax.Array) -> jax.Array:
    """Stored rows as float32 (exact)."""
    if a.dtype == np.uint16:
        a = jax.lax.bitcast_convert_type(a, jnp.bfloat16)
    return a.astype(jnp.float32)


def narrow(x: jax.Array, stored: np.dtype, rounding: str = "nearest", key: jax.Array | None = None) -> jax.Array:
    """float32 ``x`` in the stored form ``stored`` (float32, or uint16 bfloat16 bits),
    rounded to nearest (half to even) or stochastically (``key`` then required)."""
    x = x.astype(jnp.float32)
    if np.dtype(stored) == np.float32:
        return x
    if rounding == "stochastic":
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
        noise = _noise_bits(key, x.shape) >> 16
        # Adding up to one bfloat16 step's worth of low bits, then truncating, rounds the
        # magnitude up with the right probability (sign-magnitude: the same for negatives).
        # Non-finite values keep their bits (noise could turn an inf into a nan).
        rounded = jnp.where(jnp.isfinite(x), (bits + noise) >> 16, bits >> 16)
        return rounded.astype(jnp.uint16)
    return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)


def _noise_bits(key: jax.Array, shape) -> jax.Array:
    """uint32 noise, one per element: murmur3's 32-bit finalizer over the element's index,
    seeded with the key's data. Rounding needs bits that are uniform and independent of the
    values, not cryptographic ones; ``jax.random.bits`` (threefry) took longer than the
    rest of a bfloat16 step on a 2-core CPU."""
    seed = jax.random.key_data(key).reshape(-1)
    size = int(np.prod(shape))
    h = jax.lax.iota(jnp.uint32, size).reshape(shape) * jnp.uint32(0x9E3779B9) + seed[0]
    h = h ^ seed[-1]
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def convert(a: jax.Array, stored: np.dtype) -> jax.Array:
    """A stored array in another stored form (a checkpoint restored with another storage
    dtype): exact from bfloat16 to float32, to nearest the other way."""
    return a if a.dtype == np.dtype(stored) else narrow(widen(a), stored)


def to_host(a: np.ndarray, stored: np.dtype) -> np.ndarray:
    """Host (numpy) float values in the stored form, rounded to nearest."""
    if np.dtype(stored) == np.float32:
        return np.asarray(a, np.float32)
    return np.asarray(a, np.float32).astype(jnp.bfloat16).view(np.uint16)
