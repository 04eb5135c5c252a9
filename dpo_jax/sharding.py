"""Logical axis names -> mesh axes. Parameters are annotated with logical names in the model code; this
one table decides how they are laid out on a `jax.sharding.Mesh` with axes data / fsdp / tensor.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .errors import UserError

# Logical axis -> mesh axis (None = replicated). Weights are split over fsdp on their model-width side
# and over tensor on their head / feed-forward / vocabulary side.
LOGICAL_AXIS_RULES: dict[str, str | None] = {
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "qkv": None,     # GPT-2's fused q/k/v output: splitting it over tensor would cut across q, k and v
    "norm": None,
}


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> PartitionSpec:
    """The PartitionSpec for a parameter with these logical axes on this mesh.

    A dimension stays replicated when its mesh axis is absent, of size 1, or does not divide it.
    """
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        mesh_axis = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        size = mesh.shape.get(mesh_axis, 1) if mesh_axis else 1
        spec.append(mesh_axis if size > 1 and dim % size == 0 else None)
    return PartitionSpec(*spec)


def param_sharding(axes: tuple[str | None, ...] | None, shape: tuple[int, ...],
                   mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(tuple(axes or (None,) * len(shape)), shape, mesh))


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> jax.sharding.Mesh:
    """A data x fsdp x tensor mesh over `devices` (default: all); -1 takes the devices left over."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    known = math.prod(v for v in sizes.values() if v != -1)
    sizes = {k: (len(devices) // known if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != len(devices):
        raise UserError(f"mesh {sizes} needs {math.prod(sizes.values())} devices; there are {len(devices)}")
    return jax.sharding.Mesh(np.asarray(devices).reshape(tuple(sizes.values())), tuple(sizes))
