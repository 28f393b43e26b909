"""Partial FC: a margin-softmax head whose class centers are sharded over all devices.

One head step, all inside one ``jit`` (see ``docs/design.md``, "The train step"):

1. ``sample``: each shard picks its columns (every positive it owns + random negatives).
2. ``gather``: the picked rows of the centers and of their optimizer state.
3. ``loss``: all-gather the embeddings, normalized logits against the local rows, margin
   on the target, softmax cross-entropy distributed over shards in fp32. Differentiable
   w.r.t. the embeddings and the gathered rows only: no C x D gradient ever exists.
4. ``apply_gradients``: the optimizer on the gathered rows, scattered back in place.

:meth:`PartialFC.step` chains them and returns the gradient w.r.t. the embeddings, for
the backbone's backward pass. The trainer calls them through the head contract
(:class:`pfc_jax.heads.Head`: ``prepare`` = sample + gather, ``micro_loss`` = loss on one
micro-batch, ``update`` = apply_gradients); the benchmark calls :meth:`PartialFC.step`.

Global arrays produced per shard (the sample, the gathered rows) are laid out as the
shards' blocks concatenated along axis 0 and sharded on ``data``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from pfc_jax import heads, models, optim, sharding
from pfc_jax.heads import margins, sampler
from pfc_jax.heads.margins import CombinedMargin
from pfc_jax.optim import SparseRows, write_index

PyTree = Any
_AXIS = sharding.DATA_AXIS
_ROWS = P(_AXIS, None)
_SPLIT = P(_AXIS)


class HeadState(NamedTuple):
    """Class centers f32[C_pad, D] (rows sharded) and their optimizer state."""

    centers: jax.Array
    opt_state: PyTree


class CountedHeadState(NamedTuple):
    """:class:`HeadState` plus ``sampled`` i32[C_pad] (rows sharded): how many steps each
    class's center was in the sample, i.e. updated (``count_samples=True``)."""

    centers: jax.Array
    opt_state: PyTree
    sampled: jax.Array


class Sample(NamedTuple):
    """Per-shard :class:`~pfc_jax.heads.sampler.ShardSample` blocks, concatenated.

    ``index`` and ``active`` are [num_shards * num_sample], ``target`` is
    [num_shards * global_batch]; all sharded on ``data``.
    """

    index: jax.Array
    active: jax.Array
    target: jax.Array


def _l2_normalize(x: jax.Array) -> jax.Array:
    # rsqrt of a floored squared norm: zero rows (padding) give zeros and finite
    # gradients, where x / max(norm, eps) would give 0 * inf in the backward pass.
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-24))


