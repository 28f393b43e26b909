"""Prototype Memory (Smirnov, Garaev, Galyuk, Lukyanets, IEEE Access 2022, arXiv 2105.02103).

There is no learned weight per class. A memory of ``memory_size`` slots holds one class
prototype each; the prototypes are the classifier weights of a margin softmax (any of
``config.head.margin``'s: ArcFace, CosFace, combined). Every step:

* **Generation.** Batches come from the ``identity_balanced`` sampler: ``K`` images of
  each identity, consecutive (group sampling). An identity's new prototype is the
  normalized mean of the normalized embeddings of its images in the batch, computed by
  the backbone being trained (there is no second encoder).
* **Classification.** Each embedding is scored against the memory as it is after this
  step's update: the batch's identities with their new prototypes (refreshed where the
  identity was in memory, enqueued where it was not), every other slot with its stored
  prototype. The target is its own identity's slot, scored (``positive = "all"``,
  default) against the new prototype itself, or (``"leave_one_out"``) against the
  prototype of the identity's *other* images in the batch. With
  ``gradient_through_prototypes`` (default) the loss is differentiated through the new
  prototypes too, into every embedding they were made of; otherwise they are constants.
* **Update.** The new prototypes are written: an identity already in memory keeps its
  slot and gets the new prototype (refresh); a new one takes an empty slot or, when the
  memory is full, the slot of the prototype written longest ago (dequeue the oldest).
  So no prototype in memory is older than the ``memory_size / identities per step``
  last steps: the obsolescence the paper was written against is bounded by construction.

The memory is a :class:`pfc_jax.heads.pool.ClassPool` of one view per slot: rows sharded
over the ``data`` axis, static shapes, no identity -> slot table (labels are found by
comparing them with the slots' labels), so its memory and compute depend on
``memory_size``, not on the number of identities; checkpointed and re-sharded as the
other heads' rows. "Oldest" is by the time a prototype was last written (a refresh makes
it the newest), which is what keeps refreshed prototypes from being dequeued.

Where the paper's text leaves a choice, this module takes one and says so: the prototype
written is the mean of all ``K`` embeddings of the identity, and by default an
embedding's target is that prototype, the embedding itself included. That target is easy
(``cos(x, normalize(x + y)) >= 0.7`` for ``K = 2`` whenever ``x`` and ``y`` are less
than 90 degrees apart), so ``leave_one_out`` is offered; the README's quality study
measures both (the default gives the higher TAR at low FAR); empty slots of a memory not yet
full are masked out of the softmax rather than filled with random vectors; with gradient
accumulation, prototypes are made of one micro-batch's embeddings (an identity's ``K``
images are always in one micro-batch).
The paper's doppelganger mining (batches built from identities the memory finds
similar) is not built; see the README.
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
from pfc_jax.heads.margins import CombinedMargin
from pfc_jax.heads.pool import EMPTY, ClassPool, Plan, PoolState

_AXIS = sharding.DATA_AXIS
_ROWS = P(_AXIS, None)


def _l2_normalize(x: jax.Array) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


POSITIVES = ("all", "leave_one_out")


def prototypes(embeddings: jax.Array, labels: jax.Array, *, leave_one_out: bool = False) -> jax.Array:
    """f32[b, D]: for each row, the normalized mean of the normalized ``embeddings`` of
    all rows with its label (its identity's prototype), or of the others only."""
    same = labels[:, None] == labels[None, :]
    if leave_one_out:
        same &= ~jnp.eye(labels.shape[0], dtype=bool)
    x = _l2_normalize(embeddings.astype(jnp.float32))
    return _l2_normalize(jnp.einsum("ij,jd->id", same.astype(jnp.float32), x, precision=jax.lax.Precision.HIGHEST))


class Context(NamedTuple):
    """What :meth:`PrototypeMemory.prepare` hands the loss and the update."""

    labels: jax.Array  # i32[B] (micro-batch-major)
    memory: PoolState  # before the step
    plan: Plan  # where each label's prototype is written


@dataclasses.dataclass(frozen=True)
class PrototypeMemory:
    """The Prototype Memory head (see the module docstring).

    Attributes:
      mesh: the 1-D ``data`` mesh.
      num_classes: identities (only to check labels: nothing is sized by it).
      embedding_dim: D.
      memory_size: M, prototype slots.
      margin: the margin softmax over the memory.
      gradient_through_prototypes: differentiate the loss through the step's new
        prototypes (into the embeddings they are made of) as well as through the
        embeddings being classified.
      positive: the target an embedding is scored against: ``"all"``, its identity's new
        prototype (the mean of all ``K`` images, itself included); ``"leave_one_out"``,
        the mean of the other ``K - 1`` (what is written to memory is the mean of all
        ``K`` either way).
    """

    mesh: Mesh
    num_classes: int
    embedding_dim: int
    memory_size: int
    margin: CombinedMargin = CombinedMargin()  # noqa: RUF009 - frozen
    gradient_through_prototypes: bool = True
    positive: str = "all"

    key_encoder = None
    update_uses_embeddings = True  # update() gets the step's embeddings (Head contract)

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.positive not in POSITIVES:
            raise ValueError(f"positive must be one of {POSITIVES}, got {self.positive!r}")

    @property
    def memory(self) -> ClassPool:
        return ClassPool(self.mesh, self.memory_size, self.embedding_dim, views=1)

    # ---- state ---------------------------------------------------------------------

    def init_state(self, key: jax.Array) -> PoolState:
        del key  # an empty memory
        return self.memory.init()

    def state_shardings(self) -> PoolState:
        return self.memory.shardings()

    # ---- the trainer's contract (pfc_jax.heads.Head) ----------------------------------

    def prepare(self, state: PoolState, labels: jax.Array, key: jax.Array):
        """``({}, Context, metrics)``: where the batch's prototypes go (nothing written yet)."""
        del key  # nothing is sampled
        total = int(labels.shape[0])
        if total > self.memory_size:
            raise ValueError(
                f"PrototypeMemory: {total} images per step could bring {total} new identities, but the "
                f"memory has {self.memory_size} slots"
            )
        labels = labels.astype(jnp.int32)
        memory = self.memory
        plan = memory.plan(state, labels)
        metrics = {
            "invalid_labels": jnp.sum((labels < 0) | (labels >= self.num_classes)),
            "memory_fill": jnp.sum(memory.in_use(plan.labels)) / self.memory_size,
            "memory_refreshed": plan.hits,  # distinct identities already in memory
            "memory_enqueued": plan.new,  # distinct identities given a slot
            "memory_dequeued": plan.evicted,  # of those, the slots taken from another identity
        }
        return {}, Context(labels, state, plan), metrics

    def micro_loss(self, params, context: Context, embeddings: jax.Array, micro):
        """Loss of micro-batch ``micro`` of the step's ``embeddings`` [B/K, D]."""
        del params
        b = embeddings.shape[0]
        m = context.labels.shape[0] // b
        labels = context.labels.reshape(m, b)[micro]
        slots = context.plan.slots.reshape(m, b)[micro]
        return self.loss(embeddings, labels, slots, context.memory)

    def loss(self, embeddings: jax.Array, labels: jax.Array, slots: jax.Array, memory: PoolState):
        """The margin softmax of ``embeddings`` [b, D] (labels i32[b]) over ``memory``
        with their identities' new prototypes written at ``slots`` (i32[b], the plan's);
        each row's target is its own slot. ``(loss, metrics)``."""
        size, num_local, margin = self.memory_size, self.memory.num_local, self.margin
        through, leave_one_out = self.gradient_through_prototypes, self.positive == "leave_one_out"

        def per_shard(x, labels, slots, stored, slot_labels):
            x = _l2_normalize(jax.lax.all_gather(x, _AXIS, tiled=True).astype(jnp.float32))
            kept = (lambda p: p) if through else jax.lax.stop_gradient
            new = kept(prototypes(x, labels))
            rows = jax.lax.axis_index(_AXIS) * num_local + jnp.arange(num_local)
            start = rows[0]
            dot = lambda a, w: jnp.einsum("bd,kd->bk", a, w, precision=jax.lax.Precision.HIGHEST)
            # The memory after the update, as cosines: the stored prototypes, with the
            # columns this batch writes replaced by its new prototypes (every copy of a
            # label writes the same value).
            mine = (slots >= start) & (slots < start + num_local)
            column = jnp.where(mine, slots - start, num_local)  # out of range: dropped
            cos = dot(x, stored).at[:, column].set(dot(x, new), mode="drop")
            used = ((rows < size) & (slot_labels != EMPTY)).at[column].set(True, mode="drop")
            is_target = slots[:, None] == rows[None, :]
            if leave_one_out:  # the target: the prototype of the identity's other images
                own = kept(prototypes(x, labels, leave_one_out=True))
                cos = jnp.where(is_target, jnp.sum(x * own, axis=1, keepdims=True), cos)
            logits = jnp.where(used[None, :], margin(cos, is_target), -jnp.inf)
            top = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=1)), _AXIS)
            sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - top[:, None]), axis=1), _AXIS)
            target_logit = jax.lax.psum(jnp.sum(jnp.where(is_target, logits, 0.0), axis=1), _AXIS)
            loss = jnp.mean(jnp.log(sum_exp) + top - target_logit)
            # Accuracy: the own prototype's cosine is the largest.
            cos = jax.lax.stop_gradient(cos)
            best = jax.lax.pmax(jnp.max(jnp.where(used[None, :] & ~is_target, cos, -jnp.inf), axis=1), _AXIS)
            target_cos = jax.lax.psum(jnp.sum(jnp.where(is_target, cos, 0.0), axis=1), _AXIS)
            return loss, {"accuracy": jnp.mean((target_cos > best).astype(jnp.float32))}

        return jax.shard_map(
            per_shard,
            mesh=self.mesh,
            in_specs=(_ROWS, P(), P(), _ROWS, P(_AXIS)),
            out_specs=(P(), P()),
        )(embeddings, labels.astype(jnp.int32), slots, memory.slots["views"][:, 0], memory.slots["labels"])

    def update(self, state: PoolState, params, context: Context, grads, *, embeddings: jax.Array) -> PoolState:
        """The memory with the step's new prototypes (of ``embeddings`` [B, D], the step's,
        micro-batch-major like the labels) written as planned in :meth:`prepare`."""
        del params, grads
        new = prototypes(jax.lax.stop_gradient(embeddings), context.labels)
        return self.memory.apply(state, context.plan, new)

    def describe(self, global_batch: int) -> str:
        return (
            f"a prototype memory of {self.memory_size:,} identities, {self.memory.num_local:,} per device, "
            f"up to {global_batch:,} prototypes written per step"
        )

    def class_weights(self, state: PoolState):
        """Host f32[num_classes, D]: each class's prototype in memory (NaN if not there)."""
        return self.memory.newest_per_label(state, self.num_classes)


