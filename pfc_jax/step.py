"""The train step: backbone data-parallel on the mesh, the Partial FC head, both updates.

``TrainStep.__call__(state, images, labels) -> (state, metrics)`` is pure; compile it
with :meth:`TrainStep.jit` (explicit shardings, the state donated). The step's PRNG key
is ``fold_in(state.rng, state.step)``, so a run restarted from a checkpoint draws the
same class samples and dropout masks as an uninterrupted one.

With an EMA (``ema_momentum``), the state also holds an exponential moving average of the
backbone's parameters and BatchNorm statistics, updated at the end of every step
(``ema = m * ema + (1 - m) * new``). A head with ``key_encoder = "ema"`` (DCQ) gets the
EMA's embeddings of the batch (in inference mode, no gradient) as ``keys``.

Gradient accumulation splits the global batch into ``grad_accum_steps`` micro-batches,
each spread over all devices. The class sample is drawn once per step from the labels of
the whole global batch, every micro-batch uses it, and the gradients of the backbone and
of the sampled rows are averaged; without BatchNorm this equals one step on the whole
batch (BatchNorm statistics are per micro-batch, as in PyTorch).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pfc_jax import models, sharding
from pfc_jax.heads import Head, uses_embeddings
from pfc_jax.inference import normalize_images


class TrainState(NamedTuple):
    """Everything a run needs to continue exactly (besides the data position)."""

    step: jax.Array  # int32 []: optimizer steps taken
    params: dict  # backbone parameters
    batch_stats: dict  # backbone BatchNorm running statistics
    opt_state: Any  # backbone optimizer state
    head: Any  # the head's state (Partial FC: class centers and their optimizer state)
    rng: jax.Array  # uint32 key data; the step key is fold_in(rng, step)
    ema: Any = None  # {"params", "batch_stats"}: the backbone's moving average, or None


def _shape(x) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """One optimizer step of backbone + head.

    Build it with :meth:`for_model`. The abstract state (shapes, dtypes, shardings) is
    computed once, from the backbone's abstract variables and the head.

    Attributes:
      graphdef: the backbone's NNX graph (``nnx.split(model, nnx.Param, nnx.BatchStat)``).
      backbone: ``(params, batch_stats)`` of the backbone as ``ShapeDtypeStruct`` trees.
      head: the head (see :class:`pfc_jax.heads.Head`); its optimizer is its own.
      tx: the backbone's optax transform.
      schedule: the learning-rate schedule (for the ``lr`` metric).
      grad_accum_steps: micro-batches per step.
      dtype: backbone compute dtype.
      ema_momentum: keep an EMA of the backbone with this momentum (None: no EMA).
    """

    graphdef: Any
    backbone: tuple[Any, Any]
    head: Head
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    grad_accum_steps: int = 1
    dtype: Any = jnp.float32
    ema_momentum: float | None = None

    def __post_init__(self):
        if getattr(self.head, "key_encoder", None) == "ema" and self.ema_momentum is None:
            raise ValueError("the head's keys come from the backbone's EMA: give TrainStep an ema_momentum")
        if self.ema_momentum is not None and not 0.0 <= self.ema_momentum < 1.0:
            raise ValueError(f"ema_momentum must be in [0, 1), got {self.ema_momentum}")

    @classmethod
    def for_model(cls, model: nnx.Module, head: Head, tx, schedule, **kw) -> TrainStep:
        """The train step of an NNX backbone; only its structure and shapes are read, so
        an abstract one (``nnx.eval_shape``) does."""
        graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        backbone = jax.tree.map(_shape, (nnx.to_pure_dict(params), nnx.to_pure_dict(batch_stats)))
        return cls(graphdef, backbone, head, tx, schedule, **kw)

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
            # A copy (not the same buffers: the state is donated), as the paper's key
            # encoder starts equal to the query encoder.
            ema=None
            if self.ema_momentum is None
            else jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats}),
        )

    @functools.cached_property
    def _state_shapes(self) -> TrainState:
        return jax.eval_shape(self.init_state, *self.backbone, jax.random.key(0))

    @functools.cached_property
    def state_shardings(self) -> TrainState:
        """Backbone and its optimizer replicated; the head's state as the head lays it out."""
        shapes = self._state_shapes
        whole = sharding.replicated(self.mesh)
        replicate = lambda tree: jax.tree.map(lambda _: whole, tree)
        return TrainState(
            step=whole,
            params=replicate(shapes.params),
            batch_stats=replicate(shapes.batch_stats),
            opt_state=replicate(shapes.opt_state),
            head=self.head.state_shardings(),
            rng=whole,
            ema=None if shapes.ema is None else replicate(shapes.ema),
        )

    @functools.cached_property
    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state, for restoring a checkpoint."""
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), self._state_shapes, self.state_shardings
        )

    def init(self, params: dict, batch_stats: dict, key: jax.Array) -> TrainState:
        """:meth:`init_state` placed on the mesh (each device makes only its own rows)."""
        return models.run_once(self.init_state, params, batch_stats, key, out_shardings=self.state_shardings)

    # ---- the step ------------------------------------------------------------------------

    def embed(self, params, batch_stats, images, dropout_key):
        """Training-mode forward: (embeddings, updated BatchNorm statistics)."""
        model = nnx.merge(self.graphdef, params, batch_stats)
        embeddings = model(normalize_images(images, self.dtype), train=True, dropout_key=dropout_key)
        return embeddings, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))

    def key_embed(self, ema: dict, images: jax.Array) -> jax.Array:
        """The EMA's embeddings of ``images`` in inference mode, without gradient."""
        model = nnx.merge(self.graphdef, ema["params"], ema["batch_stats"])
        return jax.lax.stop_gradient(model(normalize_images(images, self.dtype), train=False).astype(jnp.float32))

    def _update_ema(self, state: TrainState) -> TrainState:
        """``ema = m * ema + (1 - m) * online``, parameters and BatchNorm statistics."""
        m = self.ema_momentum
        online = {"params": state.params, "batch_stats": state.batch_stats}
        return state._replace(ema=jax.tree.map(lambda e, x: m * e + (1.0 - m) * x, state.ema, online))

    def _micro_major(self, x: jax.Array) -> jax.Array:
        """[B, ...] -> [K, B/K, ...] where micro-batch k takes slice k of every device's
        rows, so each micro-batch is spread over all devices and nothing moves."""
        n, k = sharding.num_shards(self.mesh), self.grad_accum_steps
        rest = x.shape[1:]
        x = x.reshape(n, k, x.shape[0] // (n * k), *rest).swapaxes(0, 1)
        return x.reshape(k, -1, *rest)

    def _update_backbone(self, state: TrainState, grads, batch_stats) -> TrainState:
        """The backbone's optimizer step (the head's state is left as it is)."""
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        return state._replace(
            params=optax.apply_updates(state.params, updates), batch_stats=batch_stats, opt_state=opt_state
        )

    def __call__(self, state: TrainState, images: jax.Array, labels: jax.Array):
        """One step on ``images`` uint8 [B, H, W, 3] and ``labels`` int32 [B] (sharded on data)."""
        k_micro = self.grad_accum_steps
        head = self.head
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        head_key, dropout_key = jax.random.split(key)

        # The head sees the global batch in micro-batch-major order: micro-batch k is
        # positions [k * B/K, (k + 1) * B/K) of `labels` (see Head.prepare).
        images, labels = self._micro_major(images), self._micro_major(labels)
        inputs = {}
        if getattr(head, "key_encoder", None) == "ema":
            # One micro-batch at a time, as the query encoder: the memory stays a micro-batch's.
            keys = (
                jax.lax.map(lambda x: self.key_embed(state.ema, x), images)
                if k_micro > 1
                else (self.key_embed(state.ema, images[0])[None])
            )
            inputs["keys"] = keys.reshape(-1, keys.shape[-1])
        head_params, context, step_metrics = head.prepare(state.head, labels.reshape(-1), head_key, **inputs)
        keep_embeddings = uses_embeddings(head)

        def micro_step(carry, k):
            batch_stats, g_params, g_head, loss = carry
            embed = lambda p: self.embed(p, batch_stats, images[k], jax.random.fold_in(dropout_key, k))
            embeddings, backward, batch_stats = jax.vjp(embed, state.params, has_aux=True)
            (loss_k, metrics_k), (g_emb, g_head_k) = jax.value_and_grad(head.micro_loss, argnums=(2, 0), has_aux=True)(
                head_params, context, embeddings, k
            )
            (g_params_k,) = backward(g_emb)
            add = lambda a, b: jax.tree.map(jnp.add, a, b)
            kept = jax.lax.stop_gradient(embeddings) if keep_embeddings else None
            return (batch_stats, add(g_params, g_params_k), add(g_head, g_head_k), loss + loss_k), (metrics_k, kept)

        zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
        carry = (state.batch_stats, zeros(state.params), zeros(head_params), jnp.zeros(()))
        if k_micro == 1:
            (batch_stats, g_params, g_head, loss), (micro_metrics, kept) = micro_step(carry, 0)
        else:
            (batch_stats, g_params, g_head, loss), (per_micro, kept) = jax.lax.scan(
                micro_step, carry, jnp.arange(k_micro)
            )
            micro_metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), per_micro)
        # The head's update may write the step's embeddings (micro-batch-major, like the labels).
        written = {"embeddings": kept.reshape(-1, kept.shape[-1])} if keep_embeddings else {}
        mean = lambda tree: jax.tree.map(lambda g: g / k_micro, tree)
        g_params, g_head = mean(g_params), mean(g_head)

        new_state = self._update_backbone(state, g_params, batch_stats)
        new_head = head.update(state.head, head_params, context, g_head, **written)
        new_state = new_state._replace(step=state.step + 1, head=new_head)
        ema_metrics = {}
        if self.ema_momentum is not None:
            new_state = self._update_ema(new_state)
            gap = jax.tree.map(jnp.subtract, new_state.ema["params"], new_state.params)
            ema_metrics["ema_distance"] = optax.tree.norm(gap) / optax.tree.norm(new_state.params)
        metrics = {
            "loss": loss / k_micro,
            **micro_metrics,  # per micro-batch figures (accuracy): their mean
            **step_metrics,  # per step figures (sampled_classes, invalid_labels)
            "lr": jnp.asarray(self.schedule(state.step), jnp.float32),
            "grad_norm": optax.tree.norm(g_params),
            "head_grad_norm": optax.tree.norm(g_head),
            **ema_metrics,  # relative distance of the EMA's parameters from the online ones
        }
        return new_state, metrics

    def jit(self):
        """The step under ``jax.jit`` with explicit shardings; the state is donated."""
        state = self.state_shardings
        batch, whole = sharding.batch_sharding(self.mesh), sharding.replicated(self.mesh)
        return jax.jit(
            self.__call__,
            in_shardings=(state, batch, batch),
            out_shardings=(state, whole),
            donate_argnums=(0,),
        )

    # ---- the backbone alone (benchmark) ----------------------------------------------------

    def backbone_step(self, state: TrainState, images: jax.Array):
        """The backbone's part of :meth:`__call__` alone: forward, backward of a stand-in
        loss (mean squared embedding) and its optimizer update; ``state.head`` may be None.
        What the head adds to a step is the difference between the two."""

        def loss(params):
            embeddings, stats = self.embed(params, state.batch_stats, images, jax.random.key(0))
            return jnp.mean(jnp.square(embeddings.astype(jnp.float32))), stats

        grads, batch_stats = jax.grad(loss, has_aux=True)(state.params)
        return self._update_backbone(state, grads, batch_stats)._replace(step=state.step + 1), {}

    def jit_backbone_step(self):
        """:meth:`backbone_step` compiled like :meth:`jit`, for a state whose head is None."""
        state = self.state_shardings._replace(head=None)
        batch = sharding.batch_sharding(self.mesh)
        return jax.jit(
            self.backbone_step, in_shardings=(state, batch), out_shardings=(state, None), donate_argnums=(0,)
        )