@dataclasses.dataclass(frozen=True)
class PartialFC:
    """Sharded class centers with sampled margin softmax and sparse row updates.

    Attributes:
      mesh: the 1-D ``data`` mesh (see :mod:`pfc_jax.sharding`).
      num_classes: number of identities.
      embedding_dim: D.
      sample_rate: fraction of each shard's centers used per step (positives included);
        1.0 is the exact full softmax, 0.0 positives only.
      margin: the margin applied to target logits.
      optimizer: optax transform for the centers (per-element; see :mod:`pfc_jax.optim`).
      logits_dtype: dtype of the normalized operands of the logits matmul (accumulation
        is always fp32). bfloat16 halves its cost on accelerators at ~3 digits of cosine.
      count_samples: keep a per-class count of the steps its center was sampled
        (:class:`CountedHeadState`; the quality study's staleness figures read it).
    """

    mesh: Mesh
    num_classes: int
    embedding_dim: int
    sample_rate: float
    margin: CombinedMargin
    optimizer: optax.GradientTransformation
    logits_dtype: Any = jnp.float32
    count_samples: bool = False

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1] (1 = full softmax), got {self.sample_rate}")
        if tuple(self.mesh.axis_names) != (_AXIS,):
            raise ValueError(
                f"PartialFC needs the 1-D mesh from pfc_jax.sharding.make_mesh "
                f"(axis {_AXIS!r}), got axes {self.mesh.axis_names}"
            )

    # ---- sizes -------------------------------------------------------------------

    @property
    def num_shards(self) -> int:
        return sharding.num_shards(self.mesh)

    @property
    def num_classes_padded(self) -> int:
        return sharding.padded_num_classes(self.num_classes, self.num_shards)

    @property
    def num_local(self) -> int:
        return self.num_classes_padded // self.num_shards

    def num_sample(self, global_batch: int) -> int:
        """Columns drawn per shard per step for a global batch of ``global_batch``."""
        return sampler.num_sample(self.num_local, self.sample_rate, global_batch)

    @property
    def takes_all_rows(self) -> bool:
        """Rate high enough to use every row: the gather and scatter are skipped."""
        return sampler.takes_all_rows(self.num_local, self.sample_rate)

    @property
    def _sparse(self) -> SparseRows:
        return SparseRows(self.optimizer)

    def _shard_map(self, f, in_specs, out_specs):
        return jax.shard_map(f, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

    def _check_batch(self, global_batch: int) -> None:
        if global_batch % self.num_shards:
            raise ValueError(
                f"global batch {global_batch} is not divisible by the {self.num_shards} "
                f"devices of the mesh; use a multiple of {self.num_shards}"
            )

    # ---- state -------------------------------------------------------------------

    def state_shardings(self) -> HeadState:
        """NamedShardings of :class:`HeadState`: per-row leaves split by rows, the rest replicated."""
        shape = jax.ShapeDtypeStruct((self.num_classes_padded, self.embedding_dim), jnp.float32)
        opt_shape = jax.eval_shape(self.optimizer.init, shape)
        is_row = SparseRows.row_leaves(opt_shape, shape.shape)
        rows, whole = sharding.row_sharding(self.mesh), sharding.replicated(self.mesh)
        opt = jax.tree.map(lambda r: rows if r else whole, is_row)
        return self._state(rows, opt, jax.sharding.NamedSharding(self.mesh, _SPLIT))

    def _state(self, centers, opt_state, sampled):
        """The state type this head keeps (``sampled`` is dropped without counting)."""
        return CountedHeadState(centers, opt_state, sampled) if self.count_samples else HeadState(centers, opt_state)

    def init_state(self, key: jax.Array, std: float = 0.01) -> HeadState:
        """Centers ~ N(0, std^2) (padding rows zero) and fresh optimizer state.

        Pure; under ``jax.jit`` with :meth:`state_shardings` each device generates only
        its own rows. A class's initial center depends on the key alone, not on the
        device count.
        """
        shape = (self.num_classes_padded, self.embedding_dim)
        centers = std * jax.random.normal(key, shape, jnp.float32)
        real = jnp.arange(shape[0])[:, None] < self.num_classes
        centers = jnp.where(real, centers, 0.0)
        return self._state(centers, self.optimizer.init(centers), jnp.zeros(shape[:1], jnp.int32))

    def init(self, key: jax.Array, std: float = 0.01) -> HeadState:
        """:meth:`init_state`, compiled and sharded."""
        return jax.jit(functools.partial(self.init_state, std=std), out_shardings=self.state_shardings())(key)

    def init_from_centers(self, centers: ArrayLike) -> HeadState:
        """A head state that starts from given class centers (fine-tuning, imported weights).

        Args:
          centers: [num_classes, embedding_dim], numpy or jax, any real dtype (stored as
            float32): one row per class, in label order, without padding.

        Returns:
          :class:`HeadState` with the centers padded with zero rows to
          ``num_classes_padded``, a fresh optimizer state (as :meth:`init` gives), both
          placed with :meth:`state_shardings`: each device holds only its own rows.

        Raises:
          ValueError: a wrong shape or a non-finite value, saying which and what to pass.

        Usage::

            head = PartialFC(mesh, num_classes=C, embedding_dim=D, ...)
            state = head.init_from_centers(np.load("centers.npy"))  # f32[C, D]
            step = head.jit_step()
            state, grad_embeddings, metrics = step(state, embeddings, labels, key)

        Each device receives only its own rows from the host copy; with several processes,
        every process passes the same full array.
        """
        host = np.asarray(centers)
        expected = (self.num_classes, self.embedding_dim)
        if host.ndim != 2:
            raise ValueError(
                f"init_from_centers: centers must be a 2-D array [num_classes, embedding_dim] = "
                f"{list(expected)}, got shape {list(host.shape)}"
            )
        rows, dim = host.shape
        if rows != self.num_classes:
            padded = (
                f" ([{self.num_classes_padded}, D] is the padded HeadState.centers: pass its first "
                f"{self.num_classes} rows)"
                if rows == self.num_classes_padded
                else ""
            )
            raise ValueError(
                f"init_from_centers: centers has {rows} rows but the head has num_classes={self.num_classes}; "
                f"pass one row per class{padded}, or build the head with num_classes={rows}"
            )
        if dim != self.embedding_dim:
            raise ValueError(
                f"init_from_centers: centers has dimension {dim} but the head has "
                f"embedding_dim={self.embedding_dim}; pass centers of the backbone's embedding size, "
                f"or build the head with embedding_dim={dim}"
            )
        if not np.issubdtype(host.dtype, np.number) or np.issubdtype(host.dtype, np.complexfloating):
            raise ValueError(f"init_from_centers: centers must be real numbers, got dtype {host.dtype}")
        with np.errstate(over="ignore"):  # too large for float32 -> inf, refused below
            host = host.astype(np.float32, copy=False)
        finite = np.isfinite(host).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(
                f"init_from_centers: centers has non-finite values (nan or inf, or too large for "
                f"float32) in {bad.size} rows, first row {int(bad[0])}; replace those rows "
                f"(e.g. with head.init's random rows) before starting"
            )

        shardings = self.state_shardings()
        padded_shape = (self.num_classes_padded, self.embedding_dim)

        def block(index):
            start, stop, _ = index[0].indices(padded_shape[0])
            out = np.zeros((stop - start, padded_shape[1]), np.float32)
            real = min(stop, self.num_classes)
            if real > start:
                out[: real - start] = host[start:real]
            return out[:, index[1]]

        placed = jax.make_array_from_callback(padded_shape, shardings.centers, block)
        opt_state = jax.jit(self.optimizer.init, out_shardings=shardings.opt_state)(placed)
        sampled = (
            jax.device_put(np.zeros(padded_shape[:1], np.int32), shardings.sampled) if self.count_samples else None
        )
        return self._state(placed, opt_state, sampled)

    # ---- the four stages -----------------------------------------------------------

    def sample(self, labels: jax.Array, key: jax.Array) -> Sample:
        """Every shard's columns for the global batch's ``labels`` (sharded on ``data``)."""
        global_batch = labels.shape[0]
        self._check_batch(global_batch)

        def per_shard(labels, key):
            labels = jax.lax.all_gather(labels, _AXIS, tiled=True)
            s = sampler.sample_shard(
                key,
                labels,
                jax.lax.axis_index(_AXIS),
                num_local=self.num_local,
                num_classes=self.num_classes,
                rate=self.sample_rate,
                global_batch=global_batch,
            )
            return Sample(*s)

        return self._shard_map(per_shard, (_SPLIT, P()), Sample(_SPLIT, _SPLIT, _SPLIT))(labels, key)

    def gather(self, state: HeadState, sample: Sample):
        """The sampled rows of the centers and of their per-row optimizer state."""
        if self.takes_all_rows:
            # The sample is every row in order: the blocks already are the centers.
            return state.centers, state.opt_state
        is_row = SparseRows.row_leaves(state.opt_state, state.centers.shape)
        state_specs = jax.tree.map(lambda r: _ROWS if r else P(), is_row)

        def per_shard(centers, opt_state, index):
            return SparseRows.gather(centers, opt_state, is_row, index)

        return self._shard_map(per_shard, (_ROWS, state_specs, _SPLIT), (_ROWS, state_specs))(
            state.centers, state.opt_state, sample.index
        )

    def loss(self, embeddings: jax.Array, rows: jax.Array, sample: Sample):
        """Mean margin-softmax cross-entropy over the global batch, and metrics.

        Differentiable w.r.t. ``embeddings`` [B_g, D] (sharded on ``data``, any float
        dtype) and ``rows`` (from :meth:`gather`). Returns ``(loss, metrics)``: the fp32
        loss; ``accuracy`` (top-1 among the sampled classes), ``invalid_labels`` (labels
        outside ``[0, num_classes)``) and ``sampled_classes`` (columns in the softmax).
        """
        self._check_batch(embeddings.shape[0])
        margin, dtype = self.margin, self.logits_dtype

        def per_shard(embeddings, rows, active, target):
            x = jax.lax.all_gather(embeddings, _AXIS, tiled=True).astype(jnp.float32)
            x = _l2_normalize(x).astype(dtype)
            w = _l2_normalize(rows.astype(jnp.float32)).astype(dtype)
            cos = jnp.einsum(
                "bd,nd->bn",
                x,
                w,
                preferred_element_type=jnp.float32,
                precision=jax.lax.Precision.HIGHEST,
            )
            cos = jnp.clip(cos, -1.0, 1.0)
            is_target = target[:, None] == jnp.arange(rows.shape[0])[None, :]
            logits = jnp.where(active[None, :], margin(cos, is_target), -jnp.inf)

            # Distributed log-sum-exp: the row max is only a shift (no gradient needed).
            row_max = jax.lax.pmax(jax.lax.stop_gradient(jnp.max(logits, axis=1)), _AXIS)
            sum_exp = jax.lax.psum(jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1), _AXIS)
            target_logit = jax.lax.psum(jnp.sum(jnp.where(is_target, logits, 0.0), axis=1), _AXIS)
            per_example = jnp.log(sum_exp) + row_max - target_logit

            # Metrics (no gradient): top-1 among the sampled columns, label sanity.
            cos_ = jax.lax.stop_gradient(jnp.where(active[None, :], cos, -jnp.inf))
            best = jax.lax.pmax(jnp.max(cos_, axis=1), _AXIS)
            target_cos = jax.lax.psum(jnp.sum(jnp.where(is_target, cos_, 0.0), axis=1), _AXIS)
            has_target = jax.lax.psum(jnp.any(is_target, axis=1).astype(jnp.int32), _AXIS)
            metrics = {
                "accuracy": jnp.mean(((target_cos >= best) & (has_target > 0)).astype(jnp.float32)),
                "invalid_labels": jnp.sum(has_target == 0),
                "sampled_classes": jax.lax.psum(jnp.sum(active), _AXIS),
            }
            return jnp.mean(per_example), metrics

        return self._shard_map(per_shard, (_ROWS, _ROWS, _SPLIT, _SPLIT), (P(), P()))(
            embeddings, rows, sample.active, sample.target
        )

    def apply_gradients(
        self,
        state: HeadState,
        sample: Sample,
        rows: jax.Array,
        state_rows: PyTree,
        grads: jax.Array,
    ) -> HeadState:
        """Optimizer step on the gathered rows, written back in place (only active ones)."""
        sparse = self._sparse
        new_rows, new_state_rows = sparse.update(grads, rows, state_rows)
        is_row = SparseRows.row_leaves(state.opt_state, state.centers.shape)
        if self.takes_all_rows:
            # A dense update of the donated buffers; padding rows keep their values.
            keep = sample.active[:, None]
            pick = lambda new, old, row: jnp.where(keep, new, old) if row else new
            return self._state(
                jnp.where(keep, new_rows, state.centers),
                jax.tree.map(pick, new_state_rows, state.opt_state, is_row),
                state.sampled + sample.active if self.count_samples else None,
            )
        state_specs = jax.tree.map(lambda r: _ROWS if r else P(), is_row)
        num_local = self.num_local

        def per_shard(centers, opt_state, index, active, new_rows, new_state_rows):
            where = write_index(index, active, num_local)
            return SparseRows.scatter(centers, opt_state, is_row, where, new_rows, new_state_rows)

        centers, opt_state = self._shard_map(
            per_shard,
            (_ROWS, state_specs, _SPLIT, _SPLIT, _ROWS, state_specs),
            (_ROWS, state_specs),
        )(state.centers, state.opt_state, sample.index, sample.active, new_rows, new_state_rows)
        sampled = None
        if self.count_samples:

            def count(sampled, index, active):
                return sampled.at[write_index(index, active, num_local)].add(1, mode="drop")

            sampled = self._shard_map(count, (_SPLIT, _SPLIT, _SPLIT), _SPLIT)(
                state.sampled, sample.index, sample.active
            )
        return self._state(centers, opt_state, sampled)

    # ---- the trainer's contract (pfc_jax.heads.Head) ----------------------------------

    def prepare(self, state: HeadState, labels: jax.Array, key: jax.Array):
        """Sample and gather: ``(rows, (sample, state_rows), metrics)``."""
        sample = self.sample(labels, key)
        rows, state_rows = self.gather(state, sample)
        metrics = {
            "sampled_classes": jnp.sum(sample.active),
            "invalid_labels": jnp.sum((labels < 0) | (labels >= self.num_classes)),
        }
        return rows, (sample, state_rows), metrics

    def micro_loss(self, rows: jax.Array, context, embeddings: jax.Array, micro):
        """:meth:`loss` of micro-batch ``micro``: its examples' targets are slice ``micro``
        of every shard's target block (see :meth:`pfc_jax.heads.Head.prepare`)."""
        sample, _ = context
        per_shard = sample.target.reshape(self.num_shards, -1)
        k = per_shard.shape[1] // embeddings.shape[0]  # micro-batches per step
        target = per_shard.reshape(self.num_shards, k, -1)[:, micro].reshape(-1)
        loss, metrics = self.loss(embeddings, rows, sample._replace(target=target))
        return loss, {"accuracy": metrics["accuracy"]}

    def update(self, state: HeadState, rows: jax.Array, context, grads: jax.Array) -> HeadState:
        sample, state_rows = context
        return self.apply_gradients(state, sample, rows, state_rows, grads)

    def describe(self, global_batch: int) -> str:
        return f"{self.num_local:,} centers each, {self.num_sample(global_batch):,} sampled per step"

    def class_weights(self, state: HeadState) -> jax.Array:
        """f32[num_classes, D]: the stored weight of every class, in label order."""
        return state.centers[: self.num_classes]

    def sample_counts(self, state: HeadState) -> jax.Array | None:
        """i32[num_classes]: steps each class was sampled (None without ``count_samples``)."""
        return state.sampled[: self.num_classes] if self.count_samples else None

    # ---- the whole step --------------------------------------------------------------

    def step(self, state: HeadState, embeddings: jax.Array, labels: jax.Array, key: jax.Array):
        """Sample, gather, loss and gradients, sparse update. Call under ``jax.jit``.

        Args:
          state: centers and their optimizer state (donate them).
          embeddings: [B_g, D] backbone outputs, sharded on ``data``.
          labels: i32[B_g] class labels, sharded on ``data``.
          key: this step's key (fold the step number in).

        Returns:
          ``(new_state, grad_embeddings, metrics)``; ``metrics["loss"]`` is the loss.
        """
        return heads.step(self, state, embeddings, labels, key)

    def jit_step(self):
        """:meth:`step` compiled with explicit shardings and the state donated."""
        batch = sharding.batch_sharding(self.mesh)
        state = self.state_shardings()
        whole = sharding.replicated(self.mesh)
        return jax.jit(
            self.step,
            in_shardings=(state, batch, batch, whole),
            out_shardings=(state, batch, whole),
            donate_argnums=(0,),
        )


# ---- from a run's config ---------------------------------------------------------------


def from_config(config, mesh: Mesh, *, num_classes: int, learning_rate) -> PartialFC:
    """The head ``config.head`` describes (``name = "partial_fc"``)."""
    h = config.head
    return PartialFC(
        mesh,
        num_classes=num_classes,
        embedding_dim=config.model.embedding_dim,
        sample_rate=h.sample_rate,
        margin=CombinedMargin(**h.margin.to_dict()),
        optimizer=optim.head_optimizer(config, learning_rate),
        logits_dtype=models.DTYPES[h.logits_dtype],
        count_samples=h.count_samples,
    )


def check_config(c) -> None:
    """The ``config.head`` fields of Partial FC (``c``: a config_validation.Check)."""
    c.in_range("head.sample_rate", 0.0, 1.0)
    c.in_range("head.weight_decay", 0.0, float("inf"))
    c.choice("head.logits_dtype", models.DTYPES)
    c.that(
        isinstance(c.config.head.count_samples, bool),
        "head.count_samples",
        c.config.head.count_samples,
        "must be True or False",
    )
    margins.check_config(c)


ENTRY = heads.HeadEntry(build=from_config, check=check_config)
