"""Logical axis names -> mesh axes. Parameters are annotated with logical names in the model code; this
one table decides how they are laid out on a `jax.sharding.Mesh` with axes data / fsdp / tensor.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .errors import UserError

log = logging.getLogger(__name__)

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


def is_matrix(leaf) -> bool:
    """Whether a parameter is a matrix (2+ dimensions) per layer: a stacked block's weight counts without its
    leading layer axis (logical name "layers"), so a stack of norm scales is still a vector. `leaf` is an
    nnx.Variable (its logical axes known) or an array (taken as it is)."""
    value = leaf.get_value() if hasattr(leaf, "get_metadata") else leaf
    axes = (leaf.get_metadata().get("out_sharding") or ()) if hasattr(leaf, "get_metadata") else ()
    return value.ndim - (1 if axes and axes[0] == "layers" else 0) >= 2


def is_variable(x) -> bool:
    return hasattr(x, "get_metadata") and hasattr(x, "get_value")


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


def gathered_spec(axes: tuple[str | None, ...] | None, shape: tuple[int, ...], mesh) -> PartitionSpec:
    """A parameter's layout with its fsdp split undone (tensor splits kept): what a layer uses in its matmul."""
    spec = logical_to_spec(tuple(axes or (None,) * len(shape)), shape, mesh)
    return PartitionSpec(*(None if a == "fsdp" else a for a in spec))


# ------------------------------------------------------------------------------------------ activation hints
# The mesh whose data x fsdp devices split a traced step's rows (`activations_on`); None: no hints. The step sets
# it while tracing, so the model code can pin activations without every call carrying the mesh.
_ACTIVATION_MESH: contextvars.ContextVar = contextvars.ContextVar("dpo_jax_activation_mesh", default=None)
ROW_AXES = ("data", "fsdp")  # a batch's rows are split over both; tensor-parallel devices share rows


@contextlib.contextmanager
def activations_on(mesh):
    """Trace with activation sharding hints for `mesh`: block inputs and outputs, the hidden states and the head's
    logits stay split by rows over data x fsdp (and the vocabulary over tensor). Without them XLA may keep the
    whole batch on every device, split over the hidden dimension, and all-reduce it in every layer: per-device
    activation memory would grow with the number of devices."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def activation_mesh() -> jax.sharding.Mesh | None:
    """The mesh set by `activations_on` while tracing a step (None outside one)."""
    return _ACTIVATION_MESH.get()


def constrain_rows(x: jax.Array, *rest: str | None) -> jax.Array:
    """`x` pinned to rows over data x fsdp (its leading axis) and `rest` for the next axes (e.g. "tensor" for a
    vocabulary axis), while tracing under `activations_on`; unchanged otherwise. An axis its mesh axes do not
    divide stays replicated."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return x
    axes = [ROW_AXES, *rest]
    sizes = [mesh.shape["data"] * mesh.shape["fsdp"]] + [mesh.shape[a] if a else 1 for a in rest]
    axes = [a if dim % size == 0 else None for a, dim, size in zip(axes, x.shape, sizes)]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*axes)))


def gather_weight(variable) -> jax.Array:
    """A parameter's value gathered over fsdp (still split over tensor) while tracing under `activations_on`, as
    its matmul uses it (a sharding constraint: XLA places the gather); unchanged otherwise. A stacked weight's
    layer (its variable still names the layer axis) is gathered as the layer's weight."""
    value = variable.get_value()
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.shape["fsdp"] == 1:
        return value
    axes = variable.get_metadata().get("out_sharding")
    if axes and len(axes) > value.ndim:  # one layer of a stacked weight, inside the scan over the blocks
        axes = axes[len(axes) - value.ndim:]
    spec = gathered_spec(axes, value.shape, mesh)
    return jax.lax.with_sharding_constraint(value, NamedSharding(mesh, spec))


