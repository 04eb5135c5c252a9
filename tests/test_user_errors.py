"""Damaged files and bad options a user can cause: exit status 2 and one paragraph naming the file and what to
do, no traceback (`--debug` shows it). Each class has the cases issue 15 names and at least one more."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict
from safetensors.torch import load_file as torch_load_file, save_file as torch_save_file

import dpo_jax
from dpo_jax import bench, hf
from dpo_jax.cli import main
from tiny_models import make_model
from tiny_tokenizers import gpt2_style, llama3_style

GOOD = {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "Lyon."}
CONV = {"prompt": [{"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}]}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama checkpoint with a tokenizer (copied per test before damaging it)."""
    path = tmp_path_factory.mktemp("llama")
    make_model("llama").save_pretrained(path)
    llama3_style().save_pretrained(path)  # 400 tokens > the model's 128: fine for loading, not for training
    return path


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    make_model("llama").save_pretrained(path, max_shard_size="100KB")
    return path


@pytest.fixture
def model(llama_dir, tmp_path):
    """A copy of the checkpoint to damage."""
    return shutil.copytree(llama_dir, tmp_path / "model")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(GOOD) + "\n" for _ in range(4)))
    return str(path)


def cli(capsys, *argv):
    """Exit status and stderr of `dpo-jax ARGV` run in this process; no traceback may be printed."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err + captured.out
    return code, captured.err


def truncate(path, fraction):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))


# ------------------------------------------------------------------------------------------------- config.json
@pytest.mark.parametrize("content,expected", [
    ("{not json", r"config\.json: not valid JSON \(line 1, column 2"),
    ('{"model_type": "llama", "hidden_size": 64', r"config\.json: not valid JSON"),  # cut short
    ("[1, 2]", r"config\.json: expected a JSON object, found a JSON list"),
    ('{"hidden_size": 64}', r"config\.json: no \"model_type\" key"),
    ('{"model_type": "llama", "hidden_size": "big"}', r"config\.json: transformers cannot read it: .*hidden_size"),
    (b"\xff\xfe{}", r"config\.json: cannot be read \(UnicodeDecodeError"),
], ids=["not-json", "cut-short", "list", "no-model-type", "wrong-value-type", "not-utf8"])
def test_damaged_config_json(model, content, expected):
    path = model / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(dpo_jax.CheckpointError, match=expected) as e:
        dpo_jax.from_pretrained(str(model))
    assert str(path) in str(e.value)


def test_damaged_config_json_from_the_command_line(model, capsys):
    (model / "config.json").write_text("{not json")
    code, err = cli(capsys, "generate", "--model_name_or_path", model, "--prompt", "hi")
    assert code == 2 and f"{model / 'config.json'}: not valid JSON" in err and "restore it" in err


# ------------------------------------------------------------------------------------------------- tokenizers
@pytest.mark.parametrize("damage,expected", [
    (lambda d: [os.remove(d / n) for n in ("tokenizer.json", "tokenizer_config.json")],
     r"model: no tokenizer files\. A model directory needs tokenizer\.json"),
    (lambda d: (d / "tokenizer.json").write_text("{garbage"), r"tokenizer\.json: not valid JSON"),
    (lambda d: truncate(d / "tokenizer.json", 0.5), r"tokenizer\.json: not valid JSON"),
    (lambda d: (d / "tokenizer_config.json").write_text("[]"), r"tokenizer_config\.json: expected a JSON object"),
    (lambda d: os.remove(d / "tokenizer.json"),  # a config without the vocabulary it describes
     r"model: transformers cannot build a tokenizer from it \(ValueError.*tokenizer\.json"),
], ids=["no-files", "corrupt-json", "cut-short", "config-not-object", "config-without-vocabulary"])
def test_missing_or_damaged_tokenizer(model, capsys, data, damage, expected):
    damage(model)
    with pytest.raises(dpo_jax.CheckpointError, match=expected):
        dpo_jax.load_tokenizer(str(model))
    code, err = cli(capsys, "audit", "--model_name_or_path", model, "--dataset_name", data)
    assert code == 2 and str(model) in err


# ------------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("damage,expected", [
    (lambda p: truncate(p, 0.5), "incomplete metadata"),
    (lambda p: truncate(p, 0.999), "incomplete metadata"),
    (lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage garbage}" + b"\x00" * 64), "invalid JSON"),
    (lambda p: p.write_bytes(b""), "header too small"),
], ids=["cut-in-the-middle", "cut-at-the-end", "header-garbage", "empty"])
def test_damaged_safetensors(model, damage, expected):
    damage(model / "model.safetensors")
    with pytest.raises(dpo_jax.CheckpointError, match=rf"model\.safetensors: not a readable safetensors file .*"
                                                      rf"{expected}.*download or copy it again"):
        dpo_jax.from_pretrained(str(model))


LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 538090408\n")


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json"])
def test_git_lfs_pointer_instead_of_the_file(model, name):
    """A repository cloned without git-lfs: small text files where the weights (and often tokenizer.json) go."""
    (model / name).write_bytes(LFS_POINTER)
    load = dpo_jax.load_tokenizer if name == "tokenizer.json" else dpo_jax.from_pretrained
    with pytest.raises(dpo_jax.CheckpointError, match=rf"{re.escape(name)}: .*It is a Git LFS pointer, not the file "
                                                      rf"itself .*`git lfs pull`"):
        load(str(model))


def test_truncated_shard_is_named(sharded_dir, tmp_path, capsys):
    model = shutil.copytree(sharded_dir, tmp_path / "model")
    shard = sorted(model.glob("model-*.safetensors"))[2]
    truncate(shard, 0.5)
    with pytest.raises(dpo_jax.CheckpointError, match=rf"{shard.name}: not a readable safetensors file"):
        dpo_jax.from_pretrained(str(model))
    code, err = cli(capsys, "generate", "--model_name_or_path", model, "--prompt", "hi")
    assert code == 2 and str(shard) in err


@pytest.mark.parametrize("content,expected", [
    ("{x", "not valid JSON"), ("{}", r"expected \{\"weight_map\""), ("[]", "expected a JSON object"),
])
def test_damaged_shard_index(sharded_dir, tmp_path, content, expected):
    model = shutil.copytree(sharded_dir, tmp_path / "model")
    (model / "model.safetensors.index.json").write_text(content)
    with pytest.raises(dpo_jax.CheckpointError, match=rf"model\.safetensors\.index\.json: {expected}"):
        dpo_jax.from_pretrained(str(model))


def test_file_damaged_after_planning_names_file_and_tensor(model):
    """Tensors are read one at a time after the plan: a file that goes bad by then still fails clearly."""
    tensors = hf._checkpoint(str(model))
    truncate(model / "model.safetensors", 0.5)
    with pytest.raises(dpo_jax.CheckpointError, match=r"model\.safetensors: tensor model\.norm\.weight cannot be "
                                                      r"read \(SafetensorError"):
        tensors["model.norm.weight"][1]()


def test_tensor_of_a_dtype_numpy_cannot_hold(model):
    """An FP8 checkpoint: the header reads, the tensor does not."""
    path = model / "model.safetensors"
    tensors = torch_load_file(path)
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.float8_e4m3fn)
    torch_save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(dpo_jax.CheckpointError, match=r"tensor model\.norm\.weight cannot be read .*float8"):
        dpo_jax.from_pretrained(str(model))


@pytest.mark.parametrize("content", [b"\x93garbage", b"", b"\x92\x01\x02"], ids=["garbage", "empty", "a-list"])
def test_damaged_flax_msgpack(model, content):
    os.remove(model / "model.safetensors")
    (model / "flax_model.msgpack").write_bytes(content)
    with pytest.raises(dpo_jax.CheckpointError, match=r"flax_model\.msgpack: not a readable Flax msgpack file"):
        dpo_jax.from_pretrained(str(model))


def _tiny_gguf(path, arch="llama", tokenizer=True):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_feed_forward_length(16)
    if tokenizer:
        writer.add_tokenizer_model("gpt2")
    writer.add_tensor("token_embd.weight", np.ones((16, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_damaged_gguf(tmp_path, capsys):
    path = _tiny_gguf(tmp_path / "model.gguf")
    truncate(path, 0.5)
    with pytest.raises(dpo_jax.CheckpointError, match=r"model\.gguf: not a readable GGUF file .*download"):
        dpo_jax.from_pretrained(path)
    (tmp_path / "garbage.gguf").write_bytes(b"garbage" * 10)
    code, err = cli(capsys, "generate", "--model_name_or_path", tmp_path / "garbage.gguf", "--prompt", "hi")
    assert code == 2 and "garbage.gguf: not a readable GGUF file (ValueError: GGUF magic invalid)" in err


def test_gguf_without_the_metadata_a_model_needs(tmp_path):
    """Written by something else than llama.cpp's converter: no vocabulary, no tokenizer model."""
    path = _tiny_gguf(tmp_path / "model.gguf", tokenizer=False)
    with pytest.raises(dpo_jax.CheckpointError, match=r"lacks the metadata tokenizer\.ggml\.tokens"):
        dpo_jax.from_pretrained(path)
    with pytest.raises(dpo_jax.CheckpointError, match=r"lacks the metadata tokenizer\.ggml\.model, tokenizer\.ggml"):
        dpo_jax.load_tokenizer(path)


