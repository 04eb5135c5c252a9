"""The training loop: a preempted run resumed from its checkpoint ends exactly as an uninterrupted one."""

import json
import os
import signal

import numpy as np
import torch
import transformers

from dpo_jax import options
from dpo_jax.trainer import Trainer, params_numpy
from test_learning import sample_tokenizer


def tiny_model(path):
    tokenizer = sample_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def run(model, out, *extra, kill_after=None):
    o = options.parse(["--model_name_or_path", model, "--output_dir", str(out), "--max_steps", "6",
                       "--per_device_train_batch_size", "1", "--mesh", "data=2,fsdp=-1", "--logging_steps", "1",
                       "--save_steps", "100", "--learning_rate", "1e-3", "--max_length", "128",
                       "--dataset_test_split", "test[:8]", "--eval_steps", "100", *extra])
    trainer = Trainer(o)
    if kill_after is not None:
        step, calls = trainer.train_step, []

        def counting(*args):
            calls.append(1)
            if len(calls) == kill_after:
                os.kill(os.getpid(), signal.SIGTERM)  # what a TPU VM's preemption sends
            return step(*args)
        trainer.train_step = counting
    trainer.train()
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["step"]: r for r in rows if "loss" in r}, params_numpy(trainer.state)


def test_sigterm_then_resume_equals_an_uninterrupted_run(tmp_path):
    model = tiny_model(tmp_path / "model")
    straight, straight_params = run(model, tmp_path / "a")
    _, _ = run(model, tmp_path / "b", kill_after=3)
    assert sorted(json.loads(line)["step"] for line in open(tmp_path / "b" / "metrics.jsonl")) == [1, 2, 3]
    resumed, resumed_params = run(model, tmp_path / "b", "--resume_from_checkpoint", "true")
    for step in (4, 5, 6):
        for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm"):
            np.testing.assert_allclose(resumed[step][key], straight[step][key], rtol=1e-6, atol=1e-7,
                                       err_msg=f"step {step} {key}")
    for a, b in zip(straight_params, resumed_params):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)


def test_train_command_errors_exit_2_without_traceback(tmp_path, capsys):
    from dpo_jax.cli import main

    assert main(["train", "--learnig_rate", "1e-6"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean learning_rate?" in err and "Traceback" not in err
    model = tiny_model(tmp_path / "model")
    assert main(["train", "--model_name_or_path", model, "--output_dir", str(tmp_path / "o"),
                 "--dataset_name", str(tmp_path / "missing.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