def per_device_rows(f, rows, weight, dtype, shared=()):
    """`f(*rows, weight, *shared)` run by each device on its own rows, under `activations_on` a mesh whose data x
    fsdp devices divide them: `rows` are arrays with the batch's rows on their second axis (a loop axis first),
    `weight` a parameter (nnx.Variable) that `f` uses whole (the output head), cast to `dtype`; `shared` arrays
    every device holds whole (a scalar bound); `f`'s results have rows on their second axis. Each device gathers
    its fsdp shard of the weight once, before `f`'s loop, so a loop in `f` accumulates the weight's gradient on
    each device, and the gather's transpose reduce-scatters it over fsdp (and sums it over data) once per
    forward and backward pass (a micro-batch; XLA:TPU runs that reduce-scatter as one all-reduce of the
    weight, its own choice): traced as one global program, every iteration's matmul over the
    split rows would all-reduce the whole gradient (an 8B model's 1 GB head, once per chunk of the head's loop).
    `jax.shard_map`, manual over data and fsdp, tensor left to XLA. Without a mesh, or rows the devices do not
    divide, plain `f` with the weight gathered by a sharding constraint."""
    mesh = _ACTIVATION_MESH.get()
    split = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    if split == 1 or any(x.shape[1] % split for x in rows):
        return f(*rows, gather_weight(weight).astype(dtype), *shared)
    value = weight.get_value().astype(dtype)
    spec = logical_to_spec(tuple(weight.get_metadata().get("out_sharding") or (None,) * value.ndim), value.shape,
                           mesh)
    split_dim = next((d for d, axis in enumerate(spec) if axis == "fsdp"), None)

    def local(*args):
        *own, shard, common = args
        if split_dim is None:  # whole on every device already: made per-device (its transpose: one sum)
            whole = jax.lax.pcast(shard, ROW_AXES, to="varying")
        else:  # transposed: one reduce-scatter over fsdp, then a sum over data
            whole = jax.lax.pcast(jax.lax.all_gather(shard, "fsdp", axis=split_dim, tiled=True), ("data",),
                                  to="varying")
        with activations_on(None):  # inside, every array is one device's: no hints
            return f(*own, whole, *common)

    weight_spec = PartitionSpec(*(axis if axis == "fsdp" else None for axis in spec))  # tensor: XLA's
    out = jax.eval_shape(lambda *a: f(*a, gather_weight(weight).astype(dtype), *shared), *rows)
    return jax.shard_map(local, mesh=mesh, axis_names=set(ROW_AXES),
                         in_specs=(*(PartitionSpec(None, ROW_AXES) for _ in rows), weight_spec,
                                   tuple(PartitionSpec() for _ in shared)),
                         out_specs=jax.tree.map(lambda _: PartitionSpec(None, ROW_AXES), out))(
        *rows, value, tuple(shared))


def platform() -> str:
    """The platform the traced step runs on: its mesh's devices' under `activations_on` (`tpu` when `dpo-jax
    plan` compiles for a TPU topology from a CPU host), else JAX's default backend."""
    mesh = _ACTIVATION_MESH.get()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def rows_per_device(rows: int) -> int:
    """The rows of a batch of `rows` that one device holds under `activations_on` (all of them without it)."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None:
        return rows
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    return rows // split if rows % split == 0 else rows


def vocab_per_device(vocab: int) -> int:
    mesh = _ACTIVATION_MESH.get()
    tensor = 1 if mesh is None else mesh.shape["tensor"]
    return vocab // tensor if vocab % tensor == 0 else vocab


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
    fsdp = mesh.shape["fsdp"]
    width = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if fsdp > 1 and width and width % fsdp:
        # logical_to_spec leaves a dimension its mesh axis does not divide whole on every device
        log.warning("mesh fsdp=%d does not divide the model's width %d: its weights stay whole on every device "
                    "(no FSDP); use an fsdp size that divides %d, and put the other devices on data", fsdp, width,
                    width)
