"""No code from a model directory runs without `--trust_remote_code true` on the command line, even when "y"
arrives on standard input (transformers asks there when it is not told).

The directories name custom config and tokenizer classes (`auto_map`) whose modules, when imported, append
their names to a marker file: the marker is the proof that the code ran. With a model_type transformers
knows, its built-in classes read the directory and the custom code is left alone; with an unknown one, the
command stops with a message that names the option."""

import io
import json
import os
import subprocess
import sys

import pytest

from dpo_jax.cli import main
from test_trainer import tiny_model
from tiny_models import with_custom_code

# Commands run one after another in one `python -m`-like process (one start-up instead of three) with "y" on
# its real standard input; after each, its exit status and the modules that have run so far.
DRIVER = """
import json, pathlib, sys
from dpo_jax.cli import main
root, commands, done = pathlib.Path(sys.argv[1]), json.loads(sys.argv[2]), []
for argv in commands:
    status = main(argv)
    done.append([status, {p.name: sorted(set(p.read_text().split())) for p in root.glob("ran_*")}])
print("RESULT " + json.dumps(done))
"""


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """(known: llama with custom code beside it, unknown: custom_llama that only its code can read, root)."""
    root = tmp_path_factory.mktemp("custom_code")
    made = {}
    for kind, model_type in (("known", None), ("unknown", "custom_llama")):
        (root / kind).mkdir()
        made[kind] = with_custom_code(tiny_model(root / kind), root / f"ran_{kind}", model_type)
    return made["known"], made["unknown"], root


def ran(root) -> list[str]:
    return sorted(p.name for p in root.glob("ran_*"))


def test_yes_on_stdin_is_not_consent_and_the_command_line_is(dirs, tmp_path):
    """In a real process with "y" on standard input: train refuses the directory whose config only its own
    code reads, and runs nothing. With --trust_remote_code true, transformers imports the custom classes; the
    model is still dpo-jax's own, chosen by model_type: a known one generates (custom config and tokenizer
    ran), an unknown one is a clear error after its config code ran."""
    known, unknown, root = dirs
    out = str(tmp_path / "run")
    commands = [["train", "--model_name_or_path", unknown, "--output_dir", out],
                ["generate", "--model_name_or_path", known, "--prompt", "hi", "--max_new_tokens", "2",
                 "--trust_remote_code", "true"],
                ["train", "--model_name_or_path", unknown, "--output_dir", out, "--trust_remote_code", "true"]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(root), json.dumps(commands)], input="y\n" * 20,
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    refused, generated, unsupported = json.loads(done.stdout.split("RESULT ")[-1])
    assert refused == [2, {}], done.stderr
    assert "config.json asks to run custom code (custom_config.CustomConfig)" in done.stderr
    assert "--trust_remote_code true" in done.stderr and "Traceback" not in done.stderr
    assert generated == [0, {"ran_known": ["custom_config", "custom_tokenizer"]}], done.stderr
    assert unsupported == [2, {"ran_known": ["custom_config", "custom_tokenizer"], "ran_unknown": ["custom_config"]}]
    assert "model_type 'custom_llama' is not supported" in done.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [
    ["evaluate", "--dataset_test_split", "test[:4]"],
    ["generate", "--prompt", "hi", "--max_new_tokens", "2"],
    ["audit", "--dataset_train_split", "train[:4]", "--dataset_test_split", "none"],
])
def test_every_loader_refuses_custom_code(dirs, capsys, monkeypatch, command):
    _, unknown, root = dirs
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # what transformers' prompt would read
    before = ran(root)
    assert main([*command, "--model_name_or_path", unknown]) == 2
    err = capsys.readouterr().err
    assert "asks to run custom code" in err and "--trust_remote_code true" in err, err
    assert ran(root) == before


def test_known_model_type_reads_without_the_custom_code(dirs, capsys, monkeypatch, caplog):
    known, _, root = dirs
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))
    before = ran(root)
    assert main(["generate", "--model_name_or_path", known, "--prompt", "hi", "--max_new_tokens", "2"]) == 0
    assert ran(root) == before
    assert "names custom code (custom_tokenizer.CustomTokenizer); it is not run" in caplog.text
