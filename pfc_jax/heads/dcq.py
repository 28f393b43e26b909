"""DCQ: Dynamic Class Queue (Li et al., CVPR 2021), class weights generated on the fly.

There is no learned weight per class. Each batch holds P identities x G images
(consecutive, the ``identity_balanced`` sampler, G >= 2). Every image is embedded twice:
by the backbone being trained (the query ``q``) and by its exponential moving average,
in inference mode (the key ``k``, no gradient; the trainer computes it, see
:class:`pfc_jax.heads.Head`). Per query, with normalized vectors:

* the positive is ``s * (q . w+ - m)``, where ``w+`` is the normalized mean of the keys
  of the *other* images of its identity in the batch (for G = 2: its partner's key);
  every image is a query, so both images of a pair are used both ways (symmetric);
* the negatives are ``s * q . w`` for every weight ``w`` in a FIFO queue of the last
  ``queue_size`` generated weights, those of the query's own identity and the empty
  slots masked out;
* the loss is the softmax cross-entropy with the positive as the target, the softmax
  distributed over the devices, which each hold a block of the queue's rows.

After the step, each identity of the batch enqueues one weight, the normalized mean of
its G keys, with its label (:mod:`pfc_jax.heads.queue`): ``P = B / G`` entries per step.
The queue fills up over its first ``queue_size / P`` steps. Memory and compute depend on
``queue_size``, not on the number of identities.

Differences from the official code (bilylee/DCQ, PaddlePaddle): it uses one image of
each pair as the query and the other as the key; here both are (the same images give
twice the queries). Its key encoder runs in training mode with batches shuffled across
GPUs; here the EMA runs in inference mode, with BatchNorm statistics that are the EMA of
the online ones, so a key depends on its image alone and no statistic can leak between
the positive and the query. Its queue starts filled with random vectors; here empty
slots are masked.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pfc_jax import heads, sharding
from pfc_jax.heads.queue import QueueState, RingQueue

_AXIS = sharding.DATA_AXIS
_SPLIT = P(_AXIS)
_ROWS = P(_AXIS, None)


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


class Context(NamedTuple):
    """What :meth:`DCQ.prepare` hands the loss and the update (micro-batch-major)."""

    labels: jax.Array  # i32[B] (micro-batch m is rows [m * B/M, (m + 1) * B/M))
    positives: jax.Array  # f32[B, D]: each query's generated positive weight
    entries: jax.Array  # f32[B/G, D] the weights to enqueue, one per identity
    entry_labels: jax.Array  # i32[B/G]
    queue: QueueState  # the queue before this step's entries (the negatives)


@dataclasses.dataclass(frozen=True)
class DCQ:
    """The Dynamic Class Queue head (see the module docstring).

    Attributes:
      mesh: the 1-D ``data`` mesh.
      num_classes: identities (only to check labels: nothing is sized by it).
      embedding_dim: D.
      queue_size: K, generated weights kept.
      images_per_identity: G, consecutive images of one identity in every batch.
      scale: s.
      margin: m, subtracted from the positive cosine.
    """

    mesh: Mesh
    num_classes: int
    embedding_dim: int
    queue_size: int
    images_per_identity: int = 2
    scale: float = 50.0
    margin: float = 0.3

    key_encoder = "ema"

    def __post_init__(self):
        if self.images_per_identity < 2:
            raise ValueError(f"DCQ needs >= 2 images per identity in a batch, got {self.images_per_identity}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")

    @property
    def queue(self) -> RingQueue:
        return RingQueue(self.mesh, self.queue_size, self.embedding_dim)

    # ---- state ---------------------------------------------------------------------

    def init_state(self, key: jax.Array) -> QueueState:
        del key  # an empty queue
        return self.queue.init()

    def state_shardings(self) -> QueueState:
        return self.queue.shardings()

    # ---- the trainer's contract (pfc_jax.heads.Head) ----------------------------------

    def prepare(self, state: QueueState, labels: jax.Array, key: jax.Array, *, keys: jax.Array):
        """``({}, Context, metrics)``: the positives and the entries from ``keys``."""
        del key  # nothing is sampled
        g = self.images_per_identity
        total = labels.shape[0]
        if total % g or keys.shape != (total, self.embedding_dim):
            raise ValueError(
                f"DCQ: {total} labels and keys {keys.shape} do not make groups of {g} images of "
                f"dimension {self.embedding_dim}"
            )
        keys = _l2_normalize(jax.lax.stop_gradient(keys).astype(jnp.float32))
        groups = keys.reshape(-1, g, self.embedding_dim)
        group_sum = jnp.sum(groups, axis=1, keepdims=True)
        positives = _l2_normalize(group_sum - groups).reshape(total, -1)  # leave-one-out mean
        group_labels = labels.reshape(-1, g)
        mixed = jnp.any(group_labels != group_labels[:, :1], axis=1)
        metrics = {
            "invalid_labels": jnp.sum((labels < 0) | (labels >= self.num_classes)),
            "queue_fill": jnp.sum(self.queue.in_use(state)) / self.queue_size,
            "mixed_groups": jnp.sum(mixed),  # groups whose images are not one identity: 0
        }
        context = Context(labels, positives, _l2_normalize(group_sum[:, 0]), group_labels[:, 0], state)
        return {}, context, metrics

    def micro_loss(self, params, context, embeddings: jax.Array, micro):
        """Loss of micro-batch ``micro`` of the step's queries ``embeddings`` [B/M, D]."""
        del params
        b = embeddings.shape[0]
        m = context.labels.shape[0] // b
        labels = context.labels.reshape(m, b)[micro]
        positives = context.positives.reshape(m, b, -1)[micro]
        return self.loss(embeddings, positives, labels, context.queue)

    def loss(self, embeddings: jax.Array, positives: jax.Array, labels: jax.Array, state: QueueState):
        """Mean DCQ cross-entropy of queries ``embeddings`` [b, D] against their
        ``positives`` [b, D] (normalized) and the queue; ``(loss, metrics)``."""
        s, margin, size = self.scale, self.margin, self.queue_size
        num_local = self.queue.num_local

        def per_shard(x, positives, labels, weights, slot_labels):
            x = _l2_normalize(jax.lax.all_gather(x, _AXIS, tiled=True).astype(jnp.float32))
            positives = jax.lax.all_gather(positives, _AXIS, tiled=True)
            labels = jax.lax.all_gather(labels, _AXIS, tiled=True)
            rows = jax.lax.axis_index(_AXIS) * num_local + jnp.arange(num_local)
            filled = (rows < size) & (slot_labels >= 0)
            use = filled[None, :] & (slot_labels[None, :] != labels[:, None])  # [b, K_local]
            cos = jnp.einsum("bd,kd->bk", x, weights, precision=jax.lax.Precision.HIGHEST)
            # Every device computes the same positives; the psum of device 0's copy makes
            # them one value (and sends their gradient back through one all_gather).
            first = jax.lax.axis_index(_AXIS) == 0
            cos_pos = jax.lax.psum(jnp.where(first, jnp.sum(x * positives, axis=1), 0.0), _AXIS)
            negatives = jnp.where(use, s * cos, -jnp.inf)
            positive = s * (cos_pos - margin)
            top = jnp.maximum(jax.lax.pmax(jax.lax.stop_gradient(jnp.max(negatives, axis=1)), _AXIS), positive)
            top = jax.lax.stop_gradient(top)
            sum_exp = jax.lax.psum(jnp.sum(jnp.exp(negatives - top[:, None]), axis=1), _AXIS)
            per_query = jnp.log(sum_exp + jnp.exp(positive - top)) + top - positive
            best = jax.lax.pmax(jnp.max(jnp.where(use, jax.lax.stop_gradient(cos), -jnp.inf), axis=1), _AXIS)
            used = jax.lax.psum(jnp.sum(use, axis=1), _AXIS)
            metrics = {
                # the positive above every queue column it competes with (no margin)
                "accuracy": jnp.mean((jax.lax.stop_gradient(cos_pos) > best).astype(jnp.float32)),
                "masked_columns": 1.0 - jnp.mean(used) / size,  # same identity or empty
            }
            return jnp.mean(per_query), metrics

        return jax.shard_map(
            per_shard,
            mesh=self.mesh,
            in_specs=(_ROWS, _ROWS, _SPLIT, _ROWS, _SPLIT),
            out_specs=(P(), P()),
        )(embeddings, positives, labels, state.slots["weights"], state.slots["labels"])

    def update(self, state: QueueState, params, context, grads) -> QueueState:
        """Enqueues the step's generated weights (one per identity)."""
        del params, grads
        return self.queue.enqueue(state, {"weights": context.entries, "labels": context.entry_labels})

    def describe(self, global_batch: int) -> str:
        per_step = global_batch // self.images_per_identity
        return (
            f"a queue of {self.queue_size:,} generated weights, {self.queue.num_local:,} per device, "
            f"{per_step:,} enqueued per step"
        )

    def class_weights(self, state: QueueState):
        """Host f32[num_classes, D]: each class's newest weight in the queue (NaN if none)."""
        return self.queue.latest_per_label(state, self.num_classes)


