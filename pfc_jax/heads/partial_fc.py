"""Partial FC: a margin-softmax head whose class centers are sharded over all devices.

One head step, all inside one ``jit`` (see ``docs/design.md``, "The train step"):

1. ``sample``: each shard picks its columns (every positive it owns + random negatives).
2. ``loss``: all-gather the embeddings, cosines against the local sampled rows (read one
   block at a time, :mod:`pfc_jax.heads.row_blocks`), margin on the target, softmax
   cross-entropy distributed over shards in fp32. Differentiable w.r.t. the embeddings
   and an offset on the cosines: the loss's gradient w.r.t. the cosines,
   ``[B_g, num_sample]``, is all the centers' update needs, so no gradient of the rows
   (let alone a C x D one) is ever materialized.
3. ``apply_gradients``: block by block, each block's row gradient ``G^T x`` through the
   normalization, the optimizer on the block's rows and optimizer rows, written straight
   back into the donated state.

:meth:`PartialFC.step` chains them and returns the gradient w.r.t. the embeddings, for
the backbone's backward pass. The trainer calls them through the head contract
(:class:`pfc_jax.heads.Head`: ``prepare`` = sample, ``micro_loss`` = loss on one
micro-batch, ``update`` = apply_gradients); the benchmark calls :meth:`PartialFC.step`.

Global arrays produced per shard (the sample, the cosines' gradient) are laid out as the
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
from pfc_jax.heads import margins, row_blocks, sampler, storage
from pfc_jax.heads.margins import CombinedMargin
from pfc_jax.optim import SparseRows, write_index

PyTree = Any
_AXIS = sharding.DATA_AXIS
_ROWS = P(_AXIS, None)
_SPLIT = P(_AXIS)


class HeadState(NamedTuple):
    """Class centers [C_pad, D] (rows sharded; float32, or bfloat16 with
    ``storage_dtype``) and their optimizer state."""

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

    ``index`` and ``active`` are [num_shards * columns] (``columns``: ``num_sample``
    padded with inactive columns to whole row blocks), ``target`` is
    [num_shards * global_batch]; all sharded on ``data``.
    """

    index: jax.Array
    active: jax.Array
    target: jax.Array


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
      storage_dtype: "float32" or "bfloat16": how the centers and their optimizer rows
        are stored (bfloat16 halves the memory and is kept as its bits, uint16; the
        arithmetic is float32 either way; :mod:`pfc_jax.heads.storage`).
      storage_rounding: how updated rows are rounded to a bfloat16 storage: "nearest",
        or "stochastic" (unbiased: updates below half a bfloat16 step survive on average).
      block_rows: rows per block when the sampled rows are processed (0: a default,
        :data:`pfc_jax.heads.row_blocks.DEFAULT_BLOCK_ROWS`); memory vs loop overhead.
    """

    mesh: Mesh
    num_classes: int
    embedding_dim: int
    sample_rate: float
    margin: CombinedMargin
    optimizer: optax.GradientTransformation
    logits_dtype: Any = jnp.float32
    count_samples: bool = False
    storage_dtype: str = "float32"
    storage_rounding: str = "stochastic"
    block_rows: int = 0

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in [0, 1] (1 = full softmax), got {self.sample_rate}")
        if self.storage_dtype not in storage.STORED:
            raise ValueError(f"storage_dtype must be one of {tuple(storage.STORED)}, got {self.storage_dtype!r}")
        if self.storage_rounding not in storage.ROUNDINGS:
            raise ValueError(f"storage_rounding must be one of {storage.ROUNDINGS}, got {self.storage_rounding!r}")
        if self.block_rows < 0:
            raise ValueError(f"block_rows must be >= 0 (0: the default), got {self.block_rows}")
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
    def _sparse(self) -> SparseRows:
        return SparseRows(self.optimizer)

    def _shard_map(self, f, in_specs, out_specs):
        return jax.shard_map(f, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs)

    @property
    def _stored(self) -> np.dtype:
        return storage.stored_dtype(self.storage_dtype)

    def _narrow_rows(self, a: jax.Array) -> jax.Array:
        """A float32 array with a row per center in its stored form (others unchanged)."""
        same = a.shape == (self.num_classes_padded, self.embedding_dim)
        return storage.narrow(a, self._stored) if same else a

    def _check_batch(self, global_batch: int) -> None:
        if global_batch % self.num_shards:
            raise ValueError(
                f"global batch {global_batch} is not divisible by the {self.num_shards} "
                f"devices of the mesh; use a multiple of {self.num_shards}"
            )

    # ---- state -------------------------------------------------------------------

    def state_shardings(self) -> HeadState:
        """NamedShardings of :class:`HeadState`: per-row leaves split by rows, the rest replicated."""
        shape = jax.ShapeDtypeStruct((self.num_classes_padded, self.embedding_dim), self._stored)
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
        opt_state = jax.tree.map(self._narrow_rows, self.optimizer.init(centers))
        return self._state(self._narrow_rows(centers), opt_state, jnp.zeros(shape[:1], jnp.int32))

    def init(self, key: jax.Array, std: float = 0.01) -> HeadState:
        """:meth:`init_state`, compiled and sharded."""
        return jax.jit(functools.partial(self.init_state, std=std), out_shardings=self.state_shardings())(key)

    def init_from_centers(self, centers: ArrayLike) -> HeadState:
        """A head state that starts from given class centers (fine-tuning, imported weights).

        Args:
          centers: [num_classes, embedding_dim], numpy or jax, any real dtype (stored in
            ``storage_dtype``): one row per class, in label order, without padding.

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
            return storage.to_host(out[:, index[1]], self._stored)

        placed = jax.make_array_from_callback(padded_shape, shardings.centers, block)
        init = lambda centers: jax.tree.map(self._narrow_rows, self.optimizer.init(storage.widen(centers)))
        opt_state = jax.jit(init, out_shardings=shardings.opt_state)(placed)
        sampled = (
            jax.device_put(np.zeros(padded_shape[:1], np.int32), shardings.sampled) if self.count_samples else None
        )
        return self._state(placed, opt_state, sampled)

    # ---- the three stages ----------------------------------------------------------

    def sample(self, labels: jax.Array, key: jax.Array) -> Sample:
        """Every shard's columns for the global batch's ``labels`` (sharded on ``data``),
        padded with inactive columns to the row blocks' size."""
        global_batch = labels.shape[0]
        self._check_batch(global_batch)
        pad = self.blocks(global_batch).columns - self.num_sample(global_batch)

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
            # Padding columns repeat the last row (the index stays sorted) and are inactive.
            return Sample(jnp.pad(s.index, (0, pad), mode="edge"), jnp.pad(s.active, (0, pad)), s.target)

        return self._shard_map(per_shard, (_SPLIT, P()), Sample(_SPLIT, _SPLIT, _SPLIT))(labels, key)

    def blocks(self, global_batch: int) -> row_blocks.Blocks:
        """How each shard's sampled rows are split into blocks (static)."""
        return row_blocks.plan(self.num_sample(global_batch), self.block_rows)

    def zero_cos_offset(self, global_batch: int) -> jax.Array:
        """Zeros f32[num_shards * count, global_batch, size] (sharded on ``data``): the
        :meth:`loss`'s ``cos_offset`` whose gradient is the gradient w.r.t. the cosines,
        each shard's blocks of sampled columns concatenated."""
        blocks = self.blocks(global_batch)
        return jnp.zeros((self.num_shards * blocks.count, global_batch, blocks.size), jnp.float32)

    def _blocks_of(self, sample: Sample) -> row_blocks.Blocks:
        # plan() of a plan's padded column count is that plan.
        return row_blocks.plan(sample.index.shape[0] // self.num_shards, self.block_rows)

    def _embedded(self, embeddings: jax.Array) -> jax.Array:
        """Per shard: the whole batch's embeddings, normalized in fp32, cast to the logits dtype."""
        x = jax.lax.all_gather(embeddings, _AXIS, tiled=True).astype(jnp.float32)
        return row_blocks.l2_normalize(x).astype(self.logits_dtype)

    def loss(self, centers: jax.Array, embeddings: jax.Array, sample: Sample, cos_offset: jax.Array | None = None):
        """Mean margin-softmax cross-entropy over the global batch, and metrics.

        Differentiable w.r.t. ``embeddings`` [B_g, D] (sharded on ``data``, any float
        dtype) and ``cos_offset`` (:meth:`zero_cos_offset`'s shape: added to each shard's
        blocks of cosines before the margin, zero in training; its gradient is the loss's
        gradient w.r.t. the cosines, what :meth:`apply_gradients` takes). ``centers``
        are read, not differentiated. Returns ``(loss, metrics)``: the fp32 loss;
        ``accuracy`` (top-1 among the sampled classes), ``invalid_labels`` (labels outside
        ``[0, num_classes)``) and ``sampled_classes`` (columns in the softmax).
        """
        self._check_batch(embeddings.shape[0])
        margin, blocks = self.margin, self._blocks_of(sample)
        if cos_offset is None:
            cos_offset = self.zero_cos_offset(sample.target.shape[0] // self.num_shards)

        def per_shard(embeddings, centers, index, active, target, cos_offset):
            # Block-major: cosines [count, B_g, size], each block of sampled rows read once.
            index, active = index.reshape(blocks.count, -1), active.reshape(blocks.count, -1)
            columns = jnp.arange(blocks.columns).reshape(blocks.count, -1)
            cos = row_blocks.cosines(self._embedded(embeddings), centers, index, cos_offset, blocks, self.logits_dtype)

            def logits_of(cos, active, columns):
                cos = jnp.clip(cos, -1.0, 1.0)
                is_target = target[:, None] == columns[None, :]
                return cos, is_target, jnp.where(active[None, :], margin(cos, is_target), -jnp.inf)

            # The loss and its metrics reduce over every block: one scan per pass, so only
            # a block's worth of the elementwise work is ever materialized.
            # Pass 1 (no gradient): the row max of the logits, the metrics' cosines.
            def stats(carry, block):
                row_max, best, target_cos, has_target = carry
                cos, is_target, logits = logits_of(*block)
                cos = jnp.where(block[1][None, :], cos, -jnp.inf)
                return (
                    jnp.maximum(row_max, jnp.max(logits, axis=1)),
                    jnp.maximum(best, jnp.max(cos, axis=1)),
                    target_cos + jnp.sum(jnp.where(is_target, cos, 0.0), axis=1),
                    has_target | jnp.any(is_target, axis=1),
                ), None

            zeros = jnp.zeros_like(target, dtype=jnp.float32)  # varies over the mesh, like the carry
            blocks_in = (cos, active, columns)
            (row_max, best, target_cos, has_target), _ = jax.lax.scan(
                stats, (zeros - jnp.inf, zeros - jnp.inf, zeros, zeros > 0), jax.lax.stop_gradient(blocks_in)
            )

            # Pass 2: the distributed log-sum-exp (the row max is only a shift) and the
            # target logit; checkpointed, so the backward pass recomputes each block's
            # logits instead of keeping them.
            row_max = jax.lax.pmax(row_max, _AXIS)

            @jax.checkpoint
            def terms(carry, block):
                sum_exp, target_logit = carry
                _, is_target, logits = logits_of(*block)
                return (
                    sum_exp + jnp.sum(jnp.exp(logits - row_max[:, None]), axis=1),
                    target_logit + jnp.sum(jnp.where(is_target, logits, 0.0), axis=1),
                ), None

            (sum_exp, target_logit), _ = jax.lax.scan(terms, (zeros, zeros), blocks_in)
            sum_exp, target_logit = jax.lax.psum((sum_exp, target_logit), _AXIS)
            per_example = jnp.log(sum_exp) + row_max - target_logit

            # Metrics: top-1 among the sampled columns, label sanity.
            best = jax.lax.pmax(best, _AXIS)
            target_cos = jax.lax.psum(target_cos, _AXIS)
            has_target = jax.lax.psum(has_target.astype(jnp.int32), _AXIS)
            metrics = {
                "accuracy": jnp.mean(((target_cos >= best) & (has_target > 0)).astype(jnp.float32)),
                "invalid_labels": jnp.sum(has_target == 0),
                "sampled_classes": jax.lax.psum(jnp.sum(active), _AXIS),
            }
            return jnp.mean(per_example), metrics

        return self._shard_map(per_shard, (_SPLIT, _ROWS, _SPLIT, _SPLIT, _SPLIT, _SPLIT), (P(), P()))(
            embeddings, centers, sample.index, sample.active, sample.target, cos_offset
        )

    def row_gradients(self, centers: jax.Array, embeddings: jax.Array, sample: Sample, grad_cos: jax.Array):
        """The loss's gradient w.r.t. the sampled rows, f32[num_shards * columns, D] (for
        tests and inspection: the step itself never forms it)."""

        def per_shard(centers, embeddings, index, grad_cos):
            rows = storage.widen(jnp.take(centers, index, axis=0))
            grad_cos = jnp.concatenate(list(grad_cos), axis=1)  # [B_g, columns]
            return row_blocks.row_gradient(rows, grad_cos, self._embedded(embeddings), self.logits_dtype)

        return self._shard_map(per_shard, (_ROWS, _SPLIT, _SPLIT, _SPLIT), _ROWS)(
            centers, embeddings, sample.index, grad_cos
        )

    def apply_gradients(
        self, state: HeadState, sample: Sample, embeddings: jax.Array, grad_cos: jax.Array, key: jax.Array
    ) -> HeadState:
        """Optimizer step on the sampled rows, written back in place (only active ones).

        ``embeddings`` [B_g, D] (sharded on ``data``) and ``grad_cos`` (the gradient of
        :meth:`loss` w.r.t. ``cos_offset``) give each row's gradient; ``key`` draws the
        stochastic rounding of a bfloat16 storage."""
        is_row = SparseRows.row_leaves(state.opt_state, state.centers.shape)
        state_specs = jax.tree.map(lambda r: _ROWS if r else P(), is_row)
        num_local, blocks = self.num_local, self._blocks_of(sample)
        stochastic = self.storage_rounding == "stochastic" and self.storage_dtype != "float32"

        def per_shard(centers, opt_state, embeddings, index, active, grad_cos, key):
            return row_blocks.update(
                centers,
                opt_state,
                sparse=self._sparse,
                index=index.reshape(blocks.count, -1),
                write_index=write_index(index, active, num_local).reshape(blocks.count, -1),
                grad_cos=grad_cos,
                x=self._embedded(embeddings),
                blocks=blocks,
                dtype=self.logits_dtype,
                rounding=self.storage_rounding,
                key=jax.random.fold_in(key, jax.lax.axis_index(_AXIS)) if stochastic else None,
            )

        centers, opt_state = self._shard_map(
            per_shard,
            (_ROWS, state_specs, _SPLIT, _SPLIT, _SPLIT, _SPLIT, P()),
            (_ROWS, state_specs),
        )(state.centers, state.opt_state, embeddings, sample.index, sample.active, grad_cos, key)
        sampled = None
        if self.count_samples:

            def count(sampled, index, active):
                return sampled.at[write_index(index, active, num_local)].add(1, mode="drop")

            sampled = self._shard_map(count, (_SPLIT, _SPLIT, _SPLIT), _SPLIT)(
                state.sampled, sample.index, sample.active
            )
        return self._state(centers, opt_state, sampled)

    # ---- the trainer's contract (pfc_jax.heads.Head) ----------------------------------

    # The update forms the rows' gradients from the step's embeddings (see Head.update).
    update_uses_embeddings = True

    def prepare(self, state: HeadState, labels: jax.Array, key: jax.Array):
        """Sample: ``(cos_offset, (sample, centers, key), metrics)``; the loss is
        differentiated w.r.t. the zero ``cos_offset``, whose gradient is the cosines'."""
        sample = self.sample(labels, key)  # the sampler folds in the shard index
        rounding_key = jax.random.split(key)[1]
        cos_offset = self.zero_cos_offset(labels.shape[0])
        metrics = {
            "sampled_classes": jnp.sum(sample.active),
            "invalid_labels": jnp.sum((labels < 0) | (labels >= self.num_classes)),
        }
        return cos_offset, (sample, state.centers, rounding_key), metrics

    def micro_loss(self, cos_offset: jax.Array, context, embeddings: jax.Array, micro):
        """:meth:`loss` of micro-batch ``micro``: its examples' targets (and offsets) are
        slice ``micro`` of every shard's block (see :meth:`pfc_jax.heads.Head.prepare`)."""
        sample, centers, _ = context
        k = sample.target.shape[0] // (self.num_shards * embeddings.shape[0])  # micro-batches per step
        target = sample.target.reshape(self.num_shards, k, -1)[:, micro].reshape(-1)
        offset = cos_offset.reshape(cos_offset.shape[0], k, -1, cos_offset.shape[-1])[:, micro]
        loss, metrics = self.loss(centers, embeddings, sample._replace(target=target), offset)
        return loss, {"accuracy": metrics["accuracy"]}

    def update(self, state: HeadState, cos_offset: jax.Array, context, grads: jax.Array, *, embeddings) -> HeadState:
        sample, _, key = context
        return self.apply_gradients(state, sample, embeddings, grads, key)

    def describe(self, global_batch: int) -> str:
        return f"{self.num_local:,} centers each, {self.num_sample(global_batch):,} sampled per step"

    def class_weights(self, state: HeadState) -> jax.Array:
        """f32[num_classes, D]: the stored weight of every class, in label order."""
        return storage.widen(state.centers[: self.num_classes])

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
        storage_dtype=h.storage_dtype,
        storage_rounding=h.storage_rounding,
        block_rows=h.block_rows,
    )


def check_config(c) -> None:
    """The ``config.head`` fields of Partial FC (``c``: a config_validation.Check)."""
    c.in_range("head.sample_rate", 0.0, 1.0)
    c.in_range("head.weight_decay", 0.0, float("inf"))
    c.choice("head.logits_dtype", models.DTYPES)
    c.choice("head.storage_dtype", storage.STORED)
    c.choice("head.storage_rounding", storage.ROUNDINGS)
    c.positive_int("head.block_rows", minimum=0)
    c.that(
        isinstance(c.config.head.count_samples, bool),
        "head.count_samples",
        c.config.head.count_samples,
        "must be True or False",
    )
    margins.check_config(c)


ENTRY = heads.HeadEntry(build=from_config, check=check_config)
