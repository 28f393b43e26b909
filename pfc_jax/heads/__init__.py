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

    def prepare(self, state: PyTree, labels: jax.Array, key: jax.Array) -> tuple[PyTree, PyTree, dict]:
        """``(params, context, metrics)`` for the global batch's ``labels`` (i32[B_g],
        sharded on ``data``). With K micro-batches, micro-batch k is ``labels[k*B_g/K :
        (k+1)*B_g/K]``. ``params`` is what the loss is differentiated against; ``metrics``
        are per step and must include ``invalid_labels`` (labels outside the classes: the
        trainer stops on them)."""

    def micro_loss(self, params: PyTree, context: PyTree, embeddings: jax.Array, micro: int) -> tuple[jax.Array, dict]:
        """``(loss, metrics)`` of micro-batch ``micro`` (embeddings [B_g/K, D], sharded on
        ``data``); the trainer reports the mean of the metrics over micro-batches."""

    def update(self, state: PyTree, params: PyTree, context: PyTree, grads: PyTree) -> PyTree:
        """The new state from the mean gradient w.r.t. ``params``."""

    def describe(self, global_batch: int) -> str:
        """A few words for the run's start message (sizes per device)."""

    # Optional, read by the quality study (pfc_jax.study) where a head has them:
    #   class_weights(state) -> f32[num_classes, D]: each class's stored (or generated) weight;
    #   sample_counts(state) -> i32[num_classes] | None: steps each class's weight was updated.


def step(head: Head, state: PyTree, embeddings: jax.Array, labels: jax.Array, key: jax.Array):
    """One whole head step on one batch: ``(new_state, grad_embeddings, metrics)``, with
    ``metrics["loss"]``. Call under ``jax.jit``."""
    params, context, metrics = head.prepare(state, labels, key)
    (loss, loss_metrics), (grad_embeddings, grads) = jax.value_and_grad(head.micro_loss, argnums=(2, 0), has_aux=True)(
        params, context, embeddings, 0
    )
    return head.update(state, params, context, grads), grad_embeddings, {"loss": loss, **loss_metrics, **metrics}


@dataclasses.dataclass(frozen=True)
class HeadEntry:
    """A registered head.

    Attributes:
      build: ``build(config, mesh, *, num_classes, learning_rate) -> Head``.
      check: ``check(c)`` validates the head's config fields with a
        :class:`pfc_jax.config_validation.Check` (raising its ``ConfigError``).
    """

    build: Callable[..., Head]
    check: Callable[[Any], None]


# The head modules import HeadEntry from here, so they come after it.
from pfc_jax.heads import partial_fc  # noqa: E402

# name -> entry; config validation and the trainer read this and nothing else.
HEADS: dict[str, HeadEntry] = {
    "partial_fc": partial_fc.ENTRY,
}
