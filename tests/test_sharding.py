import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from pfc_jax import sharding


def test_mesh_is_one_auto_axis_over_all_devices():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("data",)
    assert sharding.num_shards(mesh) == 8
    assert mesh.axis_types == (AxisType.Auto,)
    assert sharding.num_shards(sharding.make_mesh(jax.devices()[:2])) == 2


@pytest.mark.parametrize(
    "classes,devices,padded", [(37, 8, 40), (40, 8, 40), (1, 8, 8), (93431, 1, 93431), (93431, 8, 93432)]
)
def test_padding(classes, devices, padded):
    assert sharding.padded_num_classes(classes, devices) == padded
    assert sharding.rows_per_shard(classes, devices) * devices == padded


def test_padding_rejects_nonsense():
    with pytest.raises(ValueError, match="num_classes"):
        sharding.padded_num_classes(0, 8)
    with pytest.raises(ValueError, match="num_devices"):
        sharding.padded_num_classes(10, 0)


def test_shardings_place_rows_and_batch():
    mesh = sharding.make_mesh()
    x = jax.device_put(np.zeros((16, 3), np.float32), sharding.row_sharding(mesh))
    assert {s.data.shape for s in x.addressable_shards} == {(2, 3)}
    y = jax.device_put(np.zeros((16,), np.int32), sharding.batch_sharding(mesh))
    assert {s.data.shape for s in y.addressable_shards} == {(2,)}
    z = jax.device_put(np.zeros((5,), np.float32), sharding.replicated(mesh))
    assert {s.data.shape for s in z.addressable_shards} == {(5,)}
