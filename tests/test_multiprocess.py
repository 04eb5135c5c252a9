"""Two `dpo-jax train` processes on this machine (4 simulated CPU devices each, gloo collectives, a coordinator
on a loopback port) train exactly as one process with 8 devices."""

import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from dpo_jax import options
from dpo_jax.runs import load_trained
from dpo_jax.sharding import make_mesh
from dpo_jax.trainer import Trainer, params_numpy
from test_trainer import tiny_model

ARGS = ["--max_steps", "4", "--per_device_train_batch_size", "1", "--mesh", "data=2,fsdp=-1", "--logging_steps", "1",
        "--save_steps", "2", "--learning_rate", "1e-3", "--max_length", "128", "--dataset_test_split", "test[:8]",
        "--eval_steps", "2", "--gradient_accumulation_steps", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.mark.parametrize("extra", [[], ["--precompute_ref_log_probs", "true", "--pack_pairs", "packed", "--mesh",
                                         "fsdp=-1"]],  # weights spread over both processes
                         ids=["live-reference", "precomputed-packed"])
def test_two_processes_train_as_one_process_with_eight_devices(tmp_path, extra, monkeypatch):
    monkeypatch.setenv("DPO_JAX_CACHE", str(tmp_path / "cache-one"))
    model = tiny_model(tmp_path / "model")
    args = [*ARGS, *extra]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "DPO_JAX_CACHE": str(tmp_path / "cache")}
    address = f"127.0.0.1:{free_port()}"
    out = tmp_path / "two"
    procs = [subprocess.Popen([sys.executable, "-m", "dpo_jax", "train", "--model_name_or_path", model, "--output_dir",
                               str(out), *args, "--coordinator_address", address, "--num_processes", "2",
                               "--process_id", str(i)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-3000:]
    assert "trained 4 steps" in results[0][0] and "trained" not in results[1][0]  # one summary, from process 0
    assert re.search(r"device memory +[0-9.]+ [GM]i?B", results[0][0]), results[0][0]  # agreed by both, positive

    one = Trainer(options.parse(["--model_name_or_path", model, "--output_dir", str(tmp_path / "one"), *args]))
    one.train()
    two_rows, one_rows = rows(out), rows(tmp_path / "one")
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows]  # one set of logs, not two
    # Rewards are beta x differences of log-probs summed over ~100 tokens: where the reference's come from other
    # batches (precomputed), they agree to a few float32 ulps of |logps|, times beta.
    ulps = 8 * np.finfo(np.float32).eps * max(abs(r.get("logps/rejected", 0)) for r in one_rows)
    for a, b in zip(one_rows, two_rows):
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "eval_loss", "eval_rewards/margins"):
            if key in a:
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=max(1e-6, 0.1 * ulps),
                                           err_msg=f"step {a['step']} {key}")
    assert len(list((out / "runs").glob("events.out.tfevents.*"))) == 1

    # the two processes' checkpoint, restored by this single process onto its own 8 devices
    model_two, _, step = load_trained(str(out), make_mesh(fsdp=-1), np.float32)
    assert step == 4
    restored = [np.asarray(x) for x in jax.tree.leaves(nnx.state(model_two, nnx.Param))]
    # Relative to each tensor's norm: the two runs add gradients in other orders (gloo between processes), and
    # Adam's 1/sqrt(v) magnifies those last-bit differences where an element's gradient nearly cancels.
    for a, b in zip(params_numpy(one.state), restored):
        assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a), (np.linalg.norm(b - a), np.linalg.norm(a))


TERMINATED_IN_STEP_3 = """
import os, signal, sys
from dpo_jax import trainer
build = trainer.Trainer._build

def terminated_in_step_3(self, *args, **kwargs):
    build(self, *args, **kwargs)
    train_step, calls = self.train_step, []
    def run(*a):
        calls.append(1)
        if len(calls) == 3 and sys.argv[sys.argv.index("--process_id") + 1] == "1":
            os.kill(os.getpid(), signal.SIGTERM)  # one host's preemption notice; the other hears nothing
        return train_step(*a)
    self.train_step = run

trainer.Trainer._build = terminated_in_step_3
from dpo_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_signal_to_one_process_stops_both_after_the_same_step(tmp_path, monkeypatch):
    """SIGTERM reaches process 1 only, while it dispatches step 3: the stop is agreed on the devices with step
    2's metrics, so both processes finish step 3, save it and exit as killed by the signal; one process with 8
    devices resumes the checkpoint and ends as an uninterrupted run."""
    monkeypatch.setenv("DPO_JAX_CACHE", str(tmp_path / "cache-one"))
    model = tiny_model(tmp_path / "model")
    args = ["--max_steps", "5", "--per_device_train_batch_size", "1", "--mesh", "data=2,fsdp=-1", "--logging_steps",
            "1", "--save_steps", "100", "--learning_rate", "1e-3", "--max_length", "128", "--dataset_test_split",
            "none"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "DPO_JAX_CACHE": str(tmp_path / "cache")}
    address = f"127.0.0.1:{free_port()}"
    out = tmp_path / "two"
    procs = [subprocess.Popen([sys.executable, "-c", TERMINATED_IN_STEP_3, "train", "--model_name_or_path", model,
                               "--output_dir", str(out), *args, "--coordinator_address", address, "--num_processes",
                               "2", "--process_id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 128 + 15, stdout[-2000:] + stderr[-3000:]
    assert "stopped by signal 15 after step 3" in results[0][0] + results[0][1]
    assert [r["step"] for r in rows(out)] == [1, 2, 3]
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == [3]

    straight = Trainer(options.parse(["--model_name_or_path", model, "--output_dir", str(tmp_path / "one"), *args]))
    straight.train()
    resumed = Trainer(options.parse(["--model_name_or_path", model, "--output_dir", str(out), *args,
                                     "--resume_from_checkpoint", "true"]))
    resumed.train()
    assert resumed.finished
    one_rows, two_rows = rows(tmp_path / "one"), rows(out)
    assert [r["step"] for r in two_rows] == [r["step"] for r in one_rows] == [1, 2, 3, 4, 5]
    for a, b in zip(one_rows, two_rows):  # gloo adds in another order: as the test above
        for key in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=f"step {a['step']} {key}")
    for a, b in zip(params_numpy(straight.state), params_numpy(resumed.state)):
        assert np.linalg.norm(b - a) <= 1e-5 * np.linalg.norm(a), (np.linalg.norm(b - a), np.linalg.norm(a))
