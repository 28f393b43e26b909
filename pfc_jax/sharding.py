"""The one place that knows how arrays are laid out on devices.

The mesh has a single axis, ``data``, over every device of every process. The batch is
split on it, backbone parameters are replicated, and the class centers are split by rows:
shard ``i`` owns classes ``[i * num_local, (i + 1) * num_local)``. The class count is
padded up to a multiple of the device count; padded rows belong to no identity and are
never sampled as positives or negatives.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over ``devices`` (default: all devices, all processes).

    The axis is ``Auto`` (compiler-propagated shardings inside ``jit``), not the newer
    ``Explicit`` default: shardings are pinned where they matter (``jit`` in/out
    shardings, ``shard_map`` specs) and the rest is left to the partitioner.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices given")
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)


def num_shards(mesh: Mesh) -> int:
    """Number of devices along the ``data`` axis."""
    return mesh.shape[DATA_AXIS]


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data``; other dimensions whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (backbone parameters, scalars)."""
    return NamedSharding(mesh, P())


def row_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over ``data``: the class centers and their optimizer-state rows."""
    return NamedSharding(mesh, P(DATA_AXIS, None))


def padded_num_classes(num_classes: int, num_devices: int) -> int:
    """``num_classes`` rounded up to a multiple of ``num_devices``."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    return -(-num_classes // num_devices) * num_devices


def rows_per_shard(num_classes: int, num_devices: int) -> int:
    """``num_local``: class rows held by each shard (padding included)."""
    return padded_num_classes(num_classes, num_devices) // num_devices
