"""A ring buffer of generated class weights, its rows sharded over the devices.

The heads whose class weights are generated rather than learned (DCQ; F²C and Prototype
Memory build on the same queue) keep the last ``size`` weights they generated, with the
label of each and any other per-slot fields they need. The queue costs the same at 10⁵
or 10⁸ identities.

Layout: every field is an array ``[size_padded, ...]`` split by rows over the ``data``
axis like the class centers (``size_padded`` is ``size`` rounded up to a multiple of the
device count), plus ``ptr``, the global slot the next entry goes to (replicated). Slot
``g`` is row ``g`` of the global array; rows ``>= size`` are padding and never used, so
restoring on another device count (which pads or truncates the rows) changes nothing.
A slot that was never written has label ``-1``.

Enqueueing ``n <= size`` entries writes entry ``j`` to slot ``(ptr + j) mod size`` and
advances ``ptr`` by ``n``: a batch that does not divide ``size`` wraps around, and the
oldest entries are the ones overwritten. Every device computes, for each of its own rows,
which entry (if any) lands there, and writes only those rows: one compiled program with
static shapes, no all-to-all and no scatter.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from pfc_jax import sharding

_AXIS = sharding.DATA_AXIS
EMPTY = -1  # the label of a slot never written


class QueueState(NamedTuple):
    """The queue's fields (``labels`` i32 and ``weights`` f32 always; rows sharded) and
    ``ptr`` i32[] (replicated)."""

    slots: dict
    ptr: jax.Array


@dataclasses.dataclass(frozen=True)
class Field:
    """One per-slot field: its trailing shape, dtype and the value of an empty slot."""

    shape: tuple[int, ...]
    dtype: Any
    fill: float | int = 0


@dataclasses.dataclass(frozen=True)
class RingQueue:
    """``size`` slots of ``weights`` f32[D] and ``labels`` i32 (plus ``extra`` fields).

    Attributes:
      mesh: the 1-D ``data`` mesh.
      size: slots (K).
      dim: weight dimension (D).
      extra: further per-slot fields, name -> :class:`Field` (e.g. an age).
    """

    mesh: Mesh
    size: int
    dim: int
    extra: tuple[tuple[str, Field], ...] = ()

    def __post_init__(self):
        if self.size < 1:
            raise ValueError(f"queue size must be >= 1, got {self.size}")
        if self.dim < 1:
            raise ValueError(f"weight dimension must be >= 1, got {self.dim}")

    @property
    def fields(self) -> dict[str, Field]:
        return {"weights": Field((self.dim,), jnp.float32), "labels": Field((), jnp.int32, EMPTY), **dict(self.extra)}

    @property
    def num_shards(self) -> int:
        return sharding.num_shards(self.mesh)

    @property
    def size_padded(self) -> int:
        return sharding.padded_num_classes(self.size, self.num_shards)

    @property
    def num_local(self) -> int:
        return self.size_padded // self.num_shards

    def shardings(self) -> QueueState:
        rows = lambda f: NamedSharding(self.mesh, P(_AXIS, *([None] * len(f.shape))))
        return QueueState({name: rows(f) for name, f in self.fields.items()}, sharding.replicated(self.mesh))

    def init(self) -> QueueState:
        """An empty queue (pure; jit it with :meth:`shardings`)."""
        slots = {name: jnp.full((self.size_padded, *f.shape), f.fill, f.dtype) for name, f in self.fields.items()}
        return QueueState(slots, jnp.zeros((), jnp.int32))

    def in_use(self, state: QueueState) -> jax.Array:
        """bool[size_padded]: slots holding an entry (written, and not padding)."""
        rows = jnp.arange(self.size_padded)
        return (rows < self.size) & (state.slots["labels"] != EMPTY)

    def enqueue(self, state: QueueState, entries: dict) -> QueueState:
        """``state`` with ``entries`` (name -> [n, ...] for every field, in order: entry 0
        is the oldest) written at ``ptr, ptr + 1, ...`` modulo ``size``."""
        if set(entries) != set(self.fields):
            raise ValueError(f"enqueue needs the fields {sorted(self.fields)}, got {sorted(entries)}")
        n = {int(x.shape[0]) for x in entries.values()}
        if len(n) != 1:
            raise ValueError(f"enqueue: the fields have different entry counts {sorted(n)}")
        (n,) = n
        if not 1 <= n <= self.size:
            raise ValueError(f"enqueue: {n} entries in one call, but the queue has {self.size} slots (1 to size)")
        size, num_local = self.size, self.num_local

        def per_shard(slots, ptr, entries):
            rows = jax.lax.axis_index(_AXIS) * num_local + jnp.arange(num_local)
            j = jnp.mod(rows - ptr, size)  # which entry (if any) lands in each of my rows
            write = (rows < size) & (j < n)
            pick = jnp.minimum(j, n - 1)

            def put(old, new):
                new = jnp.take(new.astype(old.dtype), pick, axis=0)
                return jnp.where(write.reshape(-1, *([1] * (old.ndim - 1))), new, old)

            return {name: put(slots[name], entries[name]) for name in slots}

        specs = {name: P(_AXIS, *([None] * len(f.shape))) for name, f in self.fields.items()}
        slots = jax.shard_map(
            per_shard,
            mesh=self.mesh,
            in_specs=(specs, P(), {name: P() for name in specs}),
            out_specs=specs,
        )(state.slots, state.ptr, entries)
        return QueueState(slots, jnp.mod(state.ptr + n, size).astype(jnp.int32))

    def latest_per_label(self, state: QueueState, num_labels: int) -> np.ndarray:
        """Host f32[num_labels, D]: each label's most recently enqueued weight, NaN for a
        label not in the queue (the study's staleness of generated weights)."""
        host = jax.device_get(state)
        labels = np.asarray(host.slots["labels"])[: self.size]
        weights = np.asarray(host.slots["weights"])[: self.size]
        ptr = int(host.ptr)
        order = np.concatenate([np.arange(ptr, self.size), np.arange(ptr)])  # oldest first
        out = np.full((num_labels, self.dim), np.nan, np.float32)
        keep = order[(labels[order] >= 0) & (labels[order] < num_labels)]
        out[labels[keep]] = weights[keep]  # later (newer) writes win
        return out
