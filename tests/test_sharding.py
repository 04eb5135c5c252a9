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

    q = sharded.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (32, 16)
    assert sharded.embed_tokens.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.layers[0].mlp.down_proj.kernel[...].sharding.spec == P("tensor", "fsdp")
    assert sharded.norm.weight[...].sharding.spec == P(None)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(single.layers[0].self_attn.q_proj.kernel[...]))

    ids, mask = batch()
    got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(sharded, jnp.asarray(ids), jnp.asarray(mask)))
    ref = np.asarray(single(jnp.asarray(ids), jnp.asarray(mask)))
    assert relative_error(got, ref, mask) <= 1e-5
