"""`dpo-jax train`, `evaluate` and `export` end to end on a tiny Llama and the bundled sample data: the files a
run writes, evaluation checked against a formula and against training's own evaluation, and an export that
transformers loads with the trained model's logits."""

import importlib.util
import json
import math

import jax
import numpy as np
import pytest
import torch
import transformers
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dpo_jax.cli import main
from dpo_jax.runs import EVAL_KEYS, load_trained
from dpo_jax.sharding import make_mesh
from test_trainer import tiny_model

TRAIN = ["--max_steps", "4", "--per_device_train_batch_size", "1", "--logging_steps", "1", "--save_steps", "2",
         "--eval_steps", "2", "--dataset_test_split", "test[:16]", "--max_length", "128", "--learning_rate", "5e-3",
         "--lr_scheduler_type", "constant", "--seed", "3"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


def evaluate(capsys, *argv):
    assert main(["evaluate", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_writes_its_files_and_evaluate_agrees(model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model_name_or_path", model, "--output_dir", str(out), *TRAIN]) == 0
    summary = capsys.readouterr().out
    assert "trained 4 steps" in summary and "plots.png" in summary and "final eval" in summary
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [r["step"] for r in evals] == [2, 4]
    assert all(math.isfinite(r["loss"]) and "learning_rate" in r and "rewards/margins" in r for r in train)
    events = EventAccumulator(str(out / "runs")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    np.testing.assert_allclose([e.value for e in events.Scalars("train/loss")], [r["loss"] for r in train], rtol=1e-6)
    assert [e.step for e in events.Scalars("eval/rewards/accuracies")] == [2, 4]
    assert (out / "plots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert main(["train", "--model_name_or_path", model, "--output_dir", str(out), *TRAIN]) == 2  # not over it
    assert "already holds checkpoints" in capsys.readouterr().err
    log = (out / "metrics.jsonl").read_text()
    assert main(["train", "--model_name_or_path", model, "--output_dir", str(out), *TRAIN,
                 "--resume_from_checkpoint", "true"]) == 0
    assert "already finished" in capsys.readouterr().out and (out / "metrics.jsonl").read_text() == log

    # the checkpoint, evaluated on its own: the run's options (split, beta, max_length) and reference
    metrics = evaluate(capsys, "--model_name_or_path", str(out), "--output_json", str(tmp_path / "eval.json"))
    assert list(metrics)[:len(EVAL_KEYS)] == list(EVAL_KEYS)
    assert all(math.isfinite(metrics[k]) for k in EVAL_KEYS)
    for k in EVAL_KEYS:  # the trainer's own final evaluation, from the live state
        np.testing.assert_allclose(metrics[k], evals[-1][k], rtol=2e-5, atol=1e-6, err_msg=k)
    assert json.loads((tmp_path / "eval.json").read_text()) == metrics

    # the untrained model against itself: every reward is 0, the loss log 2
    base = evaluate(capsys, "--model_name_or_path", model, "--dataset_test_split", "test[:16]")
    assert base["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert base["eval_rewards/margins"] == 0 and base["eval_rewards/accuracies"] == 0


@pytest.mark.parametrize("peft", [False, True])
def test_export_reloads_in_transformers_with_the_trained_logits(model, tmp_path, capsys, peft):
    out = tmp_path / "run"
    extra = ["--use_peft", "true", "--lora_target_modules", "all-linear"] if peft else []
    assert main(["train", "--model_name_or_path", model, "--output_dir", str(out), *TRAIN, "--max_steps", "2",
                 "--dataset_test_split", "none", "--report_to", "none", *extra]) == 0
    assert not (out / "runs").exists()
    assert main(["export", "--checkpoint", str(out), "--output_dir", str(tmp_path / "hf")]) == 0
    ours, _, step = load_trained(str(out / "checkpoints" / "2"), make_mesh(fsdp=1, devices=jax.devices()[:1]),
                                 np.float32)
    assert step == 2
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = tokenizer("The capital of France is Paris.", return_tensors="np")["input_ids"]
    with torch.no_grad():
        theirs = reloaded(torch.tensor(ids)).logits.numpy()
    mine = np.asarray(ours(ids))
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)
    original = transformers.AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        assert np.abs(original(torch.tensor(ids)).logits.numpy() - theirs).max() > 1e-3  # training changed it


def test_user_errors_exit_2_without_traceback(model, tmp_path, capsys):
    assert main(["train", "--model_name_or_path", model, "--output_dir", str(tmp_path / "o"), "--loss_type",
                 "sigmod"]) == 2
    assert "did you mean sigmoid?" in capsys.readouterr().err
    assert main(["train", "--model_name_or_path", model, "--output_dir", str(tmp_path / "o"), "--logging_steps",
                 "0"]) == 2
    assert "logging_steps must be at least 1" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 3, "rejected": "c"}\n')
    assert main(["train", "--model_name_or_path", model, "--output_dir", str(tmp_path / "o"),
                 "--dataset_name", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "chosen" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
    assert main(["evaluate", "--model_name_or_path", str(tmp_path / "nowhere"), "--dataset_test_split", "test"]) == 2
    assert main(["export", "--checkpoint", model, "--output_dir", str(tmp_path / "e")]) == 2
    assert "not a dpo-jax checkpoint" in capsys.readouterr().err
    if importlib.util.find_spec("wandb") is None:
        assert main(["train", "--model_name_or_path", model, "--output_dir", str(tmp_path / "w"), "--report_to",
                     "wandb", "--max_steps", "1", "--per_device_train_batch_size", "1", "--max_length", "128",
                     "--dataset_test_split", "none"]) == 2
        assert "pip install wandb" in capsys.readouterr().err
