"""Loading straight into a mesh of 8 simulated devices gives the one-device logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
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


# The intended layout, written out: weights split over fsdp on their model-width side and over tensor on their
# head / feed-forward / vocabulary side; norm scales and biases of a split side follow it; LoRA's A like its
# kernel's input side, B like its output side; AdamW's moments like their parameters; scalars replicated.
INTENDED = {
    "embed_tokens.embedding": ("tensor", "fsdp"), "lm_head.kernel": ("fsdp", "tensor"),
    "q_proj.kernel": ("fsdp", "tensor"), "k_proj.kernel": ("fsdp", "tensor"), "v_proj.kernel": ("fsdp", "tensor"),
    "o_proj.kernel": ("tensor", "fsdp"), "gate_proj.kernel": ("fsdp", "tensor"), "up_proj.kernel": ("fsdp", "tensor"),
    "down_proj.kernel": ("tensor", "fsdp"), "q_proj.bias": ("tensor",), "k_proj.bias": ("tensor",),
    "v_proj.bias": ("tensor",), "o_proj.bias": ("fsdp",), "gate_proj.bias": ("tensor",), "up_proj.bias": ("tensor",),
    "down_proj.bias": ("fsdp",), "q_proj.lora_a": ("fsdp", None), "q_proj.lora_b": (None, "tensor"),
    "v_proj.lora_a": ("fsdp", None), "v_proj.lora_b": (None, "tensor"), "layernorm.weight": (None,),
    "norm.weight": (None,),
}


def _intended(path: str, leaf, mesh) -> P:
    names = path.replace("']['", ".").replace("['", ".").replace("']", "").split(".")
    key = next((k for k in INTENDED if ".".join(names).removesuffix(".value").endswith(k)), None)
    if key is None:  # a scalar (step, counts) or dropout keys: replicated
        assert leaf.ndim == 0 or "lora_key" in path, path
        return P(*(None,) * leaf.ndim)
    axes = INTENDED[key]
    if leaf.ndim == len(axes) + 1:  # a stacked block's weight: a leading layer axis, not split
        axes = (None, *axes)
    return P(*(a if a and mesh.shape[a] > 1 else None for a in axes))


def _check_layout(tree, mesh, what: str) -> int:
    """Every leaf laid out as INTENDED, each device holding exactly its share; the number of split leaves."""
    split = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        want = _intended(name, leaf, mesh)
        spec = leaf.sharding.spec
        spec = P(*spec, *(None,) * (leaf.ndim - len(spec)))  # P() is P(None, None) for a matrix
        assert spec == want, f"{what}{name}: {leaf.sharding.spec}, intended {want}"
        share = np.prod([mesh.shape[a] for a in want if a])
        assert {s.data.nbytes for s in leaf.addressable_shards} == {leaf.nbytes // share}, f"{what}{name}"
        split += share > 1
    return split


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("sizes", [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)], ids=["fsdp8", "data2fsdp2tensor2"])
def test_every_leaf_of_the_training_state_is_laid_out_as_intended(tmp_path_factory, sizes, lora):
    from dpo_jax import step as S
    from dpo_jax import trainer
    from dpo_jax.config import LoraConfig, Options, RunConfig
    from test_step import make_batch

    path = tmp_path_factory.mktemp("llama")
    make_model("llama").save_pretrained(path)
    o = Options(run=RunConfig(model_name_or_path=str(path), gradient_checkpointing=True),
                lora=LoraConfig(use_peft=lora, lora_dropout=0.1 if lora else 0.05))
    mesh = make_mesh(**sizes)
    models = trainer.build_models(o, mesh, jnp.float32)
    tx = S.make_optimizer(o.optim, 10)
    state = S.init_state(models.params, tx, donate=True)
    moments = [s for s in jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu")) if hasattr(s, "mu")]
    assert len(moments) == 1 and len(jax.tree.leaves(moments[0].mu)) == len(jax.tree.leaves(state.params))
    split = _check_layout(state, mesh, "state")
    assert split >= 3 * (2 if lora else 8), "parameters, mu and nu of every split weight"
    _check_layout(models.ref, mesh, "reference")

    step = S.compile_train_step(models.graphdef, models.ref_graphdef, trainer.step_config(o), tx, mesh, state,
                                models.ref)
    state, metrics = step(state, models.ref, jax.device_put(make_batch(b=8, t=16), S.batch_sharding(mesh)))
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
    _check_layout(state, mesh, "state after a step")