def test_gguf_of_an_unsupported_architecture(tmp_path, capsys):
    path = _tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2")
    code, err = cli(capsys, "generate", "--model_name_or_path", path, "--prompt", "hi")
    assert code == 2 and "GGUF architecture 'qwen2' is not supported; supported: llama" in err


# ------------------------------------------------------------------------------------------------- reference cache
@pytest.fixture(scope="module")
def precomputed(llama_dir, tmp_path_factory):
    """A reference pass written to its cache: (reference graphdef, weights, pairs, key, table, cache file)."""
    from dpo_jax import reference
    from dpo_jax import step as S
    from test_batching import random_pairs

    pairs = random_pairs(12)  # token ids < 100 fit the vocabulary of 128
    graphdef, params = S.split_reference(dpo_jax.from_pretrained(str(llama_dir)))
    key = reference.cache_key(params, "cfg", pairs, jnp.float32)
    cache = tmp_path_factory.mktemp("cache")
    table = reference.precompute(graphdef, params, pairs, batch_size=5, pad_token_id=0, cache_dirs=[cache], key=key)
    return graphdef, params, pairs, key, table, cache / f"{key}.npy"


@pytest.mark.parametrize("damage,expected", [
    (lambda p: truncate(p, 0.6), "cannot be read"),
    (lambda p: p.write_bytes(b"garbage" * 20), "cannot be read"),
    (lambda p: np.save(p, np.zeros((3, 2), np.float32)), "shape (3, 2), not float32 [12, 2]"),
    (lambda p: np.save(p, np.full((12, 2), np.nan, np.float32)), "holds non-finite values"),
], ids=["cut-short", "garbage", "wrong-shape", "nan"])
def test_damaged_reference_cache_is_recomputed(precomputed, tmp_path, caplog, damage, expected):
    from dpo_jax import reference

    graphdef, params, pairs, key, first, cached = precomputed
    path = tmp_path / cached.name
    shutil.copy(cached, path)
    damage(path)
    with caplog.at_level(logging.WARNING, logger="dpo_jax.reference"):
        again = reference.precompute(graphdef, params, pairs, batch_size=5, pad_token_id=0, cache_dirs=[tmp_path],
                                     key=key)
    assert f"reference log-prob cache {path} is damaged" in caplog.text and expected in caplog.text
    assert "computed again" in caplog.text
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(np.load(path), first)  # the file replaced by the recomputed table


