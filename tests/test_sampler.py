"""Invariants of the per-shard sampler."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pfc_jax.heads import sampler


def draw(key, labels, shard, *, num_local=50, num_classes=400, rate=0.1):
    labels = jnp.asarray(labels, jnp.int32)
    fn = jax.jit(
        lambda k, labels, s: sampler.sample_shard(
            k,
            labels,
            s,
            num_local=num_local,
            num_classes=num_classes,
            rate=rate,
            global_batch=labels.shape[0],
        )
    )
    return jax.tree.map(np.asarray, fn(key, labels, jnp.int32(shard)))


def check_invariants(s, labels, shard, num_local, num_classes, rate):
    labels = np.asarray(labels)
    index, active, target = s.index, s.active, s.target
    assert len(index) == sampler.num_sample(num_local, rate, len(labels))
    assert (np.diff(index) > 0).all(), "sorted and unique"
    assert ((index >= 0) & (index < num_local)).all()
    start = shard * num_local
    owned = (labels >= start) & (labels < min(start + num_local, num_classes))
    # Remap: every owned label points at its own row, which is active.
    np.testing.assert_array_equal(target[~owned], -1)
    np.testing.assert_array_equal(index[target[owned]], labels[owned] - start)
    assert active[target[owned]].all()
    # Padding rows (classes >= num_classes) are never active.
    assert not active[index + start >= num_classes].any()
    positives = len(np.unique(labels[owned]))
    num_valid = max(0, min(num_local, num_classes - start))
    assert active.sum() == min(num_valid, max(positives, math.ceil(rate * num_local)))


@pytest.mark.parametrize("rate", [0.0, 0.1, 0.5, 1.0])
def test_invariants_across_shards(rate):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 390, size=32)
    for shard in range(8):  # 8 x 50 = 400 padded rows for 390 classes: shard 7 has padding
        s = draw(jax.random.key(1), labels, shard, num_classes=390, rate=rate)
        check_invariants(s, labels, shard, 50, 390, rate)


def test_many_labels_on_one_shard():
    # 40 examples, 30 distinct labels all on shard 0: more positives than the rate asks.
    labels = np.concatenate([np.arange(30), np.arange(10)])
    s = draw(jax.random.key(0), labels, 0, num_local=50, rate=0.1)
    check_invariants(s, labels, 0, 50, 400, 0.1)
    assert s.active.sum() == 30  # positives only: the rate's 5 columns are exceeded
    other = draw(jax.random.key(0), labels, 1, num_local=50, rate=0.1)
    assert other.active.sum() == 5 and (other.target == -1).all()


def test_rate_zero_is_positives_only():
    labels = np.array([3, 3, 7, 60, 12, 7, 99, 1])
    s = draw(jax.random.key(0), labels, 0, rate=0.0)
    np.testing.assert_array_equal(s.index[s.active], [1, 3, 7, 12])


def test_deterministic_under_key_and_different_across_keys_and_shards():
    labels = np.arange(0, 400, 25)  # two positives per shard
    a = draw(jax.random.key(5), labels, 2)
    b = draw(jax.random.key(5), labels, 2)
    c = draw(jax.random.key(6), labels, 2)
    d = draw(jax.random.key(5), labels, 3)
    np.testing.assert_array_equal(a.index, b.index)
    negatives = lambda s, shard: set(s.index[s.active]) - {label - shard * 50 for label in labels}
    assert negatives(a, 2) != negatives(c, 2)
    assert negatives(a, 2) != negatives(d, 3)


def test_negatives_are_uniform():
    """Each non-positive row is picked with the same probability (chi-square test)."""
    labels = jnp.array([0, 1, 2, 3], jnp.int32)
    fn = jax.jit(
        jax.vmap(
            lambda k: sampler.sample_shard(
                k, labels, jnp.int32(0), num_local=40, num_classes=40, rate=0.25, global_batch=4
            )
        )
    )
    s = fn(jax.random.split(jax.random.key(0), 4000))
    index, active = np.asarray(s.index), np.asarray(s.active)
    counts = np.bincount(index[active], minlength=40)
    assert (counts[:4] == 4000).all()
    negatives = counts[4:]  # 6 of 36 rows per draw
    expected = 4000 * 6 / 36
    chi2 = ((negatives - expected) ** 2 / expected).sum()
    assert chi2 < 70, chi2  # 35 dof: p ~ 5e-4


@pytest.mark.parametrize("high", [3, 40, 2**32 - 1])
def test_top_keeps_what_lax_top_k_keeps_ties_to_the_lower_index(high):
    """The counting selection against lax.top_k, with many ties at the cut-off (few
    distinct scores) and without, for every k including 0 and all."""
    scores = jax.random.bits(jax.random.key(high % 97), (200,), jnp.uint32) % jnp.uint32(high)
    top = jax.jit(sampler._top)
    for k in [0, 1, 7, 50, 199, 200]:
        # top_k on int32 keys that order like the uint32 scores.
        _, expected = jax.lax.top_k((scores ^ jnp.uint32(2**31)).astype(jnp.int32), k)
        mask = np.zeros(200, bool)
        mask[np.asarray(expected)] = True
        np.testing.assert_array_equal(np.asarray(top(scores, k)), mask)
