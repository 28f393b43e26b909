"""Margin softmax logits: ``s * (cos(m1 * theta + m2) - m3)`` on the target class.

ArcFace is ``(m1, m2, m3) = (1, 0.5, 0)``, CosFace ``(1, 0, 0.4)``; any combination is
allowed (``m1 >= 1`` multiplies the angle as in SphereFace). Only the target logit of
each row gets the margin; every other logit is ``s * cos``.

Two choices worth knowing, both selectable:

* **Past the critical angle**, ``m1 * theta + m2 > pi`` (``theta > theta_c = (pi - m2) /
  m1``), ``cos(m1 * theta + m2)`` turns back up: a larger angle would give a larger
  target logit and *lower* the loss. ``past_critical="monotone"`` (default) continues the
  target logit there as ``cos(theta) - cos(theta_c) - 1 - m3``: continuous at
  ``theta_c`` and monotone in ``cos(theta)``. ``past_critical="cos"`` keeps
  ``cos(m1 * theta + m2) - m3`` everywhere, with no special branch (arcface_torch's value).
* **Gradient mode.** ``"exact"`` (default) differentiates the margin function. Its slope
  ``m1 * sin(m1 * theta + m2) / sin(theta)`` grows without bound as ``cos(theta) -> 1``;
  it is kept finite (at most ~1.5e3 for ArcFace m = 0.5) by flooring ``sin(theta)^2`` at the
  fp32 resolution; with ``past_critical="cos"`` it turns negative past ``theta_c``.
  ``"straight_through"`` applies the margin to the value only and passes the gradient of
  ``cos(theta)`` unchanged (slope 1 everywhere).

Without an angular margin (``m1 = 1, m2 = 0``: CosFace) the target is ``cos(theta) - m3``
whatever the options: there is no critical angle, and the exact slope is already 1.

What insightface's arcface_torch does (``losses.py``, ``CombinedMarginLoss`` and its
``ArcFace`` class since December 2022): for ArcFace it takes ``arccos`` of the logits,
adds ``m2`` to the target angle and takes ``cos``, in place under ``torch.no_grad``.
That is ``cos(theta + m2)`` everywhere, with no branch at the critical angle (continuous,
rising again past it: a larger angle gives a larger logit), and a straight-through
gradient (autograd never sees the in-place edits, so the loss is differentiated as if
the logits were still ``cos(theta)``); here that is ``past_critical="cos",
gradient="straight_through"``. Its CosFace (``m3 > 0``) is ``cos(theta) - m3`` with the
ordinary gradient, i.e. any of the options here. It supports only these two cases (it
ignores ``m1`` and ``m2`` when ``m3 > 0``). The value that *jumps* at the critical
angle, ``cos(theta) - m2 * sin(m2)`` past it (down by ~0.12 for m2 = 0.5), belongs to
the older implementations: arcface_torch's ``losses.py`` during 2022 before that change
and insightface's MXNet ArcFace.

Inter-class filtering (``interclass_filtering_threshold > 0``, from arcface_torch):
non-target cosines above the threshold are likely label noise or duplicate identities;
they are replaced by 0 (logit 0, no gradient).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

GradientMode = Literal["exact", "straight_through"]
_GRADIENT_MODES = ("exact", "straight_through")
PastCritical = Literal["monotone", "cos"]
_PAST_CRITICAL = ("monotone", "cos")
# Floor of sin(theta)^2 = 1 - cos^2: about the smallest nonzero value fp32 gives near 1.
_SIN2_FLOOR = 1e-7


@dataclasses.dataclass(frozen=True)
class CombinedMargin:
    """``s * (cos(m1 * theta + m2) - m3)`` on the target logit, ``s * cos`` elsewhere.

    Attributes:
      s: scale of all logits (64 in the field's recipes).
      m1: multiplicative angular margin (1 for ArcFace/CosFace).
      m2: additive angular margin (ArcFace's m, radians).
      m3: additive cosine margin (CosFace's m).
      gradient: ``"exact"`` or ``"straight_through"`` (see module docstring).
      past_critical: the target value past ``m1 * theta + m2 = pi``: ``"monotone"``
        (continued linearly in ``cos``) or ``"cos"`` (``cos(m1 * theta + m2)`` as
        everywhere else). No effect without an angular margin.
      interclass_filtering_threshold: 0 disables; else in (0, 1).
    """

    s: float = 64.0
    m1: float = 1.0
    m2: float = 0.5
    m3: float = 0.0
    gradient: GradientMode = "exact"
    past_critical: PastCritical = "monotone"
    interclass_filtering_threshold: float = 0.0

    def __post_init__(self):
        if not self.s > 0:
            raise ValueError(f"margin scale s must be > 0, got {self.s}")
        if not self.m1 >= 1.0:
            raise ValueError(f"margin m1 must be >= 1 (1 = no multiplicative margin), got {self.m1}")
        if not 0.0 <= self.m2 < math.pi:
            raise ValueError(f"margin m2 must be in [0, pi), got {self.m2}")
        if not 0.0 <= self.m3 <= 2.0:
            raise ValueError(f"margin m3 must be in [0, 2], got {self.m3}")
        if self.gradient not in _GRADIENT_MODES:
            raise ValueError(f"margin gradient must be one of {_GRADIENT_MODES}, got {self.gradient!r}")
        if self.past_critical not in _PAST_CRITICAL:
            raise ValueError(f"margin past_critical must be one of {_PAST_CRITICAL}, got {self.past_critical!r}")
        if not 0.0 <= self.interclass_filtering_threshold < 1.0:
            raise ValueError(
                "interclass_filtering_threshold must be in [0, 1) (0 disables it), "
                f"got {self.interclass_filtering_threshold}"
            )

    @property
    def has_angular_margin(self) -> bool:
        return self.m1 != 1.0 or self.m2 != 0.0

    def target_cos(self, cos: jax.Array) -> jax.Array:
        """``cos(m1 * theta + m2) - m3`` (unscaled) for target cosines ``cos`` in [-1, 1]."""
        margined = self._angular(cos) if self.has_angular_margin else cos
        margined = margined - self.m3
        if self.gradient == "straight_through":
            return cos + jax.lax.stop_gradient(margined - cos)
        return margined

    def _angular(self, cos: jax.Array) -> jax.Array:
        # Both branches of the `where` below must have finite gradients everywhere in
        # [-1, 1]: `where` multiplies the unused branch's gradient by 0, and 0 * inf = nan.
        sin2 = jnp.maximum(1.0 - cos * cos, _SIN2_FLOOR)
        if self.m1 == 1.0:
            # cos(theta + m2) without arccos: exact to fp32 rounding.
            angular = cos * math.cos(self.m2) - jnp.sqrt(sin2) * math.sin(self.m2)
        else:
            theta = jnp.arctan2(jnp.sqrt(sin2), cos)
            angular = jnp.cos(self.m1 * theta + self.m2)
        if self.past_critical == "cos":
            return angular
        cos_critical = math.cos((math.pi - self.m2) / self.m1)
        linear = cos - cos_critical - 1.0
        return jnp.where(cos > cos_critical, angular, linear)

    def __call__(self, cos: jax.Array, is_target: jax.Array) -> jax.Array:
        """Scaled logits from cosines ``cos`` [B, N] and a one-hot-like mask ``is_target``.

        Rows with no target column (their class lives on another shard) get no margin.
        ``is_target`` has at most one True per row.
        """
        # The margin is evaluated on one cosine per row, not on the whole [B, N] matrix.
        target = self.target_cos(jnp.sum(jnp.where(is_target, cos, 0.0), axis=1))
        if self.interclass_filtering_threshold > 0.0:
            noisy = (cos > self.interclass_filtering_threshold) & ~is_target
            cos = jnp.where(noisy, 0.0, cos)
        return self.s * jnp.where(is_target, target[:, None], cos)


def arcface(s: float = 64.0, m: float = 0.5, **kwargs) -> CombinedMargin:
    """ArcFace: additive angular margin ``cos(theta + m)``."""
    return CombinedMargin(s=s, m1=1.0, m2=m, m3=0.0, **kwargs)


def cosface(s: float = 64.0, m: float = 0.4, **kwargs) -> CombinedMargin:
    """CosFace: additive cosine margin ``cos(theta) - m``."""
    return CombinedMargin(s=s, m1=1.0, m2=0.0, m3=m, **kwargs)


def check_config(c) -> None:
    """The ``config.head.margin`` fields (``c``: a config_validation.Check), as
    :class:`CombinedMargin` checks them."""
    try:
        CombinedMargin(**c.config.head.margin.to_dict())
    except (ValueError, TypeError) as e:
        c.fail_group("head.margin", e)
