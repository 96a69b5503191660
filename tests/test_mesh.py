"""make_mesh's spellings of a mesh shape, and one-line errors for the arguments users get wrong."""

import jax
import numpy as np
import pytest

from idefics_jax.model import sharding as shd


def test_a_dict_of_axis_sizes_is_a_mesh_shape():
    n = jax.device_count()
    for shape in ({"data": 1, "fsdp": 1, "tensor": n}, {"tensor": n}, {"fsdp": -1}, (1, -1, 1), [1, n, 1],
                  np.array([n, 1, 1]), shd.MeshShape(fsdp=-1)):
        mesh = shd.make_mesh(shape)
        assert mesh.axis_names == shd.MESH_AXES and mesh.devices.size == n, shape
    assert dict(shd.make_mesh({"tensor": n}).shape) == {"data": 1, "fsdp": 1, "tensor": n}
    assert shd.mesh_shape({"fsdp": -1, "tensor": 4}) == shd.FSDP_TP
    assert shd.MeshShape(np.int64(2)).resolve(2) == (2, 1, 1)
    assert shd.make_mesh((1, 1, 1), devices=jax.devices()[:1]).devices.size == 1


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("shape, error, says", [
    ({"data": 1, "model": 1}, ValueError, "unknown axis 'model'"),
    ("1,1,1", TypeError, "got str"),
    (4, TypeError, "got int"),
    ((1, 1), ValueError, "2 sizes given"),
    ((1, "1", 1), TypeError, "fsdp must be an int"),
    ({"data": 1.0}, TypeError, "data must be an int"),
    ({"tensor": True}, TypeError, "tensor must be an int"),
    ((1, 0, 1), ValueError, "fsdp must be a positive number"),
    ({"data": -2}, ValueError, "data must be a positive number"),
    ((1, 1, jax.device_count() + 1), ValueError, "devices"),
    ((-1, -1, 1), ValueError, "devices"),
])
def test_make_mesh_names_the_bad_shape(shape, error, says):
    with pytest.raises(error) as e:
        shd.make_mesh(shape)
    assert says in _one_line(e)


@pytest.mark.parametrize("devices, error, says", [
    (jax.devices()[0], TypeError, "devices must be a list of jax devices"),
    ("cpu", TypeError, "devices must be a list"),
    ([], ValueError, "devices is empty"),
    ([0], TypeError, "got 0 (int)"),
])
def test_make_mesh_names_bad_devices(devices, error, says):
    with pytest.raises(error) as e:
        shd.make_mesh((1, 1, 1), devices=devices)
    assert says in _one_line(e)


def test_partitioning_names_bad_meshes_and_rules():
    with pytest.raises(TypeError) as e:
        shd.Partitioning({"data": 1, "fsdp": 1, "tensor": 1})
    assert "mesh must be a jax.sharding.Mesh" in _one_line(e)
    mesh = shd.make_mesh((1, 1, jax.device_count()))
    for rules in ({"embed": "fsdp"}, (("embed",),), (("embed", 3),), "embed"):
        with pytest.raises(TypeError) as e:
            shd.Partitioning(mesh, rules)
        assert "rules" in _one_line(e) or "rule maps" in _one_line(e)
    with pytest.raises(TypeError) as e:
        shd.override(shd.RULES, mlp=4)
    assert "override" in _one_line(e)
    with pytest.raises(ValueError) as e:
        shd.MeshShape().resolve(0)
    assert "n_devices" in _one_line(e)
