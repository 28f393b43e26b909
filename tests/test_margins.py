"""The combined margin: values, gradients, numerical safety, validation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax.heads import margins
from tests import reference

COS = jnp.linspace(-0.99, 0.99, 41)


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.3, 0.2), (1.5, 0.2, 0.1)])
def test_value_and_gradient_match_reference(m1, m2, m3):
    margin = margins.CombinedMargin(s=1.0, m1=m1, m2=m2, m3=m3)
    ref = lambda c: reference.margin_target(c, 1.0, m1, m2, m3)
    np.testing.assert_allclose(margin.target_cos(COS), ref(COS), atol=2e-6)
    grad = jax.vmap(jax.grad(margin.target_cos))(COS)
    np.testing.assert_allclose(grad, jax.vmap(jax.grad(ref))(COS), rtol=1e-4, atol=1e-4)


def test_cosface_is_exactly_cos_minus_m():
    margin = margins.cosface(s=64.0, m=0.35)
    np.testing.assert_array_equal(margin.target_cos(COS), COS - 0.35)


def test_monotone_and_continuous_past_pi():
    margin = margins.arcface(s=1.0, m=0.5)
    cos = jnp.linspace(-1.0, 1.0, 20001)
    value = margin.target_cos(cos)
    assert (np.diff(np.asarray(value)) >= 0).all()  # slope -> 0 at the edge itself
    edge = -math.cos(0.5)  # cos(pi - m): where theta + m = pi
    below, above = margin.target_cos(jnp.array([edge - 1e-6, edge + 1e-6]))
    assert abs(float(below) + 1.0) < 1e-5 and abs(float(above) + 1.0) < 1e-5


def test_finite_gradients_at_the_ends():
    for m in [margins.arcface(), margins.CombinedMargin(m1=1.3, m2=0.2, m3=0.1)]:
        cos = jnp.array([-1.0, -1.0 + 1e-7, 1.0 - 6e-8, 1.0])
        grad = jax.vmap(jax.grad(m.target_cos))(cos)
        assert np.isfinite(grad).all(), grad
        assert np.abs(grad).max() < 5e3


def test_straight_through_value_is_exact_gradient_is_identity():
    exact = margins.arcface(s=1.0)
    st = margins.arcface(s=1.0, gradient="straight_through")
    np.testing.assert_allclose(st.target_cos(COS), exact.target_cos(COS), atol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(st.target_cos))(COS), 1.0)


def _angle_cos(cos, m1, m2):
    """cos(m1 * arccos(cos) + m2) in float64."""
    return np.cos(m1 * np.arccos(np.asarray(cos, np.float64)) + m2)


@pytest.mark.parametrize("m1,m2", [(1.0, 0.5), (1.5, 0.2)])
def test_past_critical_cos_is_the_plain_angle_formula(m1, m2):
    cos_margin = margins.CombinedMargin(s=1.0, m1=m1, m2=m2, m3=0.1, past_critical="cos")
    monotone = margins.CombinedMargin(s=1.0, m1=m1, m2=m2, m3=0.1)
    cos_critical = math.cos((math.pi - m2) / m1)
    past = jnp.linspace(-0.999, cos_critical - 1e-3, 50)  # m1 * theta + m2 > pi
    np.testing.assert_allclose(cos_margin.target_cos(past), _angle_cos(past, m1, m2) - 0.1, atol=1e-5)
    # Past pi the value rises again: a smaller cos (larger angle) gives a larger logit.
    assert (np.diff(np.asarray(cos_margin.target_cos(past))) < 0).all()
    assert (np.asarray(cos_margin.target_cos(past)) > np.asarray(monotone.target_cos(past)) + 1e-4).all()
    # Before it, both options are the same function.
    inside = jnp.linspace(cos_critical + 1e-3, 0.999, 50)
    np.testing.assert_array_equal(cos_margin.target_cos(inside), monotone.target_cos(inside))
    np.testing.assert_array_equal(
        jax.vmap(jax.grad(cos_margin.target_cos))(inside), jax.vmap(jax.grad(monotone.target_cos))(inside)
    )


def test_past_critical_cos_gradient_modes():
    m = 0.5
    past = jnp.linspace(-0.99, -math.cos(m) - 1e-2, 20)  # theta + m > pi
    # exact: d cos(theta + m) / d cos(theta) = sin(theta + m) / sin(theta), negative past pi.
    exact = margins.arcface(s=1.0, m=m, past_critical="cos")
    theta = np.arccos(np.asarray(past, np.float64))
    expected = np.sin(theta + m) / np.sin(theta)
    assert (expected < 0).all()
    np.testing.assert_allclose(jax.vmap(jax.grad(exact.target_cos))(past), expected, rtol=1e-4)
    # straight_through (arcface_torch's): the value of "cos" mode, the gradient of cos(theta).
    st = margins.arcface(s=1.0, m=m, past_critical="cos", gradient="straight_through")
    np.testing.assert_allclose(st.target_cos(COS), exact.target_cos(COS), atol=1e-6)
    np.testing.assert_array_equal(jax.vmap(jax.grad(st.target_cos))(COS), 1.0)
    # Ends of [-1, 1]: finite.
    ends = jnp.array([-1.0, -1.0 + 1e-7, 1.0 - 6e-8, 1.0])
    assert np.isfinite(jax.vmap(jax.grad(exact.target_cos))(ends)).all()


def test_cosface_ignores_both_options():
    """No angular margin: cos - m3 with slope 1, whatever gradient and past_critical say."""
    for gradient in ("exact", "straight_through"):
        for past_critical in ("monotone", "cos"):
            margin = margins.cosface(s=1.0, m=0.4, gradient=gradient, past_critical=past_critical)
            np.testing.assert_array_equal(margin.target_cos(COS), COS - 0.4)
            np.testing.assert_array_equal(jax.vmap(jax.grad(margin.target_cos))(COS), 1.0)


def test_logits_margin_on_target_only_and_interclass_filtering():
    cos = jnp.array([[0.2, 0.6, -0.1], [0.5, 0.1, 0.45]])
    is_target = jnp.array([[True, False, False], [False, False, False]])
    plain = margins.arcface(s=2.0)
    out = plain(cos, is_target)
    np.testing.assert_allclose(out[0, 0], 2.0 * math.cos(math.acos(0.2) + 0.5), rtol=1e-6)
    np.testing.assert_allclose(out[0, 1:], 2.0 * cos[0, 1:])
    np.testing.assert_allclose(out[1], 2.0 * cos[1])  # no target on this shard: no margin
    filtered = margins.arcface(s=2.0, interclass_filtering_threshold=0.4)
    out = filtered(cos, is_target)
    np.testing.assert_allclose(out[0, 1], 0.0)  # non-target above the threshold
    np.testing.assert_allclose(out[1], [0.0, 0.2, 0.0])
    grad = jax.grad(lambda c: filtered(c, is_target).sum())(cos)
    assert grad[0, 1] == 0.0 and grad[1, 0] == 0.0


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(s=0.0), "scale s"),
        (dict(m1=0.5), "m1"),
        (dict(m2=-0.1), "m2"),
        (dict(m3=3.0), "m3"),
        (dict(gradient="approx"), "gradient"),
        (dict(past_critical="linear"), "past_critical must be one of"),
        (dict(interclass_filtering_threshold=1.0), "interclass"),
    ],
)
def test_invalid_margins_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        margins.CombinedMargin(**kwargs)
