"""The train step: backbone data-parallel on the mesh, the Partial FC head, both updates.

``TrainStep.__call__(state, images, labels) -> (state, metrics)`` is pure; compile it
with :meth:`TrainStep.jit` (explicit shardings, the state donated). The step's PRNG key
is ``fold_in(state.rng, state.step)``, so a run restarted from a checkpoint draws the
same class samples and dropout masks as an uninterrupted one.

Gradient accumulation splits the global batch into ``grad_accum_steps`` micro-batches,
each spread over all devices. The class sample is drawn once per step from the labels of
the whole global batch, every micro-batch uses it, and the gradients of the backbone and
of the sampled rows are averaged; without BatchNorm this equals one step on the whole
batch (BatchNorm statistics are per micro-batch, as in PyTorch).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pfc_jax import sharding
from pfc_jax.heads.partial_fc import HeadState, PartialFC


class TrainState(NamedTuple):
    """Everything a run needs to continue exactly (besides the data position)."""

    step: jax.Array  # int32 []: optimizer steps taken
    params: dict  # backbone parameters
    batch_stats: dict  # backbone BatchNorm running statistics
    opt_state: Any  # backbone optimizer state
    head: HeadState  # class centers and their optimizer state
    rng: jax.Array  # uint32 key data; the step key is fold_in(rng, step)


def normalize_images(images: jax.Array, dtype) -> jax.Array:
    """uint8 [0, 255] -> [-1, 1], the convention of insightface models ((x - 127.5) / 127.5)."""
    return ((images.astype(jnp.float32) - 127.5) / 127.5).astype(dtype)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """One optimizer step of backbone + head.

    Attributes:
      graphdef: the backbone's NNX graph (``nnx.split(model, nnx.Param, nnx.BatchStat)``).
      head: the Partial FC head (its optimizer updates the centers).
      tx: the backbone's optax transform.
      schedule: the learning-rate schedule (for the ``lr`` metric).
      grad_accum_steps: micro-batches per step.
      dtype: backbone compute dtype.
    """

    graphdef: Any
    head: PartialFC
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    grad_accum_steps: int = 1
    dtype: Any = jnp.float32

    @property
    def mesh(self):
        return self.head.mesh

    # ---- state -------------------------------------------------------------------------

    def init_state(self, params: dict, batch_stats: dict, key: jax.Array) -> TrainState:
        """Fresh state around the backbone's initial ``params`` and ``batch_stats`` (pure)."""
        head_key, rng_key = jax.random.split(key)
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            batch_stats=batch_stats,
            opt_state=self.tx.init(params),
            head=self.head.init_state(head_key),
            rng=jax.random.key_data(rng_key),
        )

    def state_shardings(self, params: dict, batch_stats: dict) -> TrainState:
        """Backbone and its optimizer replicated; centers and their row state split by rows."""
        shapes = jax.eval_shape(self.init_state, params, batch_stats, jax.random.key(0))
        whole = sharding.replicated(self.mesh)
        return TrainState(
            step=whole,
            params=jax.tree.map(lambda _: whole, shapes.params),
            batch_stats=jax.tree.map(lambda _: whole, shapes.batch_stats),
            opt_state=jax.tree.map(lambda _: whole, shapes.opt_state),
            head=self.head.state_shardings(),
            rng=whole,
        )

    def init(self, params: dict, batch_stats: dict, key: jax.Array) -> TrainState:
        """:meth:`init_state` placed on the mesh (each device makes only its own rows)."""
        out = self.state_shardings(params, batch_stats)
        return jax.jit(self.init_state, out_shardings=out)(params, batch_stats, key)

    def abstract_state(self, params: dict, batch_stats: dict) -> TrainState:
        """Shapes, dtypes and shardings of the state, for restoring a checkpoint."""
        shapes = jax.eval_shape(self.init_state, params, batch_stats, jax.random.key(0))
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
            shapes,
            self.state_shardings(params, batch_stats),
        )

    # ---- the step ------------------------------------------------------------------------

    def embed(self, params, batch_stats, images, dropout_key):
        """Training-mode forward: (embeddings, updated BatchNorm statistics)."""
        model = nnx.merge(self.graphdef, params, batch_stats)
        embeddings = model(normalize_images(images, self.dtype), train=True, dropout_key=dropout_key)
        return embeddings, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    def _micro_major(self, x: jax.Array) -> jax.Array:
        """[B, ...] -> [K, B/K, ...] where micro-batch k takes slice k of every device's
        rows, so each micro-batch is spread over all devices and nothing moves."""
        n, k = self.head.num_shards, self.grad_accum_steps
        rest = x.shape[1:]
        x = x.reshape(n, k, x.shape[0] // (n * k), *rest).swapaxes(0, 1)
        return x.reshape(k, -1, *rest)

    def __call__(self, state: TrainState, images: jax.Array, labels: jax.Array):
        """One step on ``images`` uint8 [B, H, W, 3] and ``labels`` int32 [B] (sharded on data)."""
        k_micro = self.grad_accum_steps
        head = self.head
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        sample_key, dropout_key = jax.random.split(key)

        images, labels = self._micro_major(images), self._micro_major(labels)
        sample = head.sample(labels.reshape(-1), sample_key)
        rows, state_rows = head.gather(state.head, sample)
        # Per-shard target blocks, split the same way as the batch: [shards, K, B/K].
        targets = sample.target.reshape(head.num_shards, k_micro, -1)

        def micro_step(carry, k):
            batch_stats, g_params, g_rows, loss, accuracy = carry
            embed = lambda p: self.embed(p, batch_stats, images[k], jax.random.fold_in(dropout_key, k))
            embeddings, backward, batch_stats = jax.vjp(embed, state.params, has_aux=True)
            (loss_k, metrics), (g_emb, g_rows_k) = jax.value_and_grad(head.loss, argnums=(0, 1), has_aux=True)(
                embeddings, rows, sample._replace(target=targets[:, k].reshape(-1))
            )
            (g_params_k,) = backward(g_emb)
            carry = (
                batch_stats,
                jax.tree.map(jnp.add, g_params, g_params_k),
                g_rows + g_rows_k,
                loss + loss_k,
                accuracy + metrics["accuracy"],
            )
            return carry, metrics

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        carry = (state.batch_stats, zeros, jnp.zeros_like(rows), jnp.zeros(()), jnp.zeros(()))
        if k_micro == 1:
            carry, head_metrics = micro_step(carry, 0)
        else:
            carry, per_micro = jax.lax.scan(micro_step, carry, jnp.arange(k_micro))
            head_metrics = {
                "sampled_classes": per_micro["sampled_classes"][0],  # one sample per step
                "invalid_labels": per_micro["invalid_labels"].sum(),
            }
        batch_stats, g_params, g_rows, loss, accuracy = carry
        g_params = jax.tree.map(lambda g: g / k_micro, g_params)

        updates, opt_state = self.tx.update(g_params, state.opt_state, state.params)
        new_state = TrainState(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
            head=head.apply_gradients(state.head, sample, rows, state_rows, g_rows / k_micro),
            rng=state.rng,
        )
        metrics = {
            "loss": loss / k_micro,
            "accuracy": accuracy / k_micro,
            "lr": jnp.asarray(self.schedule(state.step), jnp.float32),
            "grad_norm": optax.tree.norm(g_params),
            "head_grad_norm": optax.tree.norm(g_rows) / k_micro,
            "sampled_classes": head_metrics["sampled_classes"],
            "invalid_labels": head_metrics["invalid_labels"],
        }
        return new_state, metrics

    def jit(self, params: dict, batch_stats: dict):
        """The step under ``jax.jit`` with explicit shardings; the state is donated."""
        state = self.state_shardings(params, batch_stats)
        batch, whole = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
        return jax.jit(
            self.__call__,
            in_shardings=(state, batch, batch),
            out_shardings=(state, whole),
            donate_argnums=(0,),
        )
