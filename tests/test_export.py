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


def test_export_again_replaces_the_directory_whole_and_carries_generation_config(tmp_path):
    """A second export into the same directory: the first one's files (its sharded weights, its tokenizer, an
    adapter_config.json put there by another tool) do not survive; the source's generation_config.json comes
    along; nothing is left beside the directory."""
    first, second = make_model("llama", seed=11), make_model("llama", seed=12)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=[2, 5], temperature=0.7, do_sample=True) \
        .save_pretrained(tmp_path / "b")
    vocab = {f"w{i}": i for i in range(128)}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="w0")), unk_token="w0")
    out = tmp_path / "out"
    dpo_jax.export_pretrained(dpo_jax.from_pretrained(str(tmp_path / "a")), str(out), tokenizer,
                              max_shard_size="40KB")
    (out / "adapter_config.json").write_text("{}")
    os.chmod(out, 0o750)
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors.index.json").exists()
    dpo_jax.export_pretrained(dpo_jax.from_pretrained(str(tmp_path / "b")), str(out), source=str(tmp_path / "b"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "out"]  # no staging or old copy left
    assert os.stat(out).st_mode & 0o777 == 0o750  # the directory's permissions are kept
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert generation.eos_token_id == [2, 5] and generation.temperature == 0.7
    ids, mask = batch()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert relative_error(torch_logits(reloaded, ids, mask), torch_logits(second, ids, mask), mask) <= 1e-6


def test_export_keeps_the_old_export_when_writing_fails(tmp_path, monkeypatch):
    make_model("llama", seed=13).save_pretrained(tmp_path / "src")
    model = dpo_jax.from_pretrained(str(tmp_path / "src"))
    dpo_jax.export_pretrained(model, str(tmp_path / "out"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    import safetensors.numpy

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    with pytest.raises(OSError, match="No space"):
        dpo_jax.export_pretrained(model, str(tmp_path / "out"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


def test_export_refuses_the_source_a_protected_path_a_file_and_a_foreign_directory(tmp_path):
    make_model("llama", seed=14).save_pretrained(tmp_path / "src")
    model = dpo_jax.from_pretrained(str(tmp_path / "src"))
    weights = (tmp_path / "src" / "model.safetensors").read_bytes()
    with pytest.raises(dpo_jax.UserError, match="would write over the source model"):
        dpo_jax.export_pretrained(model, str(tmp_path / "src"), source=str(tmp_path / "src"))
    with pytest.raises(dpo_jax.UserError, match="would write over the source model"):
        dpo_jax.export_pretrained(model, str(tmp_path), source=str(tmp_path / "src"))  # its parent: replaced whole
    with pytest.raises(dpo_jax.UserError, match="would write over the reference model"):
        dpo_jax.export_pretrained(model, str(tmp_path / "src" / "hf"), protected={"the reference model":
                                                                                   str(tmp_path / "src")})
    assert (tmp_path / "src" / "model.safetensors").read_bytes() == weights
    (tmp_path / "file").write_text("x")
    with pytest.raises(dpo_jax.UserError, match="is an existing file"):
        dpo_jax.export_pretrained(model, str(tmp_path / "file"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(dpo_jax.UserError, match="holds other things than an exported model .*todo.txt"):
        dpo_jax.export_pretrained(model, str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "x"


def test_export_command_refuses_the_base_model_the_run_and_a_file(tmp_path, capsys):
    """`dpo-jax export` of a run's checkpoint (saved here without training: the base weights): refused into the
    base model's directory, the run's own directory and an existing file (exit 2, nothing touched); into a new
    directory it carries the base model's generation_config.json."""
    from dpo_jax import options
    from dpo_jax import step as S
    from dpo_jax.checkpoint import Checkpoints
    from dpo_jax.cli import main

    base = tmp_path / "base"
    make_model("llama", seed=15).save_pretrained(base)
    transformers.GenerationConfig(eos_token_id=3, max_new_tokens=17).save_pretrained(base)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(128)},
                                                                          unk_token="w0")), unk_token="w0")
    tokenizer.save_pretrained(base)
    run = tmp_path / "run"
    o = options.parse(["--model_name_or_path", str(base), "--output_dir", str(run)])
    _, params = S.split_policy(dpo_jax.from_pretrained(str(base)), False)
    with Checkpoints(run / "checkpoints") as ckpt:
        ckpt.save(1, S.init_state(params, S.make_optimizer(o.optim, 10)), {}, options.to_dict(o))
    before = sorted(p.name for p in base.iterdir())
    (tmp_path / "file").write_text("x")
    for target, message in ((base, "would write over the source model"), (run, "would write over the run's"),
                            (tmp_path / "file", "is an existing file")):
        assert main(["export", "--checkpoint", str(run), "--output_dir", str(target)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert sorted(p.name for p in base.iterdir()) == before and (tmp_path / "file").read_text() == "x"
    assert main(["export", "--checkpoint", str(run), "--output_dir", str(run / "hf")]) == 0
    assert transformers.GenerationConfig.from_pretrained(run / "hf").max_new_tokens == 17
    assert sorted(p.name for p in (run / "hf").iterdir()) == ["config.json", "generation_config.json",
                                                             "model.safetensors", "tokenizer.json",
                                                             "tokenizer_config.json"]