# ---- from a run's config ---------------------------------------------------------------


def memory_size(config, num_classes: int) -> int:
    """M: ``head.prototype_memory.memory_size``, or ``ceil(memory_fraction * num_classes)``
    but at least two steps' images (``2 * global_batch_size``), so a full memory always
    keeps some identities of earlier steps."""
    f = config.head.prototype_memory
    if f.memory_size:
        return int(f.memory_size)
    return max(math.ceil(f.memory_fraction * num_classes), 2 * config.global_batch_size)


def from_config(config, mesh: Mesh, *, num_classes: int, learning_rate) -> PrototypeMemory:
    """The head ``config.head`` describes (``name = "prototype_memory"``; fields
    ``head.prototype_memory.*`` and the margin ``head.margin``)."""
    del learning_rate  # nothing is learned in the head
    return PrototypeMemory(
        mesh,
        num_classes=num_classes,
        embedding_dim=config.model.embedding_dim,
        memory_size=memory_size(config, num_classes),
        margin=CombinedMargin(**config.head.margin.to_dict()),
        gradient_through_prototypes=config.head.prototype_memory.gradient_through_prototypes,
        positive=config.head.prototype_memory.positive,
    )


def check_config(c) -> None:
    """The ``config.head.prototype_memory`` fields (``c``: a config_validation.Check)."""
    f = c.config.head.prototype_memory
    c.positive_int("head.prototype_memory.memory_size", minimum=0)
    c.in_range("head.prototype_memory.memory_fraction", 0.0, 1.0, low_open=True)
    c.that(
        isinstance(f.gradient_through_prototypes, bool),
        "head.prototype_memory.gradient_through_prototypes",
        f.gradient_through_prototypes,
        "must be True or False",
    )
    c.choice("head.prototype_memory.positive", POSITIVES)
    margins.check_config(c)
    per_step = c.config.global_batch_size
    c.that(
        not f.memory_size or f.memory_size >= per_step,
        "head.prototype_memory.memory_size",
        f.memory_size,
        f"must hold at least one step's {per_step} images (global_batch_size), or 0 "
        "(from head.prototype_memory.memory_fraction)",
    )


ENTRY = heads.HeadEntry(
    build=from_config,
    check=check_config,
    images_per_identity=2,
)
