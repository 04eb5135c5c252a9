"""export_pretrained writes what transformers loads, and transformers then computes the original logits."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch
import transformers

import dpo_jax
from tiny_models import batch, make_model, relative_error, torch_logits


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3_text", "gpt2"])
def test_export_roundtrip_through_transformers(name, tmp_path):
    ref_model = make_model(name, seed=3)
    ref_model.save_pretrained(tmp_path / "src")
    model = dpo_jax.from_pretrained(str(tmp_path / "src"))
    dpo_jax.export_pretrained(model, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids, mask = batch()
    assert relative_error(torch_logits(reloaded, ids, mask), torch_logits(ref_model, ids, mask), mask) <= 1e-6
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_export_sharded_with_tokenizer_and_reload_by_us(tmp_path):
    ref_model = make_model("llama", seed=4)
    ref_model.save_pretrained(tmp_path / "src")
    vocab = {f"w{i}": i for i in range(128)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")
    model = dpo_jax.from_pretrained(str(tmp_path / "src"))
    dpo_jax.export_pretrained(model, str(tmp_path / "out"), tokenizer, max_shard_size="40KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert (tmp_path / "out" / "tokenizer.json").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = batch()
    assert relative_error(torch_logits(reloaded, ids, mask), torch_logits(ref_model, ids, mask), mask) <= 1e-6
    again = dpo_jax.from_pretrained(str(tmp_path / "out"))
    assert relative_error(np.asarray(again(jnp.asarray(ids), jnp.asarray(mask))),
                          torch_logits(ref_model, ids, mask), mask) <= 1e-5


def test_export_bfloat16(tmp_path):
    ref_model = make_model("llama", seed=5)
    ref_model.save_pretrained(tmp_path / "src")
    model = dpo_jax.from_pretrained(str(tmp_path / "src"), param_dtype=jnp.bfloat16)
    dpo_jax.export_pretrained(model, str(tmp_path / "out"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    expected = ref_model.model.layers[0].self_attn.q_proj.weight.to(torch.bfloat16)
    assert torch.equal(reloaded.model.layers[0].self_attn.q_proj.weight, expected)


def test_convert_script(tmp_path):
    """scripts/convert.py: model + tokenizer in, a directory transformers loads out."""
    ref_model = make_model("qwen3", seed=6)
    ref_model.save_pretrained(tmp_path / "src")
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(tmp_path / "src")
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "convert.py")
    result = subprocess.run([sys.executable, script, "--model_name_or_path", str(tmp_path / "src"),
                             "--output_dir", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids, mask = batch()
    assert relative_error(torch_logits(reloaded, ids, mask), torch_logits(ref_model, ids, mask), mask) <= 1e-6
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out")("w5 w7")["input_ids"] == [5, 7]


def test_export_over_an_earlier_export_replaces_its_weights(tmp_path):
    first, second = make_model("llama", seed=9), make_model("llama", seed=10)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    dpo_jax.export_pretrained(dpo_jax.from_pretrained(str(tmp_path / "a")), str(tmp_path / "out"),
                              max_shard_size="40KB")
    dpo_jax.export_pretrained(dpo_jax.from_pretrained(str(tmp_path / "b")), str(tmp_path / "out"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    ids, mask = batch()
    ours = dpo_jax.from_pretrained(str(tmp_path / "out"))
    assert relative_error(np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask))),
                          torch_logits(second, ids, mask), mask) <= 1e-5
