"""Loading straight into a mesh of 8 simulated devices gives the one-device logits."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import dpo_jax
from dpo_jax.sharding import make_mesh
from tiny_models import batch, make_model, relative_error


def test_mesh_load_places_each_tensor_and_matches_one_device(tmp_path):
    assert len(jax.devices()) == 8, "conftest sets 8 simulated CPU devices"
    make_model("llama").save_pretrained(tmp_path)
    mesh = make_mesh(data=1, fsdp=2, tensor=4)
    sharded = dpo_jax.from_pretrained(str(tmp_path), mesh=mesh)
    single = dpo_jax.from_pretrained(str(tmp_path))

    # the blocks are stacked: every weight has a leading layer axis, not split, each device holding all 3 layers
    q = sharded.layers.self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P(None, "fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (3, 32, 16)
    assert sharded.embed_tokens.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.layers.mlp.down_proj.kernel[...].sharding.spec == P(None, "tensor", "fsdp")
    assert sharded.layers.input_layernorm.weight[...].sharding.spec == P(None, None)
    assert sharded.norm.weight[...].sharding.spec == P(None)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(single.layers.self_attn.q_proj.kernel[...]))

    ids, mask = batch()
    got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(sharded, jnp.asarray(ids), jnp.asarray(mask)))
    ref = np.asarray(single(jnp.asarray(ids), jnp.asarray(mask)))
    assert relative_error(got, ref, mask) <= 1e-5


def test_mesh_errors_say_what_to_change():
    import types

    import pytest

    from dpo_jax.errors import UserError
    from dpo_jax.sharding import check_mesh, parse_mesh

    with pytest.raises(UserError, match="3 devices do not divide the 8 devices"):
        make_mesh(**parse_mesh("data=3,fsdp=-1"))
    with pytest.raises(UserError, match="only one axis may be -1"):
        make_mesh(**parse_mesh("data=-1,fsdp=-1"))
    with pytest.raises(UserError, match="uses 4 devices; there are 8"):
        make_mesh(**parse_mesh("data=2,fsdp=2"))
    with pytest.raises(UserError, match="unknown axis 'model'"):
        parse_mesh("model=2")
    four_heads = types.SimpleNamespace(num_heads=4)
    with pytest.raises(UserError, match="tensor=8 does not divide the model's 4 attention heads \\(it is larger\\)"):
        check_mesh(make_mesh(fsdp=1, tensor=8), four_heads, per_device_batch=1)
    six_heads = types.SimpleNamespace(num_heads=6)
    with pytest.raises(UserError, match="tensor=4 does not divide the model's 6 attention heads;"):
        check_mesh(make_mesh(fsdp=2, tensor=4), six_heads, per_device_batch=1)
    check_mesh(make_mesh(fsdp=2, tensor=4), four_heads, per_device_batch=1)
    assert make_mesh(**parse_mesh("data=2,fsdp=-1")).shape == {"data": 2, "fsdp": 4, "tensor": 1}
