"""Decoder blocks held stacked (models/blocks.py `stacked`, `run_blocks`): no per-step copy of the weights in the
compiled step, one structure for every layer of every family, LoRA adapters and dropout keys per layer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dpo_jax
from dpo_jax import lora
from dpo_jax import step as S
from dpo_jax.losses import LossConfig
from dpo_jax.models import family
from dpo_jax.models.llama import LlamaConfig
from dpo_jax.sharding import make_mesh
from tiny_models import make_model


def llama(hidden, layers, vocab):
    """A Llama config of these widths (no checkpoint): for compiling a step abstractly."""
    head_dim = hidden // 4
    inv_freq = tuple(float(x) for x in 1 / 10000 ** (np.arange(0, head_dim, 2) / head_dim))
    return LlamaConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                       num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=head_dim, rms_norm_eps=1e-6,
                       inv_freq=inv_freq, hidden_act="silu", qkv_bias=False, o_bias=False, mlp_bias=False,
                       qk_norm=False, tie_word_embeddings=False, sliding_windows=(None,) * layers)


@pytest.mark.parametrize("remat", [True, False])
@pytest.mark.parametrize("fsdp", [1, 8])
def test_the_compiled_step_copies_no_weights(remat, fsdp):
    """The train step's optimized HLO holds no concatenate of the layers' weights (the blocks are scanned as
    they are held), on one device and split over fsdp=8."""
    layers = 5
    mesh = make_mesh(fsdp=fsdp, devices=jax.devices()[:fsdp])
    config = llama(64, layers, 512)
    model_cls = family("llama").Model
    cfg = S.StepConfig(loss=LossConfig(), gradient_checkpointing=remat)
    graphdef, params = S.split_policy(model_cls(config, rngs=nnx.Rngs(0)), remat)
    ref_graphdef, ref = S.split_reference(model_cls(config, rngs=nnx.Rngs(1)), remat)
    params, ref = S.shard_params(params, mesh), S.shard_params(ref, mesh)
    tx = S.make_optimizer(S.OptimConfig(), 10)
    state = S.init_state(params, tx)
    shape = (2 * fsdp, 32)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=S.batch_sharding(mesh))
             for k in ("input_ids", "position_ids", "segment", "branch", "source")}
    batch["pair_mask"] = jax.ShapeDtypeStruct((fsdp,), jnp.int32, sharding=S.batch_sharding(mesh))
    hlo = S.compile_train_step(graphdef, ref_graphdef, cfg, tx, mesh, state, ref).lower(
        state, ref, batch).compile().as_text()
    assert "while" in hlo  # the scan over the layers
    stacked_results = [line for line in hlo.splitlines()
                       if re.search(rf"= f32\[{layers},[\d,]+\]\S* concatenate\(", line)]
    assert not stacked_results, stacked_results[:3]


@pytest.mark.parametrize("name", ["gemma3_text", "qwen2_sliding", "gpt2"])
def test_every_layer_has_one_structure(name, tmp_path):
    """Sliding and global layers (Gemma 3, Qwen2's max_window_layers), each with its RoPE base, and GPT-2's
    per-layer score scale are data of one block structure: every weight is stacked, with the layer axis first."""
    make_model(name).save_pretrained(tmp_path)
    model = dpo_jax.from_pretrained(str(tmp_path))
    blocks = model.h if name == "gpt2" else model.layers
    flat = nnx.to_flat_state(nnx.state(blocks, nnx.Param))
    assert flat and all(v.get_value().shape[0] == 3 and v.get_metadata()["out_sharding"][0] == "layers"
                        for _, v in flat)


def test_stacked_adapters_have_a_layer_axis_and_keys_per_layer(tmp_path):
    make_model("llama").save_pretrained(tmp_path)
    mesh = make_mesh(fsdp=2, tensor=4)
    model = lora.apply_lora(dpo_jax.from_pretrained(str(tmp_path), mesh=mesh), rank=4, alpha=8, dropout=0.1)
    q = model.layers.self_attn.q_proj
    assert q.lora_a.shape == (3, 64, 4) and q.lora_b.shape == (3, 4, 64)
    assert q.lora_a.get_metadata()["out_sharding"] == ("layers", "embed", None)
    assert q.lora_a[...].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert q.lora_b[...].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    bound = 1 / np.sqrt(64)
    a = np.asarray(q.lora_a[...])
    assert np.abs(a).max() <= bound and not np.allclose(a[0], a[1])  # PEFT's init, drawn for each layer
    assert not np.asarray(q.lora_b[...]).any()
    _, _, keys, _ = nnx.split(model, nnx.LoRAParam, lora.LoRAKey, nnx.Param)
    fresh = jax.tree.leaves(lora.dropout_keys(keys, jnp.int32(1), seed=0))
    assert all(k.shape == (3, 2) and len({tuple(row) for row in np.asarray(k)}) == 3 for k in fresh)
    assert len({tuple(np.asarray(k)[0]) for k in fresh}) == len(fresh)  # and per adapter
    adapters = nnx.state(model, nnx.LoRAParam)
    assert sum(x.size for x in jax.tree.leaves(adapters)) == 3 * 4 * ((64 + 64) + (64 + 32))
