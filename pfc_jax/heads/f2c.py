"""F²C: Faster Face Classification with a Dynamic Class Pool (Wang et al., CVPR 2022).

There is no learned weight per class. The backbone being trained is the Probe Net; its
exponential moving average (momentum 0.99 by default), run in inference mode, is the
Gallery Net (the trainer computes its embeddings, the ``keys``: see
:class:`pfc_jax.heads.Head`). The class weights are Gallery-Net features kept in a
Dynamic Class Pool of ``pool_size`` identity slots, two views each, with LRU eviction
(:mod:`pfc_jax.heads.pool`).

Batches come from the ``dual`` sampler (:mod:`pfc_jax.data.pipeline`): images ``2j`` and
``2j + 1`` are a pair, two images of one identity for the identity-based part of the
batch, two random images for the instance-based part. Even positions are the official
code's ``x``, odd ones its ``y``; every image is a probe once and a gallery image once:

* the probes ``x`` are scored against the pool with the gallery features of ``y``
  inserted, the probes ``y`` against the pool with those of ``x`` inserted (so a probe
  never meets its own image's gallery feature); only the second insertion is kept, as the
  official code rolls the first back;
* a probe whose identity is in that pool: margin softmax (CosFace or ArcFace) over every
  slot in use, its identity's slot the target; a probe whose identity is not: the mean of
  its top-``k`` cosines to the pool's weights, clipped at 0 (``k = clamp(0.0002 * Q, 3,
  10)``, the official code's), which pushes it away from every identity in the pool;
* both are computed twice, against view 0 of every slot and against view 1 of the slots
  refreshed by the insertion (view 0 of the others), and summed: ``loss = sum over the
  two directions and the two views of (mean softmax loss over the in-pool probes + mean
  top-k penalty over the others)``, the official code's loss.

Memory and compute depend on the pool size, not on the number of identities (there is
no identity -> slot table; see :mod:`pfc_jax.heads.pool`).

Differences from the official code (tiandunx/FFC, PyTorch): its Gallery Net runs in
training mode, with BatchNorm statistics of its own batch; here it runs in inference
mode with the EMA of the online statistics, as DCQ's key encoder here. Its pool starts
filled with random unit vectors; here empty slots are masked. Its LRU is updated one
feature at a time; here one batch at a time (the difference is in
:mod:`pfc_jax.heads.pool`). With gradient accumulation, the means are per micro-batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pfc_jax import heads, sharding
from pfc_jax.heads import margins
from pfc_jax.heads.pool import ClassPool, Plan, PoolState

_AXIS = sharding.DATA_AXIS
_SPLIT = P(_AXIS)
_ROWS = P(_AXIS, None)
MARGIN_TYPES = ("cosface", "arcface")


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


def default_hard_negatives(pool_size: int) -> int:
    """The official code's ``k``: ``clamp(int(0.0002 * Q), 3, 10)``."""
    return min(max(int(pool_size * 0.0002), 3), 10)


class Context(NamedTuple):
    """What :meth:`F2C.prepare` hands the loss and the update (micro-batch-major).

    Side 0 is the probes at even positions (``x``), scored against the pool with the
    gallery features of the odd positions inserted; side 1 the other way round. Neither
    pool is materialized: the loss patches the columns the insertion changes.
    """

    labels: jax.Array  # i32[B]
    targets: jax.Array  # i32[B]: each probe's slot in the pool it is scored against, or -1
    pool: PoolState  # before the step
    gallery: tuple[jax.Array, jax.Array]  # f32[B/2, D]: the features inserted for side 0, side 1
    plans: tuple[Plan, Plan]  # their insertions; side 1's is kept


