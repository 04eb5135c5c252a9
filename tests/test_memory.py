"""The trainer's memory check is the compiler's: the train step compiled from the configs alone before any
weight is loaded, refused with XLA's figures when it does not fit, and that compilation reused by training."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpo_jax import memory, options
from dpo_jax import step as S
from dpo_jax.cli import main
from dpo_jax.hf import load_config
from dpo_jax.sharding import make_mesh
from dpo_jax import trainer as T
from dpo_jax.trainer import Trainer
from test_trainer import tiny_model

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


def test_a_run_that_does_not_fit_stops_before_loading(model, tmp_path, capsys):
    assert main(["train", "--model_name_or_path", model, "--output_dir", str(tmp_path / "o"), "--memory_limit_gb",
                 "0.001", "--per_device_train_batch_size", "1", "--max_length", "128"]) == 2
    captured = capsys.readouterr()
    assert "memory, per device (XLA's compiled step):" in captured.out and "temporaries" in captured.out
    assert "device memory" in captured.out and "memory_limit_gb" in captured.out
    assert "needs" in captured.err and "XLA's compiled train step" in captured.err and "--use_peft true" in captured.err
    assert "--precompute_ref_log_probs true" in captured.err and "Traceback" not in captured.err
    # the data audit comes before the memory check: a refused run leaves its audit, and nothing else
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".dpo-jax.lock", "data_audit.json"]
    assert (tmp_path / "o" / ".dpo-jax.lock").read_text() == ""  # released


def test_training_reuses_the_planned_compilation(model, tmp_path, capsys):
    """The step compiled for the memory check is the one training runs: its first step (of the planned, largest
    shape: one length bucket) compiles nothing."""
    o = options.parse(["--model_name_or_path", model, "--output_dir", str(tmp_path / "o"), "--max_steps", "2",
                       "--per_device_train_batch_size", "1", "--max_length", "128", "--num_length_buckets", "1",
                       "--pack_pairs", "pairs", "--dataset_test_split", "none", "--save_strategy", "no",
                       "--report_to", "none", "--compilation_cache_dir", "none"])
    trainer = Trainer(o)
    assert "memory, per device (XLA's compiled step):" in capsys.readouterr().out
    compiles, during = [], []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: compiles.append(seconds) if event == BACKEND_COMPILE else None)
    planned = trainer.train_step

    def counted(*args):
        before = len(compiles)
        out = planned(*args)
        during.append(len(compiles) - before)
        return out
    trainer.train_step = counted
    trainer.train()
    assert during == [0, 0]


def test_every_step_shape_is_compiled_before_step_1(model, tmp_path, capsys):
    """A run of several batch shapes compiles them all before its first step (said on the console): no step
    waits for a compile, and the steps are those of a run that compiles each shape as it comes."""
    args = ["--model_name_or_path", model, "--max_steps", "6", "--per_device_train_batch_size", "2",
            "--max_length", "128", "--num_length_buckets", "3", "--dataset_test_split", "none",
            "--save_strategy", "no", "--report_to", "none", "--compilation_cache_dir", "none"]
    trainer = Trainer(options.parse([*args, "--output_dir", str(tmp_path / "o")]))
    compiles, during, shapes = [], [], []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: compiles.append(seconds) if event == BACKEND_COMPILE else None)
    jitted = trainer.train_step

    def counted(state, ref, batch):
        before = len(compiles)
        out = jitted(state, ref, batch)
        during.append(len(compiles) - before)
        shapes.append(batch["input_ids"].shape)
        return out
    trainer.train_step = counted
    trainer.train()
    assert len(set(shapes)) >= 2 and during == [0] * 6, (shapes, during)
    assert f"for {len(set(shapes)) - 1} more batch shape" in capsys.readouterr().out
    lazy = Trainer(options.parse([*args, "--output_dir", str(tmp_path / "lazy")]))
    lazy.compile_ahead = lambda start: None
    lazy.train()
    for a, b in zip(T.params_numpy(lazy.state), T.params_numpy(trainer.state)):
        np.testing.assert_array_equal(b, a)


def _tiny_run(model, *extra):
    o = options.parse(["--model_name_or_path", model, "--max_length", "64", "--per_device_train_batch_size", "2",
                       "--pack_pairs", "pairs", *extra])
    config = load_config(model)
    mesh = make_mesh(fsdp=-1)
    tx = S.make_optimizer(o.optim, 10)
    return o, config, mesh, tx


def test_remat_only_when_the_step_without_it_does_not_fit(model):
    """gradient_checkpointing None: the step without remat when it fits in 80% of the device, else with remat
    when that needs less (its temporaries are smaller here)."""
    o, config, mesh, tx = _tiny_run(model)
    seen = []

    def compile_with(remat):
        seen.append(remat)
        return memory.compile_step(o, config, config, mesh, jax.numpy.float32, tx, length=64, remat=remat)
    off = memory.fitting_step(compile_with, None, limit=None)
    assert off.remat is False and seen == [False]
    on = memory.fitting_step(compile_with, None, limit=int(off.usage.total / 0.8) - 1)
    assert on.remat is True and seen == [False, False, True] and on.usage.total < off.usage.total
    assert memory.fitting_step(compile_with, None, limit=int(off.usage.total / 0.8) + 1).remat is False


def test_the_arguments_are_the_state_reference_and_batch(model):
    """XLA's argument bytes per device are exactly the parameters, both AdamW moments and the counters, the
    reference and the batch as they are split over the 8 devices (numpy's count of each shard)."""
    o, config, mesh, tx = _tiny_run(model)
    step = memory.compile_step(o, config, config, mesh, jax.numpy.float32, tx, length=64, remat=True)
    usage, run = step.usage, step.run
    leaves = jax.tree.leaves((run.state, run.ref, run.batch))
    assert usage.argument == sum(np.dtype(x.dtype).itemsize * int(np.prod(x.sharding.shard_shape(x.shape)))
                                 for x in leaves)
    assert usage.argument == sum(usage.parts.values())
    assert usage.alias == memory.per_device_bytes(run.state)  # the donated state is updated in place


def test_freed_host_memory_goes_back_to_the_system():
    """What a thread freed stays in glibc's arena (resident) until release_freed_host_memory hands it back, as
    XLA's compiler threads leave it after a compile."""
    code = """
import threading
from dpo_jax import memory

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

kept = []

def churn():  # 256 MB in blocks below glibc's mmap threshold, every second one freed: holes in the arena
    chunks = [bytearray(64 * 1024) for _ in range(4000)]
    kept.extend(chunks[::2])

thread = threading.Thread(target=churn)
thread.start(); thread.join()
before = rss()
memory.release_freed_host_memory()
print(before - rss())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 64 * 2**20  # of the 128 MB freed
