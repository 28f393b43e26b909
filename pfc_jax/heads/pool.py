"""A Dynamic Class Pool: a fixed number of identity slots with least-recently-used eviction.

F²C's pool (Wang et al., CVPR 2022) keeps, for ``size`` identities at a time, the last
two gallery features of each, and replaces the identity used least recently when a new
one arrives. Everything lives in the jitted step as arrays with static shapes, split by
rows over the ``data`` axis like the class centers (``size_padded`` is ``size`` rounded up
to a multiple of the device count; rows ``>= size`` are padding and never used, so
restoring on another device count, which pads or truncates the rows, changes nothing).

Per slot: ``views`` f32[V, D] (F²C: V = 2 gallery features of its identity; Prototype
Memory, :mod:`pfc_jax.heads.prototype_memory`: V = 1 prototype), ``labels`` i32
(``EMPTY`` if never written), ``stamps`` i32 (when the slot was last used: the LRU order)
and ``next_view`` i32 (which view the next feature overwrites). Besides them the state
holds ``clock``, the number of features inserted so far; a feature's stamp is the clock
value at its insertion, so stamps are unique and order the slots by recency (a run
inserts fewer than 2**31 - 2**24 - size features: some 4 million steps of 512 features).

**No identity -> slot table.** A label is found by comparing it with the labels of all
slots (each device its own rows, then a max over devices): ``n x size`` integer compares
per step, against the ``n x size x D`` multiply-adds of the logits, so 1/D of the head's
work. A direct table would cost 4 bytes per identity (400 MB at 10^8 identities) to save
that; this way the pool's memory is the same at 10^4 or 10^8 identities.

**One batch, one LRU update** (:meth:`ClassPool.insert`). All ``n`` features of a step are
looked up in the pool as it was before the step. A label found keeps its slot (a hit); the
distinct labels not found, in order of first appearance, take the empty slots (lowest row
first) and then the least recently used ones, never a slot the same batch uses. Each
feature overwrites view ``next_view`` of its slot and moves it on (mod V); a new identity
writes view 0 first. A label that appears ``c`` times in the batch writes ``c`` features in
a row, so only its last V remain. A slot's stamp becomes that of its identity's last feature in
the batch. With ``size >= n`` every label of a batch gets a slot.

This is the official code's per-feature LRU (tiandunx/FFC, ``lru_python_impl.py`` driven
by ``ffc_ddp.py``) except where a miss there would evict a slot that a later feature of the
same batch refreshes: the official code then evicts it and inserts that identity again in
another slot; here the batch never evicts what it uses.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pfc_jax import sharding

_AXIS = sharding.DATA_AXIS
EMPTY = -1  # the label of a slot never written
_EXCLUDED = 0x7F000000  # eviction order of slots that cannot be taken (+inf by order_keys)


class PoolState(NamedTuple):
    """``slots``: ``views`` f32[Qp, V, D], ``labels``, ``stamps``, ``next_view`` i32[Qp]
    (rows sharded); ``clock`` i32[] (replicated): features inserted so far."""

    slots: dict
    clock: jax.Array


class Plan(NamedTuple):
    """What one batch's insertion does (:meth:`ClassPool.plan`), before it is applied.

    Attributes:
      slots: i32[n]: the global slot of each feature.
      views: i32[n]: the view (0 .. V - 1) each feature overwrites.
      write: bool[n]: whether it is written (the last two copies of a label are).
      labels, stamps, next_view: i32[Qp] (rows sharded): the slots' fields after it.
      refreshed: bool[Qp] (rows sharded): slots whose identity was already there, or got
        two or more features in this batch (the official code's ``ones_idx``): both their
        views hold features of the identity.
      hits, new, evicted: i32[]: distinct labels found in the pool, distinct labels given
        a slot, and of those the slots taken from another identity.
    """

    slots: jax.Array
    views: jax.Array
    write: jax.Array
    labels: jax.Array
    stamps: jax.Array
    next_view: jax.Array
    refreshed: jax.Array
    hits: jax.Array
    new: jax.Array
    evicted: jax.Array


def order_keys(keys: jax.Array) -> jax.Array:
    """Non-negative int32 ``keys`` (below ``0x7F000000``; that one gives +inf) as float32 that order exactly as
    they do: the bit patterns of positive normal floats order like the integers, and XLA's
    ``top_k`` is much faster on floats (on CPU, ~100x over 10^5 int32 rows)."""
    return jax.lax.bitcast_convert_type(keys + jnp.int32(0x00800000), jnp.float32)


@dataclasses.dataclass(frozen=True)
class ClassPool:
    """``size`` identity slots of ``views`` (two for F²C, one for Prototype Memory)
    ``dim``-dimensional features each (module docstring)."""

    mesh: Mesh
    size: int
    dim: int
    views: int = 2

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"pool size must be >= 1, got {self.size}")
        if self.views not in (1, 2):
            raise ValueError(f"views per slot must be 1 or 2, got {self.views}")
        if self.dim < 1:
            raise ValueError(f"feature dimension must be >= 1, got {self.dim}")

    @property
    def num_shards(self) -> int:
        return sharding.num_shards(self.mesh)

    @property
    def size_padded(self) -> int:
        return sharding.padded_num_classes(self.size, self.num_shards)

    @property
    def num_local(self) -> int:
        return self.size_padded // self.num_shards

    @property
    def _specs(self) -> dict:
        return {"views": P(_AXIS, None, None), "labels": P(_AXIS), "stamps": P(_AXIS), "next_view": P(_AXIS)}

    def shardings(self) -> PoolState:
        slots = {name: NamedSharding(self.mesh, spec) for name, spec in self._specs.items()}
        return PoolState(slots, sharding.replicated(self.mesh))

    def init(self) -> PoolState:
        """An empty pool (pure; jit it with :meth:`shardings`)."""
        q = self.size_padded
        slots = {
            "views": jnp.zeros((q, self.views, self.dim), jnp.float32),
            "labels": jnp.full((q,), EMPTY, jnp.int32),
            "stamps": jnp.full((q,), -1, jnp.int32),
            "next_view": jnp.zeros((q,), jnp.int32),
        }
        return PoolState(slots, jnp.zeros((), jnp.int32))

    def in_use(self, slot_labels: jax.Array) -> jax.Array:
        """bool[size_padded]: slots holding an identity (written, and not padding), from
        ``slot_labels`` (a state's or a plan's)."""
        return (jnp.arange(self.size_padded) < self.size) & (slot_labels != EMPTY)

    def _rows(self) -> jax.Array:
        """Inside shard_map: the global rows of this device's slots."""
        return jax.lax.axis_index(_AXIS) * self.num_local + jnp.arange(self.num_local)

    def _match(self, slot_labels: jax.Array, labels: jax.Array) -> jax.Array:
        """Inside shard_map: bool[n, num_local], label j is in local slot r."""
        real = (self._rows() < self.size) & (slot_labels != EMPTY)
        return (slot_labels[None, :] == labels[:, None]) & real[None, :]

    def lookup(self, slot_labels: jax.Array, labels: jax.Array) -> jax.Array:
        """i32[n]: the global slot of each of ``labels`` (i32[n]) among ``slot_labels``
        (i32[Qp], rows sharded: a state's or a plan's), or -1 where it is not there."""

        def per_shard(slot_labels, labels):
            match = self._match(slot_labels, labels)
            return jax.lax.pmax(jnp.max(jnp.where(match, self._rows()[None, :], -1), axis=1), _AXIS)

        return jax.shard_map(per_shard, mesh=self.mesh, in_specs=(P(_AXIS), P()), out_specs=P())(slot_labels, labels)

    def plan(self, state: PoolState, labels: jax.Array) -> Plan:
        """Where the features of ``labels`` (i32[n], in order) go, as the module docstring
        says; nothing is written (:meth:`apply` does)."""
        n = int(labels.shape[0])
        if n > self.size:
            raise ValueError(f"insert: {n} features in one batch, but the pool has {self.size} slots")
        size, size_padded, num_local, views = self.size, self.size_padded, self.num_local, self.views
        k_local = min(n, num_local)
        excluded = order_keys(jnp.int32(_EXCLUDED))

        def per_shard(slots, clock, labels):
            rows = self._rows()
            start = rows[0]
            index = jnp.arange(n)
            # Duplicates within the batch.
            same = labels[:, None] == labels[None, :]
            rank = jnp.sum(same & (index[None, :] < index[:, None]), axis=1)  # earlier copies
            count = jnp.sum(same, axis=1)
            first = jnp.argmax(same, axis=1)
            # Lookup in the pool as it was before the batch.
            match = self._match(slots["labels"], labels)
            hit = jax.lax.pmax(jnp.max(jnp.where(match, rows[None, :], -1), axis=1), _AXIS)
            hit_view = jax.lax.pmax(jnp.max(jnp.where(match, slots["next_view"][None, :], -1), axis=1), _AXIS)
            # Distinct new labels take the empty slots first (lowest row first), then the
            # least recently used (lowest stamp); never a slot the batch uses.
            miss = (hit < 0) & (rank == 0)
            miss_rank = jnp.clip(jnp.cumsum(miss) - 1, 0, n - 1)
            taken = jnp.any(match, axis=0) | (rows >= size)
            key = order_keys(jnp.where(slots["labels"] == EMPTY, rows, size_padded + slots["stamps"]))
            key = jnp.where(taken, excluded, key)
            neg, local = jax.lax.top_k(-key, k_local)  # this device's oldest
            cand_key = jax.lax.all_gather(-neg, _AXIS, tiled=True)
            cand_rows = jax.lax.all_gather(start + local, _AXIS, tiled=True)
            neg, pick = jax.lax.top_k(-cand_key, n)  # the n oldest over all devices, oldest first
            victims, victim_key = cand_rows[pick], -neg
            slot = jnp.where(hit >= 0, hit, victims[miss_rank])[first]  # copies: the first's slot
            # Views: a hit continues its slot's alternation, a new identity starts at view 0.
            base = jnp.where(hit >= 0, hit_view, 0)
            last = rank == count - 1
            mine = (slot >= start) & (slot < start + num_local)
            at = jnp.where(last & mine, slot - start, num_local)  # out of range: dropped
            old_owner = victim_key[miss_rank] >= order_keys(jnp.int32(size_padded))
            fields = {
                "labels": slots["labels"].at[at].set(labels, mode="drop"),
                "stamps": slots["stamps"].at[at].set(clock + index, mode="drop"),
                "next_view": slots["next_view"].at[at].set(jnp.mod(base + count, views), mode="drop"),
                "refreshed": jnp.zeros(num_local, bool).at[at].set((hit >= 0) | (count >= 2), mode="drop"),
            }
            entries = (slot, jnp.mod(base + rank, views), rank >= count - views)  # earlier copies are overwritten
            counts = (jnp.sum((hit >= 0) & (rank == 0)), jnp.sum(miss), jnp.sum(miss & old_owner))
            return entries, fields, counts

        fields = P(_AXIS)
        row_specs = {"labels": fields, "stamps": fields, "next_view": fields, "refreshed": fields}
        slot_specs = {name: P(_AXIS) for name in ("labels", "stamps", "next_view")}
        slots = {name: state.slots[name] for name in slot_specs}
        (slot, view, write), rows, (hits, new, evicted) = jax.shard_map(
            per_shard,
            mesh=self.mesh,
            in_specs=(slot_specs, P(), P()),
            out_specs=((P(), P(), P()), row_specs, (P(), P(), P())),
            check_vma=False,  # the victims come from an all_gather: the same on every device
        )(slots, state.clock, labels.astype(jnp.int32))
        return Plan(
            slot, view, write, rows["labels"], rows["stamps"], rows["next_view"], rows["refreshed"], hits, new, evicted
        )

    def apply(self, state: PoolState, plan: Plan, features: jax.Array) -> PoolState:
        """``state`` after ``plan``: the features f32[n, D] written, the slots' fields set."""
        n = int(plan.slots.shape[0])
        if features.shape != (n, self.dim):
            raise ValueError(f"insert: features {features.shape} for {n} labels of dimension {self.dim}")
        num_local = self.num_local

        def per_shard(views, slot, view, write, features):
            start = self._rows()[0]
            mine = (slot >= start) & (slot < start + num_local)
            at = jnp.where(write & mine, slot - start, num_local)  # out of range: dropped
            return views.at[at, view].set(features, mode="drop")

        views = jax.shard_map(
            per_shard,
            mesh=self.mesh,
            in_specs=(P(_AXIS, None, None), P(), P(), P(), P()),
            out_specs=P(_AXIS, None, None),
        )(state.slots["views"], plan.slots, plan.views, plan.write, features.astype(jnp.float32))
        slots = {"views": views, "labels": plan.labels, "stamps": plan.stamps, "next_view": plan.next_view}
        return PoolState(slots, (state.clock + n).astype(jnp.int32))

    def insert(self, state: PoolState, features: jax.Array, labels: jax.Array) -> tuple[PoolState, Plan]:
        """``state`` with ``features`` f32[n, D] of ``labels`` i32[n] inserted, and the plan."""
        if features.shape != (labels.shape[0], self.dim):
            raise ValueError(f"insert: features {features.shape} for {labels.shape[0]} labels of dimension {self.dim}")
        plan = self.plan(state, labels)
        return self.apply(state, plan, features), plan

    def newest_per_label(self, state: PoolState, num_labels: int) -> np.ndarray:
        """Host f32[num_labels, D]: each label's last written view, NaN for a label not in
        the pool (the study's staleness of generated weights)."""
        host = jax.device_get(state.slots)
        labels = np.asarray(host["labels"])[: self.size]
        newest = np.mod(np.asarray(host["next_view"])[: self.size] - 1, self.views)
        views = np.asarray(host["views"])[: self.size]
        out = np.full((num_labels, self.dim), np.nan, np.float32)
        keep = np.flatnonzero((labels >= 0) & (labels < num_labels))
        out[labels[keep]] = views[keep, newest[keep]]
        return out
