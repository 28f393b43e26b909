"""Classification heads over very many identities, chosen by ``config.head.name``.

A head is what the trainer (:class:`pfc_jax.step.TrainStep`) calls; it meets the
:class:`Head` contract. :data:`HEADS` maps each name to a :class:`HeadEntry`: how to
build the head from a run's config and how to check the config's head fields before
anything is built. Adding a head is one module with a class meeting :class:`Head` and a
``HeadEntry``, one line in :data:`HEADS`, its fields in ``configs/base.py``, and its tests.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
from jax.sharding import Mesh

PyTree = Any


class Head(Protocol):
    """What the trainer needs of a head.

    One step is ``prepare`` (no gradient), then ``micro_loss`` once per micro-batch
    (differentiated w.r.t. the head's ``params`` and the embeddings), then ``update`` with
    the mean gradient. With one micro-batch that is :func:`step`.
    """

    mesh: Mesh

    def init_state(self, key: jax.Array) -> PyTree:
        """The head's initial state (pure; jitted with :meth:`state_shardings`)."""

    def state_shardings(self) -> PyTree:
        """NamedShardings of the state. Leaves split by rows on the ``data`` axis are
        re-padded and re-sharded when a checkpoint is restored on another device count."""

    def prepare(self, state: PyTree, labels: jax.Array, key: jax.Array, **inputs) -> tuple[PyTree, PyTree, dict]:
        """``(params, context, metrics)`` for the global batch's ``labels`` (i32[B_g],
        sharded on ``data``). With K micro-batches, micro-batch k is ``labels[k*B_g/K :
        (k+1)*B_g/K]``. ``params`` is what the loss is differentiated against; ``metrics``
        are per step and must include ``invalid_labels`` (labels outside the classes: the
        trainer stops on them). A head with ``key_encoder = "ema"`` also gets ``keys``
        (f32[B_g, D], same order, no gradient): the embeddings of the same images by the
        backbone's exponential moving average, in inference mode."""

    def micro_loss(self, params: PyTree, context: PyTree, embeddings: jax.Array, micro: int) -> tuple[jax.Array, dict]:
        """``(loss, metrics)`` of micro-batch ``micro`` (embeddings [B_g/K, D], sharded on
        ``data``); the trainer reports the mean of the metrics over micro-batches."""

    def update(self, state: PyTree, params: PyTree, context: PyTree, grads: PyTree, **inputs) -> PyTree:
        """The new state from the mean gradient w.r.t. ``params``. A head with
        ``update_uses_embeddings = True`` also gets ``embeddings`` (f32[B_g, D], the step's
        embeddings of every micro-batch, in the order of ``prepare``'s labels, no gradient)."""

    def describe(self, global_batch: int) -> str:
        """A few words for the run's start message (sizes per device)."""

    # Optional: ``key_encoder = "ema"`` on a head whose class weights are generated from
    # the embeddings of a key encoder (DCQ, F²C): the trainer then keeps the EMA and passes
    # ``prepare`` its ``keys`` (see HeadEntry.key_encoder).
    #
    # Optional: ``update_uses_embeddings = True`` on a head whose state is written from the
    # step's own embeddings (Prototype Memory): the trainer passes them to ``update``.
    #
    # Optional, read by the quality study (pfc_jax.study) where a head has them:
    #   class_weights(state) -> f32[num_classes, D]: each class's stored (or generated) weight;
    #   sample_counts(state) -> i32[num_classes] | None: steps each class's weight was updated.


def step(head: Head, state: PyTree, embeddings: jax.Array, labels: jax.Array, key: jax.Array, keys=None):
    """One whole head step on one batch: ``(new_state, grad_embeddings, metrics)``, with
    ``metrics["loss"]``; ``keys`` (f32[B_g, D]) for a head with a key encoder. Call under
    ``jax.jit``."""
    inputs = {} if keys is None else {"keys": keys}
    params, context, metrics = head.prepare(state, labels, key, **inputs)
    (loss, loss_metrics), (grad_embeddings, grads) = jax.value_and_grad(head.micro_loss, argnums=(2, 0), has_aux=True)(
        params, context, embeddings, 0
    )
    written = {"embeddings": jax.lax.stop_gradient(embeddings)} if uses_embeddings(head) else {}
    new_state = head.update(state, params, context, grads, **written)
    return new_state, grad_embeddings, {"loss": loss, **loss_metrics, **metrics}


def uses_embeddings(head: Head) -> bool:
    """Whether ``head.update`` takes the step's ``embeddings`` (see :class:`Head`)."""
    return bool(getattr(head, "update_uses_embeddings", False))


@dataclasses.dataclass(frozen=True)
class HeadEntry:
    """A registered head.

    Attributes:
      build: ``build(config, mesh, *, num_classes, learning_rate) -> Head``.
      check: ``check(c)`` validates the head's config fields with a
        :class:`pfc_jax.config_validation.Check` (raising its ``ConfigError``).
      images_per_identity: the head needs every batch made of identities with this many
        images each, consecutive (the ``identity_balanced`` sampler); 0: any batch.
      key_encoder: ``"ema"``: the head's class weights come from the backbone's
        exponential moving average (the trainer keeps one and passes its ``keys``), which
        is also the encoder evaluated and exported by default; None: no key encoder.
      sampler: the data sampler the head needs (``pfc_jax.data.pipeline.SAMPLERS``);
        None: ``identity_balanced`` if ``images_per_identity`` else any.
      ema_momentum: the EMA's momentum where ``ema.momentum = 0`` (the head's default).
    """

    build: Callable[..., Head]
    check: Callable[[Any], None]
    images_per_identity: int = 0
    key_encoder: str | None = None
    sampler: str | None = None
    ema_momentum: float = 0.999

    @property
    def samplers(self) -> tuple[str, ...]:
        """The samplers the head can train with (empty: any)."""
        if self.sampler:
            return (self.sampler,)
        return ("identity_balanced",) if self.images_per_identity else ()


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What a run's head asks of the rest of the run, with the config's ``auto`` fields
    resolved (see :func:`requirements`)."""

    sampler: str  # data.sampler
    images_per_identity: int  # data.images_per_identity_in_batch
    ema: bool  # keep an EMA of the backbone (ema.enabled)
    eval_encoder: str  # "online" | "ema": evaluated, embedded and exported by default
    ema_momentum: float  # ema.momentum (0: the head's)


DEFAULT_IMAGES_PER_IDENTITY = 4  # identity_balanced without a head that asks for a number


def requirements(config) -> Requirements:
    """``config``'s sampler, images per identity, EMA and evaluated encoder, where
    ``auto`` (and ``images_per_identity_in_batch = 0``) means what the head prescribes:
    DCQ gets identity-balanced batches of 2 images per identity, an EMA (momentum 0.999),
    and the EMA evaluated; F²C the dual sampler's pairs, an EMA of momentum 0.99 and the
    EMA evaluated; Prototype Memory identity-balanced batches of 2 images per identity and
    the online encoder; Partial FC the uniform sampler and the online encoder. Explicit values
    are kept as they are (config validation refuses those the head cannot use)."""
    entry = HEADS.get(config.head.name, HEADS["partial_fc"])
    sampler = config.data.sampler
    if sampler == "auto":
        sampler = entry.samplers[0] if entry.samplers else "uniform"
    per_identity = config.data.images_per_identity_in_batch or entry.images_per_identity or DEFAULT_IMAGES_PER_IDENTITY
    encoder = config.eval.encoder
    if encoder == "auto":
        encoder = "ema" if entry.key_encoder == "ema" else "online"
    enabled = config.ema.enabled
    ema = enabled == "on" or (enabled == "auto" and (entry.key_encoder == "ema" or encoder == "ema"))
    return Requirements(sampler, per_identity, ema, encoder, config.ema.momentum or entry.ema_momentum)


# The head modules import HeadEntry from here, so they come after it.
from pfc_jax.heads import dcq, f2c, partial_fc, prototype_memory  # noqa: E402

# name -> entry; config validation and the trainer read this and nothing else.
HEADS: dict[str, HeadEntry] = {
    "partial_fc": partial_fc.ENTRY,
    "dcq": dcq.ENTRY,
    "f2c": f2c.ENTRY,
    "prototype_memory": prototype_memory.ENTRY,
}
