"""The training loop: a preempted run resumed from its checkpoint ends exactly as an uninterrupted one."""

import json
import logging
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import torch
import transformers

from dpo_jax import options
from dpo_jax.checkpoint import Checkpoints
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
    assert trainer.stopped_by == (signal.SIGTERM if kill_after else None)
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


KILLED_AT_STEP_4 = """
import os, signal, sys
from dpo_jax import trainer
build = trainer.Trainer._build

def killed_in_step_4(self, *args, **kwargs):
    build(self, *args, **kwargs)
    train_step, calls = self.train_step, []
    def run(*a):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGKILL)  # no handler, no cleanup: a machine that dies
        return train_step(*a)
    self.train_step = run

trainer.Trainer._build = killed_in_step_4
from dpo_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_and_a_truncated_checkpoint_then_resume_equals_an_uninterrupted_run(tmp_path, caplog):
    """`dpo-jax train` killed with SIGKILL while in step 4 (checkpoints every step, the newest perhaps half
    written); the newest complete one is then truncated; `--resume_from_checkpoint true` falls back past it and
    the run ends as the uninterrupted one: the same metrics for every step and the same parameters."""
    model = tiny_model(tmp_path / "model")
    straight, straight_params = run(model, tmp_path / "a")
    args = ["train", "--model_name_or_path", model, "--output_dir", str(tmp_path / "b"), "--max_steps", "6",
            "--per_device_train_batch_size", "1", "--mesh", "data=2,fsdp=-1", "--logging_steps", "1",
            "--save_steps", "1", "--learning_rate", "1e-3", "--max_length", "128", "--dataset_test_split",
            "test[:8]", "--eval_steps", "100"]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_STEP_4, *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    saved = sorted(int(p.name) for p in (tmp_path / "b" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] >= 2, saved
    for f in (tmp_path / "b" / "checkpoints" / str(saved[-1]) / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 1:
            f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])  # a copy cut short
    with caplog.at_level(logging.WARNING):
        resumed, resumed_params = run(model, tmp_path / "b", "--save_steps", "1", "--resume_from_checkpoint", "true")
    assert f"checkpoint {saved[-1]} " in caplog.text and "cannot be read" in caplog.text
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # one history: rows after the resumed step were cut
    for step in range(1, 7):
        for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm"):
            np.testing.assert_allclose(resumed[step][key], straight[step][key], rtol=1e-6, atol=1e-7,
                                       err_msg=f"step {step} {key}")
    for a, b in zip(straight_params, resumed_params):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    again = Checkpoints(tmp_path / "b" / "checkpoints")  # the truncated step was replaced by the new history's
    assert again.steps() == [1, 2, 3, 4, 5, 6] and again.saved_options(saved[-1])


def test_python_m_dpo_jax_runs_the_command():
    out = subprocess.run([sys.executable, "-m", "dpo_jax", "train", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "TRL's DPOConfig names" in out.stdout


def test_precomputed_reference_trains_as_the_live_one(tmp_path, monkeypatch):
    """--precompute_ref_log_probs: the same metrics and parameters as a live reference (the reference's
    log-probs come from other batches, so they agree to float32 rounding), a cache in output_dir/ref_logps
    and in the user cache, and no reference model kept."""
    monkeypatch.setenv("DPO_JAX_CACHE", str(tmp_path / "cache"))
    model = tiny_model(tmp_path / "model")
    live, live_params = run(model, tmp_path / "a")
    o = options.parse(["--model_name_or_path", model, "--output_dir", str(tmp_path / "b"), "--max_steps", "6",
                       "--per_device_train_batch_size", "1", "--mesh", "data=2,fsdp=-1", "--logging_steps", "1",
                       "--learning_rate", "1e-3", "--max_length", "128", "--dataset_test_split", "test[:8]",
                       "--precompute_ref_log_probs", "true"])
    trainer = Trainer(o)
    assert trainer.ref is None and trainer.ref_graphdef is None
    start = params_numpy(trainer.state)
    final = trainer.train()
    rows = {r["step"]: r for r in map(json.loads, open(tmp_path / "b" / "metrics.jsonl")) if "loss" in r}
    # The reference log-probs were summed in other batches (other padding, other order): a sum of ~100 token
    # log-probs of magnitude |logps| agrees to a few float32 ulps of |logps|; rewards scale that by beta.
    ulps = 8 * np.finfo(np.float32).eps * max(abs(live[s]["logps/rejected"]) for s in live)
    for step in range(1, 7):
        np.testing.assert_allclose(rows[step]["logps/chosen"], live[step]["logps/chosen"], rtol=1e-6)
        for key in ("loss", "rewards/margins", "rewards/chosen", "grad_norm"):
            np.testing.assert_allclose(rows[step][key], live[step][key], rtol=1e-5, atol=0.1 * ulps,
                                       err_msg=f"step {step} {key}")
    # Adam divides by the gradient's RMS: elements whose gradient nearly cancels amplify those ulps, so the
    # whole update is compared, in norm.
    moved = np.sqrt(sum(((b - a) ** 2).sum() for a, b in zip(start, live_params)))
    apart = np.sqrt(sum(((b - a) ** 2).sum() for a, b in zip(live_params, params_numpy(trainer.state))))
    assert apart < 1e-4 * moved, (apart, moved)
    assert "eval_rewards/margins" in final
    assert len(list((tmp_path / "b" / "ref_logps").glob("*.npy"))) == 2  # train and test
    assert len(list((tmp_path / "cache" / "ref_logps").glob("*.npy"))) == 2


def test_a_second_run_loads_its_compiled_steps_from_the_persistent_cache(tmp_path, monkeypatch):
    from jax._src import compilation_cache

    monkeypatch.setenv("DPO_JAX_CACHE", str(tmp_path / "cache"))
    compilation_cache.reset_cache()  # the process-wide cache may already point at another test's directory
    model = tiny_model(tmp_path / "model")
    hits = []

    def listen(event, **_):
        if event == "/jax/compilation_cache/cache_hits":
            hits.append(event)
    jax.monitoring.register_event_listener(listen)
    try:
        run(model, tmp_path / "a", "--max_steps", "2")
        assert any((tmp_path / "cache" / "xla").iterdir())
        first = len(hits)
        run(model, tmp_path / "b", "--max_steps", "2")
        assert len(hits) > first  # the train step (and the rest) came from the cache, not from XLA
    finally:
        jax.monitoring.unregister_event_listener(listen)
        compilation_cache.reset_cache()
