"""The reference log-prob cache's key: computed where the weights live (no copy of the weights to the host),
the same for a sharded and a whole array, and different for any change of a value or its place."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dpo_jax import reference


def _state(values: dict) -> nnx.State:
    return nnx.State({k: nnx.Param(v) for k, v in values.items()})


@pytest.fixture
def arrays():
    rng = np.random.RandomState(0)
    return {"kernel": rng.randn(16, 24).astype(np.float32), "norm": rng.randn(24).astype(np.float32)}


def test_fingerprint_reads_only_checksums_from_the_devices(arrays, monkeypatch):
    """Every device array that goes to the host (jax.device_get, np.asarray, np.array) is counted: 12 bytes per
    parameter, not the weights. (JAX's transfer guard does not act on the CPU backend, hence the counting.)"""
    mesh = jax.make_mesh((8,), ("fsdp",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = {"kernel": jax.device_put(arrays["kernel"], NamedSharding(mesh, PartitionSpec("fsdp", None))),
               "norm": jax.device_put(arrays["norm"], NamedSharding(mesh, PartitionSpec()))}
    assert sharded["kernel"].addressable_shards[0].data.shape == (2, 24)
    moved = []

    def counting(original):
        def call(x, *args, **kwargs):
            moved.extend(a.nbytes for a in jax.tree.leaves(x) if isinstance(a, jax.Array))
            return original(x, *args, **kwargs)
        return call

    for module, name in ((jax, "device_get"), (np, "asarray"), (np, "array")):
        monkeypatch.setattr(module, name, counting(getattr(module, name)))
    key = reference.params_fingerprint(_state(sharded))
    monkeypatch.undo()
    assert 0 < sum(moved) <= 12 * 2 * 2  # each digest may be read twice (device_get, then asarray)
    assert key == reference.params_fingerprint(_state({k: jnp.asarray(v) for k, v in arrays.items()}))


def test_fingerprint_changes_with_any_value_or_its_place(arrays):
    key = reference.params_fingerprint(_state(arrays))
    one = dict(arrays, kernel=arrays["kernel"].copy())
    one["kernel"][3, 5] = np.nextafter(one["kernel"][3, 5], np.float32(np.inf))  # one ulp
    swapped = dict(arrays, kernel=arrays["kernel"].copy())
    swapped["kernel"][[0, 1]] = swapped["kernel"][[1, 0]]
    cast = dict(arrays, norm=arrays["norm"].astype(jnp.bfloat16))
    keys = {reference.params_fingerprint(_state(v)) for v in (one, swapped, cast)}
    assert len(keys) == 3 and key not in keys
    assert reference.params_fingerprint(_state(arrays)) == key