@dataclasses.dataclass(frozen=True)
class F2C:
    """The F²C head (see the module docstring).

    Attributes:
      mesh: the 1-D ``data`` mesh.
      num_classes: identities (only to check labels: nothing is sized by it).
      embedding_dim: D.
      pool_size: Q, identity slots in the pool.
      margin: the margin softmax of in-pool probes (``s`` scales it; the penalty of the
        others is on plain cosines).
      hard_negatives: k of the out-of-pool penalty (0: the official formula of Q).
    """

    mesh: Mesh
    num_classes: int
    embedding_dim: int
    pool_size: int
    margin: margins.CombinedMargin = margins.cosface(s=32.0, m=0.4)  # noqa: RUF009 - frozen
    hard_negatives: int = 0

    key_encoder = "ema"

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.hard_negatives < 0:
            raise ValueError(f"hard_negatives must be >= 0 (0: the official formula), got {self.hard_negatives}")

    @property
    def pool(self) -> ClassPool:
        return ClassPool(self.mesh, self.pool_size, self.embedding_dim)

    @property
    def k(self) -> int:
        """Top cosines penalized per out-of-pool probe."""
        return min(self.hard_negatives or default_hard_negatives(self.pool_size), self.pool_size)

    # ---- state ---------------------------------------------------------------------

    def init_state(self, key: jax.Array) -> PoolState:
        del key  # an empty pool
        return self.pool.init()

    def state_shardings(self) -> PoolState:
        return self.pool.shardings()

    # ---- the trainer's contract (pfc_jax.heads.Head) ----------------------------------

    def prepare(self, state: PoolState, labels: jax.Array, key: jax.Array, *, keys: jax.Array):
        """``({}, Context, metrics)``: both insertions of the gallery features ``keys``."""
        del key  # nothing is sampled
        total = labels.shape[0]
        if total % 2 or keys.shape != (total, self.embedding_dim):
            raise ValueError(
                f"F2C: {total} labels and gallery features {keys.shape} do not make pairs of "
                f"dimension {self.embedding_dim}"
            )
        if total // 2 > self.pool_size:
            raise ValueError(f"F2C: {total // 2} gallery features per step, but the pool has {self.pool_size} slots")
        gallery = _l2_normalize(jax.lax.stop_gradient(keys).astype(jnp.float32))
        labels = labels.astype(jnp.int32)
        x_labels, y_labels = labels[0::2], labels[1::2]
        pool = self.pool
        for_x = pool.plan(state, y_labels)  # the probes x meet y's gallery features; not kept
        for_y = pool.plan(state, x_labels)  # the probes y meet x's; kept (see update)
        targets = jnp.stack([pool.lookup(for_x.labels, x_labels), pool.lookup(for_y.labels, y_labels)], axis=1)
        targets = targets.reshape(-1)
        metrics = {
            "invalid_labels": jnp.sum((labels < 0) | (labels >= self.num_classes)),
            "pool_fill": jnp.sum(pool.in_use(for_y.labels)) / self.pool_size,
            "in_pool": jnp.mean((targets >= 0).astype(jnp.float32)),  # probes scored by the softmax
            "pool_hits": for_y.hits,  # distinct identities of x already in the pool
            "pool_evicted": for_y.evicted,  # identities evicted to make room for x's
        }
        context = Context(labels, targets, state, (gallery[1::2], gallery[0::2]), (for_x, for_y))
        return {}, context, metrics

    def micro_loss(self, params, context, embeddings: jax.Array, micro):
        """Loss of micro-batch ``micro`` of the step's probes ``embeddings`` [B/M, D]."""
        del params
        b = embeddings.shape[0]
        m = context.labels.shape[0] // b
        targets = context.targets.reshape(m, b)[micro]
        return self.loss(embeddings, targets, context.pool, context.gallery, context.plans)

    def loss(self, embeddings: jax.Array, targets: jax.Array, pool: PoolState, gallery, plans):
        """The F²C loss of probes ``embeddings`` [b, D] (pairs: even rows are side 0, odd
        rows side 1) whose slots in their side's pool are ``targets`` (i32[b], -1: not
        there); side ``s``'s pool is ``pool`` with ``gallery[s]`` inserted by
        ``plans[s]``. ``(loss, metrics)``."""
        size, num_local, k, margin = self.pool_size, self.pool.num_local, self.k, self.margin
        n = gallery[0].shape[0]
        refreshed_cap = min(n, num_local)  # a batch refreshes at most n slots

        def per_shard(x, targets, views, gallery, slots, which, write, slot_labels, refreshed):
            x = _l2_normalize(jax.lax.all_gather(x, _AXIS, tiled=True).astype(jnp.float32))
            rows = jax.lax.axis_index(_AXIS) * num_local + jnp.arange(num_local)
            start = rows[0]
            first = jax.lax.axis_index(_AXIS) == 0
            dot = lambda a, w: jnp.einsum("bd,kd->bk", a, w, precision=jax.lax.Precision.HIGHEST)
            total, correct = jnp.zeros(()), jnp.zeros(())
            for side in (0, 1):
                probes, target = x[side::2], targets[side::2]
                used = (rows < size) & (slot_labels[side] >= 0)
                # The cosines to this side's pool: the pool before the step, with the
                # columns of the slots the insertion writes patched.
                mine = (slots[side] >= start) & (slots[side] < start + num_local) & write[side]
                column = lambda view, side=side, mine=mine: jnp.where(
                    mine & (which[side] == view), slots[side] - start, num_local
                )
                cos_new = dot(probes, gallery[side])  # [b/2, n]
                cos0 = dot(probes, views[:, 0]).at[:, column(0)].set(cos_new, mode="drop")
                # View 1 of the refreshed slots (view 0 of the others), then what is written there.
                (again,) = jnp.nonzero(refreshed[side], size=refreshed_cap, fill_value=num_local)
                cos_again = dot(probes, views[jnp.minimum(again, num_local - 1), 1])
                cos1 = cos0.at[:, again].set(cos_again, mode="drop").at[:, column(1)].set(cos_new, mode="drop")
                in_pool = target >= 0
                n_in = jnp.maximum(jnp.sum(in_pool), 1)
                n_out = jnp.maximum(jnp.sum(~in_pool), 1)
                is_target = target[:, None] == rows[None, :]
                for cos in (cos0, cos1):
                    # Margin softmax, distributed over the devices' slots.
                    logits = jnp.where(used[None, :], margin(cos, is_target), -jnp.inf)
                    top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=1)), _AXIS)
                    top = jnp.where(jnp.isfinite(top), top, 0.0)
                    sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - top[:, None]), axis=1), _AXIS)
                    target_logit = jax.lax.psum(jnp.sum(jnp.where(is_target, logits, 0.0), axis=1), _AXIS)
                    ce = jnp.log(jnp.where(in_pool, sum_exp, 1.0)) + top - target_logit
                    total += jnp.sum(jnp.where(in_pool, ce, 0.0)) / n_in
                    # The penalty of the probes whose identity is not in the pool.
                    masked = jnp.where(used[None, :], cos, -jnp.inf)
                    local_top, _ = jax.lax.top_k(masked, min(k, num_local))
                    best, _ = jax.lax.top_k(jax.lax.all_gather(local_top, _AXIS, axis=1, tiled=True), k)
                    penalty = jnp.sum(jnp.where(in_pool, 0.0, jnp.mean(jnp.maximum(best, 0.0), axis=1))) / n_out
                    # Every device has the same value; device 0's copy makes it one (and
                    # sends its gradient back through one all_gather).
                    total += jax.lax.psum(jnp.where(first, penalty, 0.0), _AXIS)
                # Accuracy of the in-pool probes on view 0: the target's cosine is the largest.
                cos = jax.lax.stop_gradient(cos0)
                best = jax.lax.pmax(jnp.max(jnp.where(used[None, :] & ~is_target, cos, -jnp.inf), axis=1), _AXIS)
                mine_cos = jax.lax.psum(jnp.sum(jnp.where(is_target, cos, 0.0), axis=1), _AXIS)
                correct += jnp.sum(in_pool & (mine_cos > best))
            in_pool_total = jnp.maximum(jnp.sum(targets >= 0), 1)
            return total, {"accuracy": correct / in_pool_total}

        pair = lambda f: tuple(f(p) for p in plans)
        return jax.shard_map(
            per_shard,
            mesh=self.mesh,
            in_specs=(_ROWS, P(), P(_AXIS, None, None), P(), P(), P(), P(), _SPLIT, _SPLIT),
            out_specs=(P(), P()),
        )(
            embeddings,
            targets,
            pool.slots["views"],
            tuple(gallery),
            pair(lambda p: p.slots),
            pair(lambda p: p.views),
            pair(lambda p: p.write),
            pair(lambda p: p.labels),
            pair(lambda p: p.refreshed),
        )

    def update(self, state: PoolState, params, context, grads) -> PoolState:
        """The pool with the gallery features of the probes ``x`` inserted (planned in
        :meth:`prepare`, where the probes ``y`` are scored against it)."""
        del params, grads
        return self.pool.apply(state, context.plans[1], context.gallery[1])

    def describe(self, global_batch: int) -> str:
        return (
            f"a class pool of {self.pool_size:,} identities x 2 views, {self.pool.num_local:,} per device, "
            f"{global_batch // 2:,} gallery features inserted per step, top-{self.k} penalty out of the pool"
        )

    def class_weights(self, state: PoolState):
        """Host f32[num_classes, D]: each class's newest pool feature (NaN if not in the pool)."""
        return self.pool.newest_per_label(state, self.num_classes)