def test_unwritable_reference_cache_is_passed_over(precomputed, tmp_path, caplog):
    """A cache directory that cannot be made (here a file is in its way; a read-only home alike)."""
    from dpo_jax import reference

    graphdef, params, pairs, key, first, _ = precomputed
    (tmp_path / "file").write_text("")
    with caplog.at_level(logging.WARNING, logger="dpo_jax.reference"):
        table = reference.precompute(graphdef, params, pairs, batch_size=5, pad_token_id=0,
                                     cache_dirs=[tmp_path / "file" / "cache"], key=key)
    assert f"could not be cached in {tmp_path / 'file' / 'cache'}" in caplog.text and "DPO_JAX_CACHE" in caplog.text
    np.testing.assert_array_equal(table, first)


# ------------------------------------------------------------------------------------------------- save_to_disk
@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    llama3_style().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("damage,expected", [
    (lambda d: [os.remove(p) for p in d.glob("*.arrow")], "FileNotFoundError: .*data-00000-of-00001.arrow"),
    (lambda d: (d / "state.json").write_text("{x"), "JSONDecodeError"),
    (lambda d: (d / "state.json").write_text("{}"), "KeyError"),
    (lambda d: (d / "dataset_info.json").write_text("{x"), "JSONDecodeError"),
    (lambda d: [truncate(p, 0.3) for p in d.glob("*.arrow")], "ArrowInvalid"),
], ids=["data-files-deleted", "state-not-json", "state-empty-object", "info-not-json", "data-cut-short"])
def test_damaged_save_to_disk_folder(tmp_path, capsys, tokenizer_dir, damage, expected):
    folder = tmp_path / "saved"
    Dataset.from_list([GOOD] * 4).save_to_disk(folder)
    damage(folder)
    capsys.readouterr()  # the progress bar of saving
    code, err = cli(capsys, "audit", "--model_name_or_path", tokenizer_dir, "--dataset_name", folder)
    assert code == 2 and f"{folder}: a Dataset.save_to_disk folder whose files are missing or damaged" in err
    assert "Save the dataset again with Dataset.save_to_disk" in err
    assert len(err.strip().splitlines()) == 1 and re.search(expected, err)


