"""Procedural synthetic identities: a face-recognition dataset that needs no download.

Each identity is a fixed random picture: a background gradient plus colored Gaussian
blobs of random position, size and color. Each image of an identity sees it under
nuisance variation a model must become invariant to: a translation of up to
``max_shift`` pixels, a global gain and offset (lighting), a per-channel tint and
Gaussian pixel noise. Everything is a pure function of ``(seed, identity, image)``, so
any example can be regenerated anywhere, in any order, by any process.

Identities can be offset (``first_identity``) to draw held-out identities that never
appear in training, e.g. for verification pairs. Examples are ``{"image", "label"}``
dicts like every source in :mod:`pfc_jax.data.sources`.
"""

from __future__ import annotations

import numpy as np

from pfc_jax.errors import InputError


class SyntheticIdentities:
    """Random-access source of ``num_identities * images_per_identity`` images.

    Example ``i`` is image ``i % images_per_identity`` of identity
    ``i // images_per_identity``; its label is that identity (0-based).
    """

    def __init__(
        self,
        num_identities: int,
        images_per_identity: int,
        *,
        image_size: int = 112,
        seed: int = 0,
        first_identity: int = 0,
        num_blobs: int = 8,
        max_shift: int = 6,
        noise: float = 0.03,
    ):
        if num_identities < 1 or images_per_identity < 1:
            raise InputError(
                f"synthetic source needs >= 1 identity and >= 1 image per identity, got "
                f"{num_identities} and {images_per_identity}"
            )
        if image_size < 8:
            raise InputError(f"synthetic image_size must be >= 8, got {image_size}")
        self.num_identities = num_identities
        self.images_per_identity = images_per_identity
        self.image_size = image_size
        self.seed = seed
        self.first_identity = first_identity
        self.num_blobs = num_blobs
        self.max_shift = max_shift
        self.noise = noise
        self._grid = np.arange(image_size + 2 * max_shift, dtype=np.float32)

    @property
    def num_classes(self) -> int:
        return self.num_identities

    def __len__(self) -> int:
        return self.num_identities * self.images_per_identity

    def __getitem__(self, index: int) -> dict:
        """``{"image": uint8 [S, S, 3], "label": identity}``."""
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"synthetic example {index} out of range [0, {len(self)})")
        identity, image = divmod(index, self.images_per_identity)
        return {"image": self.render(identity, image), "label": identity}

    def __repr__(self) -> str:
        return (
            f"SyntheticIdentities({self.num_identities}, {self.images_per_identity}, "
            f"image_size={self.image_size}, seed={self.seed}, first_identity={self.first_identity})"
        )

    def labels(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_identities, dtype=np.int32), self.images_per_identity)

    def template(self, identity: int) -> np.ndarray:
        """The identity's canonical picture, float32 [S + 2*shift, S + 2*shift, 3] in [0, 1]."""
        rng = np.random.default_rng([self.seed, self.first_identity + identity, 0])
        size = self._grid.size
        k = self.num_blobs
        centers = rng.uniform(0.15, 0.85, (k, 2)) * size
        sigmas = rng.uniform(0.06, 0.16, (k, 1)) * size
        amplitudes = rng.uniform(-0.6, 0.6, (k, 3)).astype(np.float32)
        gy = np.exp(-0.5 * ((self._grid[None, :] - centers[:, :1]) / sigmas) ** 2).astype(np.float32)
        gx = np.exp(-0.5 * ((self._grid[None, :] - centers[:, 1:]) / sigmas) ** 2).astype(np.float32)
        picture = np.einsum("kh,kw,kc->hwc", gy, gx, amplitudes, optimize=True)
        base = rng.uniform(0.3, 0.7, 3).astype(np.float32)
        slope = rng.uniform(-0.2, 0.2, 2).astype(np.float32) / size
        ramp = slope[0] * self._grid[:, None] + slope[1] * self._grid[None, :]
        return np.clip(picture + base + ramp[..., None], 0.0, 1.0)

    def render(self, identity: int, image: int) -> np.ndarray:
        """Image ``image`` of ``identity``: uint8 [S, S, 3]."""
        if not 0 <= identity < self.num_identities:
            raise IndexError(f"identity {identity} out of range [0, {self.num_identities})")
        rng = np.random.default_rng([self.seed, self.first_identity + identity, 1 + image])
        s, m = self.image_size, self.max_shift
        dy, dx = rng.integers(0, 2 * m + 1, 2)
        x = self.template(identity)[dy : dy + s, dx : dx + s]
        gain = rng.uniform(0.75, 1.25)
        offset = rng.uniform(-0.1, 0.1)
        tint = rng.uniform(0.95, 1.05, 3).astype(np.float32)
        x = x * (gain * tint) + offset
        x = x + rng.normal(0.0, self.noise, x.shape).astype(np.float32)
        return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
