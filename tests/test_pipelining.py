"""The training loop keeps the devices busy: step n + 1 is dispatched before step n's metrics are read (except
where the host needs the state after step n), the batches reach the devices from the feed's thread, and an
evaluation reads its sums once."""

import json
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from dpo_jax import options
from dpo_jax import trainer as T
from dpo_jax.batching import BatchIterator
from dpo_jax.prefetch import Prefetcher
from dpo_jax.checkpoint import Checkpoints
from dpo_jax.trainer import Trainer
from test_batching import random_pairs
from test_trainer import tiny_model

ARGS = ["--max_steps", "7", "--per_device_train_batch_size", "1", "--mesh", "data=2,fsdp=-1", "--logging_steps", "2",
        "--save_steps", "3", "--eval_steps", "4", "--learning_rate", "1e-3", "--max_length", "128",
        "--dataset_test_split", "test[:8]", "--num_length_buckets", "2"]


def batch_shapes(batches, steps: int) -> list[tuple]:
    """The arrays' shapes of the run's first `steps` batches, from its own iterator (not moved)."""
    shapes, (epoch, step) = [], (batches.epoch, batches.step)
    for _ in range(steps):
        shapes.append(tuple((k, v.shape) for k, v in T._arrays(batches.batch(epoch, step)).items()))
        epoch, step = batches.after(epoch, step)
    return shapes


class Gated:
    """A real compiled step (train: its metrics; eval: its sums) held back on the devices (a host callback in a
    program that reads them) until the next step is dispatched, for the steps in `pipelined`. Reading such a
    step's outputs earlier blocks until `patience` runs out, and is recorded in `early`."""

    def __init__(self, step, pipelined: set[int], patience: float = 120.0):
        self.step, self.pipelined, self.patience = step, pipelined, patience
        self.events, self.early, self.released = [], [], {}

        def wait(n):
            n = int(n)
            if n in self.pipelined and not self.released[n].wait(self.patience):
                self.early.append(n)
            return np.int32(0)

        @jax.jit
        def gate(metrics, n):
            token = io_callback(wait, jax.ShapeDtypeStruct((), jnp.int32), n)
            return jax.lax.optimization_barrier((metrics, token))[0]
        self.gate = gate

    def __call__(self, *args):
        n = len([e for e in self.events if e[0] == "dispatch"]) + 1
        self.released[n] = threading.Event()
        out = self.step(*args)
        self.events.append(("dispatch", n))
        if n - 1 in self.released:
            self.released[n - 1].set()
        return (out[0], self.gate(out[1], n)) if isinstance(out, tuple) else self.gate(out, n)


def test_step_n_plus_1_is_dispatched_before_step_n_is_read(tmp_path):
    """Steps 3 and 6 are saved, 4 evaluated, 7 the last: those are read before the next dispatch; every other
    step only after it, which the gate enforces (a read before it would wait for the gate's patience), a step
    before a new batch shape too (every shape is compiled before step 1). The run's metrics and checkpoints are
    those of the same run with nothing held back."""
    model = tiny_model(tmp_path / "model")
    plain = Trainer(options.parse(["--model_name_or_path", model, "--output_dir", str(tmp_path / "plain"), *ARGS]))
    plain.train()
    trainer = Trainer(options.parse(["--model_name_or_path", model, "--output_dir", str(tmp_path / "gated"), *ARGS]))
    shapes = batch_shapes(trainer.batches, 7)
    new_shape_next = {n for n in range(1, 7) if shapes[n] not in shapes[:n]}
    synchronous = {3, 4, 6, 7}
    pipelined = set(range(1, 8)) - synchronous
    assert new_shape_next & pipelined, (shapes, synchronous)  # a step before a new shape, held back
    gated = Gated(trainer.train_step, pipelined)
    trainer.train_step = gated
    trainer.on_step = lambda step, batch, start, end: gated.events.append(("read", step, start, end))
    trainer.train()
    assert trainer.finished and gated.early == []
    order = [e[:2] for e in gated.events]
    for n in range(1, 7):
        dispatched_next, read = order.index(("dispatch", n + 1)), order.index(("read", n))
        assert (read < dispatched_next) == (n in synchronous), (n, order)
    reads = [e for e in gated.events if e[0] == "read"]
    assert [e[1] for e in reads] == list(range(1, 8))
    for (_, _, start, end), (_, _, next_start, _) in zip(reads, reads[1:]):  # each step's time is its own
        assert start < end <= next_start
    rows = [json.loads(line) for line in open(tmp_path / "gated" / "metrics.jsonl")]
    expected = [json.loads(line) for line in open(tmp_path / "plain" / "metrics.jsonl")]
    assert [sorted(r) for r in rows] == [sorted(r) for r in expected]
    for a, b in zip(expected, rows):
        for key, value in a.items():
            if key not in ("tokens_per_second",):
                assert b[key] == value, (a["step"], key)
    assert Checkpoints(tmp_path / "gated" / "checkpoints", create=False).steps() == [3, 6, 7]
    for a, b in zip(T.params_numpy(plain.state), T.params_numpy(trainer.state)):
        np.testing.assert_array_equal(b, a)


def test_an_evaluation_reads_its_sums_once_at_the_end(tmp_path):
    """Every batch's sums but the last are held back until the next batch is dispatched: the evaluation
    dispatches them all before it reads anything, and gives the metrics of the plain evaluation."""
    model = tiny_model(tmp_path / "model")
    trainer = Trainer(options.parse(["--model_name_or_path", model, "--output_dir", str(tmp_path / "run"), *ARGS,
                                     "--dataset_test_split", "test[:24]", "--per_device_eval_batch_size", "1"]))
    steps = trainer.eval_batches.steps_per_epoch
    assert steps == 3
    gated = Gated(trainer.eval_step, pipelined=set(range(1, steps)))
    held = T.eval_metrics(gated, trainer.state.params, trainer.ref, trainer.eval_batches, trainer.mesh, trainer.cfg)
    assert gated.early == [] and [e[1] for e in gated.events] == [1, 2, 3]
    assert held == trainer.evaluate() and "eval_rewards/margins" in held


def test_prefetcher_puts_batches_on_the_devices_and_walks_one_epoch():
    """With `put` the thread hands out (batch, put(batch)); with `epoch` that epoch's batches in order, leaving
    the iterator's position where it was."""
    pairs = random_pairs(10, max_len=12)
    batches = BatchIterator(pairs, global_batch_size=4, pad_token_id=0, seed=3)
    next(batches)
    position = batches.state_dict()
    on_devices = []

    def put(batch):
        on_devices.append(threading.current_thread().name)
        return {k: jax.device_put(v) for k, v in batch.items()}
    got = list(Prefetcher(batches, put=put, epoch=0))
    assert len(got) == batches.steps_per_epoch and batches.state_dict() == position
    assert set(on_devices) == {"dpo-jax-batches"}
    for s, (host, device) in enumerate(got):
        expected = batches.batch(0, s)
        for k in expected:
            np.testing.assert_array_equal(host[k], expected[k], err_msg=k)
            assert isinstance(device[k], jax.Array)
            np.testing.assert_array_equal(np.asarray(device[k]), expected[k], err_msg=k)