def test_dataset_dict_folder_with_a_split_deleted(tmp_path, capsys, tokenizer_dir):
    folder = tmp_path / "saved"
    DatasetDict(train=Dataset.from_list([GOOD] * 4), test=Dataset.from_list([GOOD] * 2)).save_to_disk(folder)
    shutil.rmtree(folder / "train")
    capsys.readouterr()
    code, err = cli(capsys, "audit", "--model_name_or_path", tokenizer_dir, "--dataset_name", folder)
    assert code == 2 and f"{folder}: a Dataset.save_to_disk folder whose files are missing" in err


# ------------------------------------------------------------------------------------------------- --debug
@pytest.mark.parametrize("argv", [
    ["--debug", "train", "--model_name_or_path", "./no/such/model"],
    ["train", "--debug", "--model_name_or_path", "./no/such/model"],
    ["evaluate", "--model_name_or_path", "./no/such/model", "--debug"],
    ["audit", "--model_name_or_path", "./no/such/model", "--debug"],
], ids=["before", "after-train", "end-of-evaluate", "end-of-audit"])
def test_debug_anywhere_shows_the_exception(argv, tmp_path, capsys):
    argv = argv + (["--output_dir", str(tmp_path / "out")] if "train" in argv else [])
    with pytest.raises(dpo_jax.CheckpointError, match="no such file or directory"):
        main(argv)
    code, err = cli(capsys, *[a for a in argv if a != "--debug"])
    assert code == 2 and "./no/such/model: no such file or directory" in err


def test_debug_after_the_subcommand_prints_the_traceback(tmp_path):
    """The whole command, as a user runs it (in-process, above, pytest would catch what escapes)."""
    shown = subprocess.run([sys.executable, "-m", "dpo_jax", "evaluate", "--model_name_or_path", str(tmp_path / "x"),
                            "--debug"], capture_output=True, text=True)
    assert shown.returncode not in (0, 2) and "Traceback" in shown.stderr and "CheckpointError" in shown.stderr


def test_interrupted_while_loading(monkeypatch, capsys):
    import dpo_jax.cli as cli_module

    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr(cli_module, "_audit", interrupted)
    code, err = cli(capsys, "audit")
    assert code == 130 and err.strip() == "dpo-jax audit: interrupted"