# ---- from a run's config ---------------------------------------------------------------


def from_config(config, mesh: Mesh, *, num_classes: int, learning_rate) -> DCQ:
    """The head ``config.head`` describes (``name = "dcq"``; fields ``head.dcq.*``)."""
    del learning_rate  # nothing is learned in the head
    d = config.head.dcq
    return DCQ(
        mesh,
        num_classes=num_classes,
        embedding_dim=config.model.embedding_dim,
        queue_size=d.queue_size,
        images_per_identity=heads.requirements(config).images_per_identity,
        scale=d.scale,
        margin=d.margin,
    )


def check_config(c) -> None:
    """The ``config.head.dcq`` fields (``c``: a config_validation.Check)."""
    c.positive_int("head.dcq.queue_size")
    c.in_range("head.dcq.scale", 0.0, float("inf"), low_open=True)
    c.in_range("head.dcq.margin", 0.0, 1.0)
    per_step = c.config.global_batch_size // heads.requirements(c.config).images_per_identity
    c.that(
        c.config.head.dcq.queue_size >= per_step,
        "head.dcq.queue_size",
        c.config.head.dcq.queue_size,
        f"must hold at least one step's {per_step} entries (global_batch_size / images per identity)",
    )


ENTRY = heads.HeadEntry(build=from_config, check=check_config, images_per_identity=2, key_encoder="ema")
