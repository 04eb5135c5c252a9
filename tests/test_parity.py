"""Our Flax models against transformers' PyTorch models on the same weights, for every architecture."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax.serialization import msgpack_serialize
from safetensors.numpy import load_file, save_file
from transformers.pytorch_utils import Conv1D

import dpo_jax
from tiny_models import CONFIGS, batch, make_model, relative_error, torch_logits

TOL = 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    ref_model = make_model(name)
    ref_model.save_pretrained(tmp_path)
    model = dpo_jax.from_pretrained(str(tmp_path))
    ids, mask = batch()
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    ref = torch_logits(ref_model, ids, mask)
    assert got.shape == ref.shape
    assert relative_error(got, ref, mask) <= TOL


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_padding_does_not_change_logits(name, tmp_path):
    """A left- or right-padded sequence gives the logits of the same sequence unpadded (transformers)."""
    ref_model = make_model(name)
    ref_model.save_pretrained(tmp_path)
    model = dpo_jax.from_pretrained(str(tmp_path))
    ids, mask = batch()
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    for row in (1, 2):
        real = mask[row].astype(bool)
        alone = ids[row][real][None]
        ref = torch_logits(ref_model, alone, np.ones_like(alone))[0]
        assert relative_error(got[row][real], ref, np.ones(len(ref))) <= TOL


def test_sharded_safetensors(tmp_path):
    ref_model = make_model("llama", seed=1)
    ref_model.save_pretrained(tmp_path, max_shard_size="30KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model = dpo_jax.from_pretrained(str(tmp_path))
    ids, mask = batch()
    assert relative_error(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))),
                          torch_logits(ref_model, ids, mask), mask) <= TOL


def _to_hf_flax(model: torch.nn.Module) -> dict:
    """The nested parameter dict transformers' Flax models used: Dense/Conv1D `kernel` = PyTorch weight
    transposed, `embedding` for nn.Embedding, `scale` for nn.LayerNorm, RMSNorm keeps `weight`."""
    kinds = {}
    for module_name, module in model.named_modules():
        kinds[module_name] = type(module)
    params = {}
    for name, tensor in model.state_dict().items():
        module_name, leaf = name.rsplit(".", 1)
        array = tensor.numpy()
        kind = kinds[module_name]
        if leaf == "weight" and issubclass(kind, (torch.nn.Linear, Conv1D)):
            leaf, array = "kernel", array.T
        elif leaf == "weight" and issubclass(kind, torch.nn.Embedding):
            leaf = "embedding"
        elif leaf == "weight" and issubclass(kind, torch.nn.LayerNorm):
            leaf = "scale"
        node = params
        for part in module_name.split("."):
            node = node.setdefault(part, {})
        node[leaf] = np.ascontiguousarray(array)
    return params


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_flax_msgpack_weights(name, tmp_path):
    ref_model = make_model(name, seed=2)
    ref_model.config.save_pretrained(tmp_path)
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(_to_hf_flax(ref_model)))
    model = dpo_jax.from_pretrained(str(tmp_path))
    ids, mask = batch()
    assert relative_error(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))),
                          torch_logits(ref_model, ids, mask), mask) <= TOL


def test_bfloat16_params_and_compute(tmp_path):
    """bfloat16 storage and compute stays close to float32 transformers (bf16 rounding, not a bug)."""
    ref_model = make_model("llama")
    ref_model.save_pretrained(tmp_path)
    model = dpo_jax.from_pretrained(str(tmp_path), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    ids, mask = batch()
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))
    # bfloat16 keeps 8 significant bits: a few percent of the largest logit is its rounding.
    assert relative_error(got, torch_logits(ref_model, ids, mask), mask) <= 5e-2


def test_config_json_roundtrip_of_model_type(tmp_path):
    ref_model = make_model("qwen3")
    ref_model.save_pretrained(tmp_path)
    model = dpo_jax.from_pretrained(str(tmp_path))
    assert json.loads(model.config.hf_config_json)["model_type"] == "qwen3"
    assert model.config.qk_norm and model.config.head_dim == 24


def _correctly_rounded_default_rope(torch_model) -> None:
    """torch's float32 pow rounds `theta ** (2i / d)` differently on different CPUs (its AVX2 and AVX-512 kernels
    differ by an ulp in some entries; the AVX-512 one is correctly rounded): give the reference's default-type
    RoPE tables the correctly rounded power, so that what is compared is the same on every machine."""
    for module in torch_model.modules():
        params = getattr(getattr(module, "config", None), "rope_parameters", None) or {}
        if getattr(module, "rope_type", None) != "default" or "rope_theta" not in params:
            continue
        dim = module.inv_freq.shape[0] * 2
        exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
        power = (np.float64(np.float32(params["rope_theta"])) ** exponents.astype(np.float64)).astype(np.float32)
        table = torch.from_numpy(np.float32(1.0) / power)
        assert torch.allclose(table, module.inv_freq, rtol=2.4e-7, atol=0)  # within an ulp of torch's own
        module.inv_freq.copy_(table)
        if hasattr(module, "original_inv_freq"):
            module.original_inv_freq = table.clone()


@pytest.mark.parametrize("name", ["llama_head128", "llama", "gemma3_text"])
def test_far_positions_match_transformers(name, tmp_path):
    """RoPE frequencies agree to the bit: at position 30000 a float64-rounded table is off by ~1e-4."""
    ref_model = make_model(name)
    ref_model.save_pretrained(tmp_path)
    _correctly_rounded_default_rope(ref_model)
    model = dpo_jax.from_pretrained(str(tmp_path))
    ids, _ = batch()
    far = np.broadcast_to(np.arange(ids.shape[1]) + 30000, ids.shape)
    with torch.no_grad():
        ref = ref_model(input_ids=torch.tensor(ids), position_ids=torch.tensor(far)).logits.numpy()
    got = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(far)))
    assert relative_error(got, ref, np.ones(ids.shape)) <= TOL


def test_out_of_range_padding_id_gives_no_nan(tmp_path):
    """A padding id past the vocabulary (masked out) must not turn the row into NaN."""
    ref_model = make_model("llama")
    ref_model.save_pretrained(tmp_path)
    model = dpo_jax.from_pretrained(str(tmp_path))
    ids, mask = batch()
    padded = np.where(mask.astype(bool), ids, 128)  # 128 == vocab_size
    got = np.asarray(model(jnp.asarray(padded), jnp.asarray(mask)))
    assert np.isfinite(got).all()
    assert relative_error(got, torch_logits(ref_model, ids, mask), mask) <= TOL


def test_tied_config_with_a_different_head_uses_the_head(tmp_path):
    """transformers uses a checkpoint's own lm_head even when the config says tied; so must we."""
    ref_model = make_model("llama", seed=7)  # untied, its head differs from its embedding
    ref_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    model = dpo_jax.from_pretrained(str(tmp_path))
    ids, mask = batch()
    ref = torch_logits(reference, ids, mask)
    assert relative_error(ref, torch_logits(ref_model, ids, mask), mask) <= TOL  # transformers kept the head
    assert relative_error(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))), ref, mask) <= TOL


def test_tied_checkpoint_carrying_a_copy_of_the_head(tmp_path):
    ref_model = make_model("gemma2", seed=8)
    ref_model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = dpo_jax.from_pretrained(str(tmp_path))
    assert model.lm_head is None
    ids, mask = batch()
    assert relative_error(np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))),
                          torch_logits(ref_model, ids, mask), mask) <= TOL
