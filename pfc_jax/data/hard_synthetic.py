"""A hard, long-tailed synthetic face-recognition benchmark (``data.source = "hard_synthetic"``).

The default synthetic world (:mod:`pfc_jax.data.synthetic`) is solved in a few hundred
steps, so every head looks the same on it. This one is built to tell training methods
apart, with the properties of WebFace / MS1M that matter to them:

* **a long tail**: identity ``i`` has ``n_i`` images, ``n_i = floor(min_images *
  u^(-1/tail))`` clipped to ``max_images`` (``u`` uniform): a Pareto (Zipf-like) law,
  so most identities have 2-5 images and a few have 100+;
* **look-alikes**: identities come in families of ``family_size`` that share their
  generating parameters up to a perturbation of relative size ``family_spread``
  ("doppelgangers"), and half of the verification negatives are such pairs;
* **strong nuisance**: every image sees its identity through a random similarity warp
  (rotation, scale, translation: pose-like), directional illumination (gain, offset, a
  light gradient, a tint), an occluding patch, Gaussian blur and pixel noise, each
  with its own strength or probability.

Everything is a pure function of ``(seed, identity, image)``: any example is rendered
anywhere, in any order, by any process, and nothing is stored. Held-out identities
(:func:`held_out`) come after the training ones, in whole families, so none of them and
none of their look-alikes is in the training set. :func:`verification_pairs` makes the
10-fold pair set, :func:`tar_set` the 1:1 set for TAR at FAR 1e-3 / 1e-4.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from pfc_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class World:
    """The parameters of one synthetic world (``config.data.hard_synthetic``)."""

    num_identities: int = 20_000
    min_images: int = 2
    max_images: int = 300
    tail: float = 1.1  # Pareto exponent of the images-per-identity law (smaller: longer tail)
    family_size: int = 4  # look-alike identities per family (1: none)
    family_spread: float = 0.5  # how far a family's members are from each other (0: identical)
    blobs: int = 8
    rotation: float = 15.0  # degrees, uniform in +-
    scale: float = 0.1  # relative, uniform in +-
    shift: float = 0.08  # of the image size, uniform in +-
    light: float = 0.3  # strength of gain / offset / gradient
    occlusion: float = 0.3  # probability of an occluding patch
    blur: float = 0.3  # probability of a Gaussian blur
    noise: float = 0.04  # pixel noise std (images in [0, 1])
    # Probability that an image (not an identity's first) repeats an earlier shot of its
    # identity: the same pose, light, occlusion and blur, fresh pixel noise (the near
    # duplicates of web-crawled datasets). 0: every image is a new shot.
    duplicates: float = 0.0
    seed: int = 0

    def __post_init__(self):
        problems = []
        if self.num_identities < 1:
            problems.append(f"num_identities must be >= 1, got {self.num_identities}")
        if not 1 <= self.min_images <= self.max_images:
            problems.append(f"need 1 <= min_images <= max_images, got {self.min_images} and {self.max_images}")
        if not self.tail > 0:
            problems.append(f"tail must be > 0, got {self.tail}")
        if self.family_size < 1:
            problems.append(f"family_size must be >= 1, got {self.family_size}")
        if self.blobs < 1:
            problems.append(f"blobs must be >= 1, got {self.blobs}")
        for name in ("family_spread", "rotation", "scale", "shift", "light", "noise"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("occlusion", "blur", "duplicates"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        if self.scale >= 1:
            problems.append(f"scale must be < 1, got {self.scale}")
        if problems:
            raise InputError("hard_synthetic world: " + "; ".join(problems))

    @classmethod
    def from_config(cls, group) -> World:
        return cls(**group.to_dict())

    @property
    def first_held_out(self) -> int:
        """The first identity after the training ones, at a family boundary."""
        return math.ceil(self.num_identities / self.family_size) * self.family_size


def images_per_identity(world: World, first: int, count: int) -> np.ndarray:
    """The long-tailed image counts of identities ``first .. first + count - 1``."""
    counts = np.empty(count, np.int64)
    for k in range(count):
        u = np.random.default_rng([world.seed, first + k, 0]).uniform(1e-12, 1.0)
        counts[k] = math.floor(world.min_images * u ** (-1.0 / world.tail))
    return np.clip(counts, world.min_images, world.max_images)


class HardSyntheticIdentities:
    """Random-access source over identities ``first .. first + count - 1`` of ``world``.

    Example ``i`` belongs to the identity whose image range contains it; labels are
    0-based from ``first``. ``counts`` overrides the long-tailed image counts (held-out
    sets use a fixed number per identity).
    """

    def __init__(
        self,
        world: World,
        *,
        image_size: int = 32,
        first: int = 0,
        count: int | None = None,
        images_each: int | None = None,
    ):
        if image_size < 8:
            raise InputError(f"hard_synthetic image_size must be >= 8, got {image_size}")
        count = world.num_identities if count is None else count
        if count < 1:
            raise InputError(f"hard_synthetic needs >= 1 identity, got {count}")
        self.world, self.image_size, self.first = world, image_size, first
        self.num_identities = count
        if images_each is None:
            self.counts = images_per_identity(world, first, count)
        else:
            self.counts = np.full(count, images_each, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)])
        pad = int(math.ceil(image_size * (world.shift + 0.3)))  # room for the warp
        self._canvas = image_size + 2 * pad
        self._pad = pad
        self._grid = np.arange(self._canvas, dtype=np.float32)
        self._out = np.arange(image_size, dtype=np.float32) - (image_size - 1) / 2.0

    @property
    def num_classes(self) -> int:
        return self.num_identities

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return (
            f"HardSyntheticIdentities({self.num_identities:,} identities from {self.first}, {len(self):,} images, "
            f"image_size={self.image_size}, seed={self.world.seed})"
        )

    def labels(self) -> np.ndarray:
        return np.repeat(np.arange(self.num_identities, dtype=np.int32), self.counts)

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"hard_synthetic example {index} out of range [0, {len(self)})")
        identity = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return {"image": self.render(identity, index - int(self.offsets[identity])), "label": identity}

    # ---- rendering ----------------------------------------------------------------------

    def _blob_parameters(self, identity: int):
        """Blob centers, sizes, colors and the background of an identity: its family's,
        perturbed by ``family_spread``."""
        w = self.world
        absolute = self.first + identity
        family = np.random.default_rng([w.seed, absolute // w.family_size, 1])
        k = w.blobs
        centers = family.uniform(0.2, 0.8, (k, 2))
        log_sigmas = np.log(family.uniform(0.06, 0.16, (k, 1)))
        colors = family.uniform(-0.6, 0.6, (k, 3))
        base = family.uniform(0.3, 0.7, 3)
        if w.family_size > 1 and w.family_spread > 0:
            own = np.random.default_rng([w.seed, absolute, 2])
            s = w.family_spread
            centers = centers + own.normal(0.0, 0.12 * s, centers.shape)
            log_sigmas = log_sigmas + own.normal(0.0, 0.3 * s, log_sigmas.shape)
            colors = colors + own.normal(0.0, 0.5 * s, colors.shape)
            base = base + own.normal(0.0, 0.1 * s, 3)
        return centers, np.exp(log_sigmas), colors, base

    def template(self, identity: int) -> np.ndarray:
        """The identity's canonical face, float32 [canvas, canvas, 3] in [0, 1]."""
        centers, sigmas, colors, base = self._blob_parameters(identity)
        size = self._canvas
        face = self.image_size  # blob positions and sizes are relative to the face, centered
        c = (centers - 0.5) * face + size / 2.0
        sig = sigmas * face
        gy = np.exp(-0.5 * ((self._grid[None, :] - c[:, :1]) / sig) ** 2).astype(np.float32)
        gx = np.exp(-0.5 * ((self._grid[None, :] - c[:, 1:]) / sig) ** 2).astype(np.float32)
        picture = np.einsum("kh,kw,kc->hwc", gy, gx, colors.astype(np.float32), optimize=True)
        return np.clip(picture + base.astype(np.float32), 0.0, 1.0)

    def render(self, identity: int, image: int) -> np.ndarray:
        """Image ``image`` of ``identity``: uint8 [S, S, 3]."""
        if not 0 <= identity < self.num_identities:
            raise IndexError(f"identity {identity} out of range [0, {self.num_identities})")
        w = self.world
        rng = np.random.default_rng([w.seed, self.first + identity, 3 + image])
        x = self._shot(identity, image, rng)
        if w.duplicates:  # the noise of a repeated shot is its own
            rng = np.random.default_rng([w.seed, self.first + identity, 3 + image, 1])
        x = x + rng.normal(0.0, w.noise, x.shape).astype(np.float32)
        return (np.clip(x, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def shot_of(self, identity: int, image: int) -> int:
        """The image whose shot ``image`` repeats (itself when it is a new shot)."""
        w = self.world
        while image > 0 and w.duplicates:
            pick = np.random.default_rng([w.seed, self.first + identity, 3 + image, 2])
            if pick.uniform() >= w.duplicates:
                break
            image = int(pick.integers(image))
        return image

    def _shot(self, identity: int, image: int, rng) -> np.ndarray:
        """The noiseless image: pose, light, occlusion, blur (of the shot it repeats)."""
        w, s = self.world, self.image_size
        original = self.shot_of(identity, image)
        if original != image:
            rng = np.random.default_rng([w.seed, self.first + identity, 3 + original])
        x = self._warp(self.template(identity), rng)
        x = self._light(x, rng)
        if rng.uniform() < w.occlusion:
            x = self._occlude(x, rng)
        if rng.uniform() < w.blur:
            x = _gaussian_blur(x, rng.uniform(0.5, 1.2) * s / 32.0)
        return x

    def _warp(self, template: np.ndarray, rng) -> np.ndarray:
        """A random similarity transform (pose-like), bilinear sampling."""
        w, s = self.world, self.image_size
        angle = np.deg2rad(rng.uniform(-w.rotation, w.rotation))
        scale = 1.0 + rng.uniform(-w.scale, w.scale)
        ty, tx = rng.uniform(-w.shift, w.shift, 2) * s
        cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
        yy, xx = np.meshgrid(self._out, self._out, indexing="ij")
        centre = (self._canvas - 1) / 2.0
        src_y = cos * yy - sin * xx + centre + ty
        src_x = sin * yy + cos * xx + centre + tx
        y0 = np.clip(np.floor(src_y).astype(np.int64), 0, self._canvas - 2)
        x0 = np.clip(np.floor(src_x).astype(np.int64), 0, self._canvas - 2)
        fy = np.clip(src_y - y0, 0.0, 1.0)[..., None].astype(np.float32)
        fx = np.clip(src_x - x0, 0.0, 1.0)[..., None].astype(np.float32)
        top = template[y0, x0] * (1 - fx) + template[y0, x0 + 1] * fx
        bottom = template[y0 + 1, x0] * (1 - fx) + template[y0 + 1, x0 + 1] * fx
        return top * (1 - fy) + bottom * fy

    def _light(self, x: np.ndarray, rng) -> np.ndarray:
        """Gain, offset, a directional gradient (side light) and a tint."""
        a, s = self.world.light, self.image_size
        gain = 1.0 + rng.uniform(-a, a)
        offset = rng.uniform(-a, a) / 3.0
        direction = rng.uniform(0.0, 2 * math.pi)
        ramp = (math.cos(direction) * self._out[:, None] + math.sin(direction) * self._out[None, :]) / s
        tint = rng.uniform(1 - a / 4, 1 + a / 4, 3).astype(np.float32)
        return x * (gain * tint) + offset + (a * rng.uniform(0.0, 1.0) * ramp)[..., None].astype(np.float32)

    def _occlude(self, x: np.ndarray, rng) -> np.ndarray:
        """A flat patch of 15-40 % of the side at a random place (glasses, a hand, a mask)."""
        s = self.image_size
        h, w = (rng.uniform(0.15, 0.4, 2) * s).astype(int) + 1
        y, x0 = rng.integers(0, s - h + 1), rng.integers(0, s - w + 1)
        x = x.copy()
        x[y : y + h, x0 : x0 + w] = rng.uniform(0.0, 1.0, 3).astype(np.float32)
        return x


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    radius = max(1, int(math.ceil(2 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (t / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(x, ((radius, radius), (0, 0), (0, 0)), mode="edge")
    x = sum(kernel[i] * padded[i : i + x.shape[0]] for i in range(len(kernel)))
    padded = np.pad(x, ((0, 0), (radius, radius), (0, 0)), mode="edge")
    return sum(kernel[i] * padded[:, i : i + x.shape[1]] for i in range(len(kernel)))


# ---- held-out evaluation sets ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HeldOut:
    """How the held-out sets are drawn (``config.data.hard_synthetic_eval``)."""

    pairs: int = 6000  # 10-fold verification pairs, half positive
    pair_identities: int = 2000
    tar_identities: int = 300  # the 1:1 set: every pair of its images is compared
    images_each: int = 8  # images per held-out identity

    def __post_init__(self):
        problems = []
        if self.pairs < 10:
            problems.append(f"pairs must be >= 10 (10 folds), got {self.pairs}")
        for name in ("pair_identities", "tar_identities"):
            if getattr(self, name) < 2:
                problems.append(f"{name} must be >= 2, got {getattr(self, name)}")
        if self.images_each < 2:
            problems.append(f"images_each must be >= 2 (positive pairs), got {self.images_each}")
        if problems:
            raise InputError("hard_synthetic held-out sets: " + "; ".join(problems))

    @classmethod
    def from_config(cls, group) -> HeldOut:
        return cls(**group.to_dict())


def held_out(world: World, held: HeldOut, image_size: int, which: str) -> HardSyntheticIdentities:
    """The held-out identities of the pair set (``which="pairs"``) or of the 1:1 set
    (``"tar"``): whole families after the training identities, the two sets disjoint."""
    first = world.first_held_out
    if which == "pairs":
        count = held.pair_identities
    elif which == "tar":
        pair_families = math.ceil(held.pair_identities / world.family_size)
        first += pair_families * world.family_size
        count = held.tar_identities
    else:
        raise ValueError(f"which must be 'pairs' or 'tar', got {which!r}")
    return HardSyntheticIdentities(world, image_size=image_size, first=first, count=count, images_each=held.images_each)


def verification_pairs(source: HardSyntheticIdentities, num_pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [2P, S, S, 3], issame bool[P])``: alternating positive / negative
    pairs; every other negative is a look-alike pair (same family) when families exist."""
    n, k, family = source.num_identities, int(source.counts[0]), source.world.family_size
    if n < 2 or k < 2:
        raise InputError("verification pairs need >= 2 held-out identities with >= 2 images each")
    rng = np.random.default_rng([source.world.seed, source.first, 7])
    images, issame = [], []
    for p in range(num_pairs):
        if p % 2 == 0:
            identity = int(rng.integers(n))
            i, j = rng.choice(k, 2, replace=False)
            pair = (identity, int(i)), (identity, int(j))
        else:
            a = int(rng.integers(n))
            if family > 1 and p % 4 == 3:
                start = a - a % family
                others = [b for b in range(start, min(start + family, n)) if b != a]
                b = int(rng.choice(others)) if others else int((a + 1) % n)
            else:
                b = int(rng.integers(n - 1))
                b += b >= a
            pair = (a, int(rng.integers(k))), (b, int(rng.integers(k)))
        images += [source.render(*pair[0]), source.render(*pair[1])]
        issame.append(p % 2 == 0)
    return np.stack(images), np.asarray(issame, bool)


def tar_set(source: HardSyntheticIdentities) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, S, S, 3], labels i32[N])``: every image of every identity."""
    labels = source.labels()
    return np.stack([source[i]["image"] for i in range(len(source))]), labels
