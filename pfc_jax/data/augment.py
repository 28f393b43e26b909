"""Decoding and augmentation of aligned faces (uint8 HWC RGB, numpy + Pillow).

Everything takes an explicit ``numpy.random.Generator``, so the pipeline seeds it from
the example's position and an augmented batch is reproducible anywhere.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageFilter

from pfc_jax.data.sources import SourceError


def decode(example: dict, image_size: int) -> np.ndarray:
    """uint8 [S, S, 3] RGB from a source example (raw ``image`` or ``encoded`` bytes)."""
    if "image" in example:
        image = np.asarray(example["image"], np.uint8)
    else:
        try:
            with Image.open(io.BytesIO(example["encoded"])) as im:
                image = np.asarray(im.convert("RGB"))
        except Exception as e:  # noqa: BLE001 - PIL raises many kinds
            raise SourceError(f"cannot decode image with label {example.get('label')}: {e}") from None
    if image.shape != (image_size, image_size, 3):
        raise SourceError(
            f"image of shape {image.shape}, expected ({image_size}, {image_size}, 3): the dataset "
            "is not aligned to config.data.image_size (insightface datasets are 112x112)"
        )
    return image


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random photometric/geometric changes, each applied with its probability.

    Attributes:
      flip: probability of a horizontal flip (0.5 is the field's default).
      blur: probability of a Gaussian blur (radius 0.5-2 px).
      downup: probability of shrinking to 25-75% and resizing back (low resolution).
      color_jitter: probability of random brightness, contrast and saturation (+-20%).
      grayscale: probability of dropping color.
    """

    flip: float = 0.5
    blur: float = 0.0
    downup: float = 0.0
    color_jitter: float = 0.0
    grayscale: float = 0.0

    def __post_init__(self):
        for name, p in dataclasses.asdict(self).items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"augmentation probability {name}={p} is outside [0, 1]")

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(5)  # one draw per augmentation, always, so streams stay aligned
        if u[1] < self.blur or u[2] < self.downup:
            pil = Image.fromarray(image)
            if u[1] < self.blur:
                pil = pil.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.5, 2.0))))
            if u[2] < self.downup:
                size = pil.size[0]
                small = max(4, int(size * rng.uniform(0.25, 0.75)))
                pil = pil.resize((small, small), Image.BILINEAR).resize((size, size), Image.BILINEAR)
            image = np.asarray(pil)
        if u[3] < self.color_jitter:
            x = image.astype(np.float32)
            brightness, contrast, saturation = rng.uniform(0.8, 1.2, 3)
            gray = x @ np.float32([0.299, 0.587, 0.114])
            x = x * brightness
            x = (x - gray.mean() * brightness) * contrast + gray.mean() * brightness
            g = (x @ np.float32([0.299, 0.587, 0.114]))[..., None]
            x = g + (x - g) * saturation
            image = np.clip(x + 0.5, 0, 255).astype(np.uint8)
        if u[4] < self.grayscale:
            g = (image.astype(np.float32) @ np.float32([0.299, 0.587, 0.114]) + 0.5).astype(np.uint8)
            image = np.repeat(g[..., None], 3, axis=-1)
        if u[0] < self.flip:
            image = image[:, ::-1]
        return np.ascontiguousarray(image)