# ------------------------------------------------------------------------------------------------- batch sizes
@pytest.mark.parametrize("value", ["0", "-4"])
def test_audit_batch_size_must_be_positive(value, capsys):
    with pytest.raises(SystemExit) as e:
        main(["audit", "--per_device_train_batch_size", value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--per_device_train_batch_size: must be at least 1, not {value}" in err


@pytest.mark.parametrize("argv,expected", [
    (["--bench_steps", "1"], "--bench_steps: must be at least 2, not 1"),
    (["--bench_steps", "0"], "--bench_steps: must be at least 2, not 0"),
    (["--bench_epochs", "0"], "--bench_epochs: must be at least 1, not 0"),
])
def test_bench_options_that_measure_nothing(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", *argv])
    assert e.value.code == 2 and expected in capsys.readouterr().err


def test_bench_batch_size_zero(tmp_path, capsys):
    code, err = cli(capsys, "bench", "--per_device_train_batch_size", "0", "--work_dir", tmp_path)
    assert code == 2 and "per_device_train_batch_size must be at least 1, not 0" in err


# ------------------------------------------------------------------------------------------------- bench summary
def _steps(epochs_and_compiles):
    return [{"step": i + 1, "epoch": epoch, "seconds": 1.0, "pairs": 4, "tokens": 100, "flops": 1e9,
             "compiles": compiles} for i, (epoch, compiles) in enumerate(epochs_and_compiles)]


@pytest.mark.parametrize("steps,epochs,expected", [
    (_steps([(0, 1), (0, 1), (0, 1)]), 1, "no step to measure: of the 3 steps trained"),
    (_steps([(0, 1)]), 1, "no step to measure"),
    (_steps([(0, 1), (0, 0)]), 2, r"stopped in epoch 1 of 2 .*--max_steps"),
    ([], 2, "trained no step"),
], ids=["every-step-compiled", "one-step", "stopped-before-the-last-epoch", "no-steps"])
def test_bench_with_no_measured_step(steps, epochs, expected):
    with pytest.raises(dpo_jax.UserError, match=expected):
        bench.summarize(steps, epochs)


def test_bench_summary_of_measured_steps():
    summary = bench.summarize(_steps([(0, 1), (0, 0), (1, 0), (1, 0)]), 2)
    assert summary["measured_steps"] == 2 and summary["pairs_per_second"] == 4.0


# ------------------------------------------------------------------------------------------------- more of the kind
@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    path = tmp_path_factory.mktemp("conv") / "conv.jsonl"
    path.write_text("".join(json.dumps(CONV) + "\n" for _ in range(4)))
    return str(path)


@pytest.mark.parametrize("template,expected", [
    ("{% for m in messages %}{{ m['content'] }", "TemplateSyntaxError"),
    ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
], ids=["syntax-error", "raises"])
def test_chat_template_that_fails_on_any_conversation(tmp_path, capsys, conversations, template, expected):
    tokenizer = llama3_style()
    saved_template = tokenizer.chat_template
    try:
        tokenizer.chat_template = template
        tokenizer.save_pretrained(tmp_path / "tok")
    finally:
        tokenizer.chat_template = saved_template
    code, err = cli(capsys, "audit", "--model_name_or_path", tmp_path / "tok", "--dataset_name", conversations)
    assert code == 2 and f"the chat template of {tmp_path / 'tok'} fails on a single user message" in err
    assert expected in err


@pytest.mark.parametrize("extra,expected", [
    ({"tools": "{not json"}, "row 2: field 'tools' is a string but not valid JSON"),
    ({"chat_template_kwargs": "terse"}, "row 2: field 'chat_template_kwargs' is a str, expected an object"),
], ids=["tools-not-json", "kwargs-not-an-object"])
def test_bad_chat_template_arguments_name_the_row(tmp_path, capsys, tokenizer_dir, extra, expected):
    path = tmp_path / "conv.jsonl"
    good = {**CONV, **{k: None for k in extra}}
    path.write_text("".join(json.dumps(row) + "\n" for row in (good, {**CONV, **extra}, good)))
    code, err = cli(capsys, "audit", "--model_name_or_path", tokenizer_dir, "--dataset_name", path)
    assert code == 2 and f"{path}, {expected}" in err


def test_generate_chat_with_a_broken_template(tmp_path):
    from dpo_jax.generate import encode_prompts

    tokenizer = gpt2_style()
    tokenizer.chat_template = "{{ raise_exception('no') }}"
    try:
        with pytest.raises(dpo_jax.UserError, match=r"--chat: the tokenizer's chat template fails on the prompt"):
            encode_prompts(tokenizer, ["hi"], chat=True)
    finally:
        tokenizer.chat_template = None


def test_damaged_generation_config(model):
    from dpo_jax.generate import end_of_sequence_ids

    (model / "generation_config.json").write_text("{oops")
    with pytest.raises(dpo_jax.UserError, match=r"generation_config\.json: not a JSON object"):
        end_of_sequence_ids(str(model), llama3_style())


@pytest.mark.parametrize("content,expected", [
    (b"beta: \xff\n", "is not UTF-8 text"), (None, "a directory: give the YAML file in it"),
], ids=["not-utf8", "directory"])
def test_unreadable_yaml_config(tmp_path, capsys, content, expected):
    path = tmp_path / "run.yaml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    code, err = cli(capsys, "train", "--config", path)
    assert code == 2 and f"--config {path}" in err and expected in err


def test_reference_with_another_vocabulary(llama_dir, tmp_path, capsys, data):
    """A reference of another tokenizer trained to NaN losses; now refused before its weights are read."""
    import transformers

    other = tmp_path / "other"
    transformers.LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2).save_pretrained(other)
    code, err = cli(capsys, "evaluate", "--model_name_or_path", llama_dir, "--ref_model_name_or_path", other,
                    "--dataset_name", data, "--dataset_test_split", "train")
    assert code == 2 and f"the reference {other} has a vocabulary of 96 tokens" in err and "one of 128" in err


def test_training_from_a_run_directory_says_to_export_it(tmp_path, capsys):
    """A dpo-jax run is not a model directory for train: the message says how to make one of it."""
    run = tmp_path / "run"
    (run / "checkpoints" / "5" / "options").mkdir(parents=True)
    code, err = cli(capsys, "train", "--model_name_or_path", run, "--output_dir", tmp_path / "out")
    assert code == 2 and f"{run}: no config.json: it is a dpo-jax run or checkpoint" in err
    assert f"dpo-jax export --checkpoint {run} --output_dir DIR" in err
