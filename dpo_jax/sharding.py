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
    "layers": None,  # stacked blocks' layer axis: every device holds every layer's part of a weight
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
    shown = ",".join(f"{k}={v}" for k, v in sizes.items())
    if sum(v == -1 for v in sizes.values()) > 1:
        raise UserError(f"mesh {shown}: only one axis may be -1 (the devices left over)")
    if any(v == 0 or v < -1 for v in sizes.values()):
        raise UserError(f"mesh {shown}: axis sizes are positive, or -1 for the devices left over")
    known = math.prod(v for v in sizes.values() if v != -1)
    if len(devices) % known:
        raise UserError(f"mesh {shown}: {known} devices do not divide the {len(devices)} devices there are; "
                        f"choose sizes whose product divides {len(devices)}")
    sizes = {k: (len(devices) // known if v == -1 else v) for k, v in sizes.items()}
    if math.prod(sizes.values()) != len(devices):
        raise UserError(f"mesh {shown} uses {math.prod(sizes.values())} devices; there are {len(devices)} "
                        f"(give one axis -1 to take the rest)")
    return jax.sharding.Mesh(np.asarray(devices).reshape(tuple(sizes.values())), tuple(sizes))


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,fsdp=-1,tensor=1" -> {"data": 2, "fsdp": -1, "tensor": 1}; axes not named have size 1."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    given = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes:
            raise UserError(f"mesh: unknown axis {name!r}; the axes are data, fsdp and tensor")
        try:
            given[name] = int(value)
        except ValueError:
            raise UserError(f"mesh: {part!r} needs an integer size, e.g. fsdp=-1") from None
    return {**sizes, **given}


def check_mesh(mesh: jax.sharding.Mesh, config, *, per_device_batch: int) -> None:
    """Refuse meshes the model or the batch cannot use: a tensor axis that does not divide the attention heads
    (the heads would stay whole on every device), or processes that cannot hold whole rows of the batch."""
    tensor = mesh.shape["tensor"]
    heads = getattr(config, "num_heads", None) or getattr(config, "n_head", None)  # Llama-style, GPT-2
    if tensor > 1 and heads and heads % tensor:
        raise UserError(f"mesh tensor={tensor} does not divide the model's {heads} attention heads"
                        + (" (it is larger)" if tensor > heads else "")
                        + f"; use a tensor size that divides {heads}, and put the other devices on fsdp")
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_devices % jax.process_count():
        raise UserError(f"the batch is split over data x fsdp = {batch_devices} devices, which does not divide "
                        f"over {jax.process_count()} processes; make data x fsdp a multiple of the process count")
    if per_device_batch < 1:
        raise UserError("per_device_train_batch_size must be at least 1")