# ---- from a run's config ---------------------------------------------------------------


def pool_size(config, num_classes: int) -> int:
    """Q: ``head.f2c.pool_size``, or ``ceil(pool_fraction * num_classes)`` but at least
    two steps' gallery features (``global_batch_size``)."""
    f = config.head.f2c
    if f.pool_size:
        return int(f.pool_size)
    return max(math.ceil(f.pool_fraction * num_classes), config.global_batch_size)


def make_margin(config) -> margins.CombinedMargin:
    f = config.head.f2c
    make = margins.cosface if f.margin_type == "cosface" else margins.arcface
    return make(s=f.scale, m=f.margin)


def from_config(config, mesh: Mesh, *, num_classes: int, learning_rate) -> F2C:
    """The head ``config.head`` describes (``name = "f2c"``; fields ``head.f2c.*``)."""
    del learning_rate  # nothing is learned in the head
    return F2C(
        mesh,
        num_classes=num_classes,
        embedding_dim=config.model.embedding_dim,
        pool_size=pool_size(config, num_classes),
        margin=make_margin(config),
        hard_negatives=config.head.f2c.hard_negatives,
    )


def check_config(c) -> None:
    """The ``config.head.f2c`` fields (``c``: a config_validation.Check)."""
    f = c.config.head.f2c
    c.positive_int("head.f2c.pool_size", minimum=0)
    c.in_range("head.f2c.pool_fraction", 0.0, 1.0, low_open=True)
    c.choice("head.f2c.margin_type", MARGIN_TYPES)
    c.in_range("head.f2c.scale", 0.0, float("inf"), low_open=True)
    c.in_range("head.f2c.margin", 0.0, 1.0)
    c.positive_int("head.f2c.hard_negatives", minimum=0)
    per_step = c.config.global_batch_size // 2
    c.that(
        not f.pool_size or f.pool_size >= per_step,
        "head.f2c.pool_size",
        f.pool_size,
        f"must hold at least one step's {per_step} gallery features (global_batch_size / 2), or 0 "
        "(from head.f2c.pool_fraction)",
    )


ENTRY = heads.HeadEntry(
    build=from_config,
    check=check_config,
    images_per_identity=2,
    key_encoder="ema",
    sampler="dual",
    ema_momentum=0.99,
)
