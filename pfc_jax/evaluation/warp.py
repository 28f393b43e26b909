"""Bilinear affine warp of uint8 images, as OpenCV's ``warpAffine`` computes it.

The field's alignment (insightface's ``norm_crop``) is ``cv2.warpAffine(img, M, (S, S),
borderValue=0)``: bilinear interpolation, a constant zero border, pixel centers at integer
coordinates. Two implementations of that call exist, and published IJB-B/C tables were
made with the first:

* ``"opencv"`` (OpenCV 3.x and 4.x; checked byte for byte against opencv-python 4.10,
  4.11, 4.13 and 4.14): fixed point. The source coordinate of each output pixel is
  rounded to 1/32 pixel (``INTER_BITS = 5``), the four weights are integers summing to
  2**15, and the weighted sum is rounded, not truncated.
* ``"exact"`` (what OpenCV 5.x computes: against opencv-python 5.1, one grey level apart
  on fewer than 2 pixels in 100,000): the float64 bilinear value at the exact source
  coordinate, rounded half to even.

Either way a neighbour outside the image counts as 0 and is blended with the ones
inside ("constant border"), so the edge of a face frame that runs past the image fades
to black over one pixel instead of repeating the edge.
"""

from __future__ import annotations

import numpy as np

WARPS = ("opencv", "exact")
_INTER_BITS = 5  # source coordinates in 1/32 pixel
_AB_BITS = 10  # the fixed-point scale of the per-row / per-column coordinate terms
_COEF_BITS = 15  # bilinear weights sum to 2**15


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a 2x3 affine map, computed in the order OpenCV's warpAffine does."""
    (a, b, c), (d, e, f) = np.asarray(matrix, np.float64)
    det = a * e - b * d
    det = 1.0 / det if det != 0 else 0.0
    a2, b2, d2, e2 = e * det, -b * det, -d * det, a * det
    return np.array([[a2, b2, -a2 * c - b2 * f], [d2, e2, -d2 * c - e2 * f]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int | tuple[int, int], method: str = "opencv"):
    """uint8 [h, w(, C)]: ``image`` (uint8 [H, W(, C)]) sampled at ``inverse(matrix)`` of each
    output pixel; ``matrix`` (2x3) maps input to output coordinates; ``size`` is ``S`` or
    ``(w, h)`` as in OpenCV."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"warp_affine takes a uint8 [H, W] or [H, W, C] image, got {image.dtype} {image.shape}")
    if method not in WARPS:
        raise ValueError(f"warp must be one of {WARPS}, got {method!r}")
    w_out, h_out = (size, size) if np.isscalar(size) else size
    inverse = invert_affine(matrix)
    if method == "opencv":
        x0, y0, weights = _fixed_point_coordinates(inverse, w_out, h_out)
        acc = sum(_channels(w, image) * v for w, v in zip(weights, _neighbours(image, x0, y0)))
        out = (acc + (1 << (_COEF_BITS - 1))) >> _COEF_BITS
    else:
        xs, ys = np.meshgrid(np.arange(w_out, dtype=np.float64), np.arange(h_out, dtype=np.float64))
        sx = inverse[0, 0] * xs + inverse[0, 1] * ys + inverse[0, 2]
        sy = inverse[1, 0] * xs + inverse[1, 1] * ys + inverse[1, 2]
        x0, y0 = np.floor(sx), np.floor(sy)
        fx, fy = _channels(sx - x0, image), _channels(sy - y0, image)
        v00, v10, v01, v11 = _neighbours(image, _clip_index(x0), _clip_index(y0))
        out = np.rint((1 - fy) * ((1 - fx) * v00 + fx * v10) + fy * ((1 - fx) * v01 + fx * v11))
    return np.clip(out, 0, 255).astype(np.uint8)


def _fixed_point_coordinates(inverse: np.ndarray, width: int, height: int):
    """Integer source pixel (top-left neighbour) and the four integer weights per output pixel."""
    scale = 1 << _AB_BITS
    round_delta = scale >> (_INTER_BITS + 1)  # rounds to the nearest 1/32 pixel
    cols, rows = np.arange(width, dtype=np.float64), np.arange(height, dtype=np.float64)
    # The coordinate is split into a per-column and a per-row term, each rounded to 1/1024.
    x_col = np.rint(inverse[0, 0] * cols * scale).astype(np.int64)
    y_col = np.rint(inverse[1, 0] * cols * scale).astype(np.int64)
    x_row = np.rint((inverse[0, 1] * rows + inverse[0, 2]) * scale).astype(np.int64) + round_delta
    y_row = np.rint((inverse[1, 1] * rows + inverse[1, 2]) * scale).astype(np.int64) + round_delta
    x = (x_row[:, None] + x_col[None, :]) >> (_AB_BITS - _INTER_BITS)
    y = (y_row[:, None] + y_col[None, :]) >> (_AB_BITS - _INTER_BITS)
    tab = 1 << _INTER_BITS
    fx, fy = x & (tab - 1), y & (tab - 1)
    unit = 1 << (_COEF_BITS - 2 * _INTER_BITS)  # (1/32)**2 in units of 2**-15
    weights = ((tab - fx) * (tab - fy) * unit, fx * (tab - fy) * unit, (tab - fx) * fy * unit, fx * fy * unit)
    return _clip_index(x >> _INTER_BITS), _clip_index(y >> _INTER_BITS), weights


def _clip_index(v: np.ndarray) -> np.ndarray:
    # OpenCV keeps integer source coordinates in int16.
    return np.clip(v, -(1 << 15), (1 << 15) - 1).astype(np.int64)


def _channels(v: np.ndarray, image: np.ndarray) -> np.ndarray:
    return v[..., None] if image.ndim == 3 else v


def _neighbours(image: np.ndarray, x0: np.ndarray, y0: np.ndarray) -> tuple[np.ndarray, ...]:
    """int32: the four pixels ``image[y0 + dy, x0 + dx]`` (dx, dy in {0, 1}), 0 outside the image.

    The image is framed by two rows and columns of zeros: a neighbour pair with either
    pixel outside reads the frame, and one wholly outside is moved onto it, so a single
    gather per neighbour needs no mask.
    """
    h, w = image.shape[:2]
    framed = np.zeros((h + 4, w + 4) + image.shape[2:], np.int32)
    framed[2:-2, 2:-2] = image
    flat = framed.reshape((h + 4) * (w + 4), *image.shape[2:])
    index = (np.clip(y0, -2, h) + 2) * (w + 4) + (np.clip(x0, -2, w) + 2)
    return tuple(flat[index + offset] for offset in (0, 1, w + 4, w + 5))
