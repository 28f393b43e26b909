"""Plain single-device references the sharded code is checked against.

Written independently of ``pfc_jax.heads``: dense logits over all classes, the margin
through ``arccos``, a plain ``log_softmax``.
"""

import math

import jax
import jax.numpy as jnp


def margin_target(cos, s, m1, m2, m3, past="monotone"):
    """s * (cos(m1 * theta + m2) - m3); beyond m1*theta + m2 = pi continued linearly in cos
    (``past="monotone"``) or the same formula (``past="cos"``)."""
    theta = jnp.arccos(jnp.clip(cos, -1 + 1e-6, 1 - 1e-6))
    theta_c = (math.pi - m2) / m1
    inside = jnp.cos(m1 * theta + m2)
    beyond = inside if past == "cos" else cos - math.cos(theta_c) - 1.0
    return s * (jnp.where(theta <= theta_c, inside, beyond) - m3)


def dense_loss(embeddings, centers, labels, s=64.0, m1=1.0, m2=0.5, m3=0.0, past="monotone", straight_through=False):
    """Mean margin-softmax cross-entropy with every class center in one matrix.

    ``straight_through``: the margin moves the target logit's value only; its gradient is
    that of ``s * cos``.
    """
    x = embeddings / jnp.linalg.norm(embeddings, axis=1, keepdims=True)
    w = centers / jnp.linalg.norm(centers, axis=1, keepdims=True)
    cos = jnp.clip(x @ w.T, -1.0, 1.0)
    onehot = jax.nn.one_hot(labels, centers.shape[0], dtype=bool)
    target = margin_target(cos, s, m1, m2, m3, past)
    if straight_through:
        target = s * cos + jax.lax.stop_gradient(target - s * cos)
    logits = jnp.where(onehot, target, s * cos)
    logp = jax.nn.log_softmax(logits, axis=1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))
