"""Bad checkpoints fail with errors that name the tensor or the file, before any weight is loaded."""

import json
import subprocess
import sys

import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file, save_file

import dpo_jax
from tiny_models import make_model


@pytest.fixture
def llama_dir(tmp_path):
    make_model("llama").save_pretrained(tmp_path)
    return tmp_path


def _edit(directory, edit):
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(llama_dir):
    _edit(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(dpo_jax.CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"):
        dpo_jax.from_pretrained(str(llama_dir))


def test_unused_tensor_is_named(llama_dir):
    _edit(llama_dir, lambda t: t.update({"model.layers.0.self_attn.extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(dpo_jax.CheckpointError, match=r"unused tensors: model\.layers\.0\.self_attn\.extra\.weight"):
        dpo_jax.from_pretrained(str(llama_dir))


def test_misshaped_tensor_is_named(llama_dir):
    _edit(llama_dir, lambda t: t.update({"model.norm.weight": np.ones(63, np.float32)}))
    with pytest.raises(dpo_jax.CheckpointError, match=r"mis-shaped tensors: model\.norm\.weight \(63,\).*\(64,\)"):
        dpo_jax.from_pretrained(str(llama_dir))


def test_config_that_does_not_match_weights(llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(dpo_jax.CheckpointError, match=r"missing tensors: model\.layers\.3\."):
        dpo_jax.from_pretrained(str(llama_dir))


def test_unsupported_model_type_lists_supported(tmp_path):
    transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=8).save_pretrained(tmp_path)
    with pytest.raises(dpo_jax.CheckpointError, match=r"'bert' is not supported.*gemma, gemma2.*qwen3"):
        dpo_jax.from_pretrained(str(tmp_path))


def test_directory_without_weights(tmp_path):
    make_model("gpt2").config.save_pretrained(tmp_path)
    with pytest.raises(dpo_jax.CheckpointError, match="no weights found"):
        dpo_jax.from_pretrained(str(tmp_path))


def test_missing_path():
    with pytest.raises(dpo_jax.CheckpointError, match="no such file or directory"):
        dpo_jax.from_pretrained("./does/not/exist")


def test_unreachable_repo_id_is_a_clear_error():
    with pytest.raises(dpo_jax.CheckpointError, match="could not be fetched from the Hugging Face hub"):
        dpo_jax.from_pretrained("no-such-org/no-such-model")


def test_cli_error_exit_status_and_no_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "dpo_jax", "demo", "--model_name_or_path", str(tmp_path / "x")],
                            capture_output=True, text=True, cwd=tmp_path)  # not over the checkout's runs/demo
    assert result.returncode == 2
    assert "no such file or directory" in result.stderr and "Traceback" not in result.stderr


def test_duplicated_tensor_is_named(llama_dir):
    """The same parameter under its full and its base-model name."""
    _edit(llama_dir, lambda t: t.update({"norm.weight": t["model.norm.weight"]}))
    with pytest.raises(dpo_jax.CheckpointError, match=r"duplicated tensors: .*norm\.weight.*\(both norm\.weight\)"):
        dpo_jax.from_pretrained(str(llama_dir))


def test_unsupported_rope_type(tmp_path):
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                      num_attention_heads=2, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                                              "rope_theta": 10000.0})
    config.save_pretrained(tmp_path)
    with pytest.raises(dpo_jax.CheckpointError, match=r"rope_type 'yarn' is not supported yet; supported: default"):
        dpo_jax.from_pretrained(str(tmp_path))


def test_bidirectional_gemma3_is_refused(tmp_path):
    transformers.Gemma3TextConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                  use_bidirectional_attention=True).save_pretrained(tmp_path)
    with pytest.raises(dpo_jax.CheckpointError, match="use_bidirectional_attention"):
        dpo_jax.from_pretrained(str(tmp_path))
