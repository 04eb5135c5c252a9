"""Orbax checkpoints of the training state: round trip, restore onto another mesh; damage (checksums, non-finite
state) moved aside and fallen back past, storage errors retried and reported, a full disk while saving."""

import errno
import json
import logging
import shutil
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpo_jax import checkpoint
from dpo_jax import step as S
from dpo_jax.checkpoint import SUMS, Checkpoints, abstract
from dpo_jax.errors import UserError
from dpo_jax.sharding import make_mesh
from flax import nnx


def tiny_state(mesh=None):
    """A TrainState over a small nnx parameter tree, sharded on `mesh` when given."""
    class Tiny(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.arange(64.0).reshape(8, 8), out_sharding=("embed", "mlp"), eager_sharding=False)
            self.b = nnx.Param(jnp.ones(8), out_sharding=("norm",), eager_sharding=False)

    _, params = nnx.split(Tiny(), nnx.Param)
    if mesh is not None:
        params = S.shard_params(params, mesh)
    tx = optax.adamw(1e-3)
    return S.init_state(params, tx), tx


def test_round_trip_and_restore_onto_another_mesh(tmp_path):
    state, tx = tiny_state(make_mesh(data=1, fsdp=1, devices=jax.devices()[:1]))
    grads = jax.tree.map(jnp.ones_like, state.params)
    updates, opt = tx.update(grads, state.opt_state, state.params)
    state = state._replace(params=optax.apply_updates(state.params, updates), opt_state=opt, step=state.step + 1)
    ckpt = Checkpoints(tmp_path / "ckpt", max_to_keep=2)
    ckpt.save(1, state, {"epoch": 0, "step": 1}, {"beta": 0.1})
    ckpt.wait()
    target, _ = tiny_state(make_mesh(data=2, fsdp=4))
    step, restored, data, options = ckpt.restore(abstract(target))
    assert step == 1 and data == {"epoch": 0, "step": 1} and options == {"beta": 0.1}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    w = restored.params["w"].get_value() if hasattr(restored.params["w"], "get_value") else restored.params["w"]
    assert w.sharding.spec[0] == "fsdp"  # restored straight into the new mesh's layout
    ckpt.close()


def saved(tmp_path, steps=(1, 2, 3), max_to_keep=2, state=None):
    """Checkpoints of `steps` (each state's step is its number; the optimizer state is random, so the arrays are
    stored out of line in OCDBT data files as in a real run), waited for."""
    state = state or trained_state()
    ckpt = Checkpoints(tmp_path / "ckpt", max_to_keep=max_to_keep)
    for s in steps:
        ckpt.save(s, state._replace(step=jnp.int32(s)), {"step": s}, {"beta": s})
    ckpt.wait()
    return ckpt, state


def trained_state():
    """A state whose arrays are large enough (4 KB) to be stored out of line, with random optimizer moments."""
    keys = iter(jax.random.split(jax.random.key(0), 32))
    state = S.init_state({"w": jax.random.normal(next(keys), (32, 32)), "b": jnp.ones(8)}, optax.adamw(1e-3))
    return state._replace(opt_state=jax.tree.map(
        lambda x: x + jax.random.normal(next(keys), x.shape) if x.dtype == jnp.float32 else x, state.opt_state))


def flip_bytes_of(step_dir, key_prefix: str) -> str:
    """Flip a byte in the middle of the stored value of the first array whose OCDBT key starts with
    `key_prefix` (e.g. "opt_state.0.mu"), found through TensorStore's dump of the database; the file's name."""
    import tensorstore as ts

    state = step_dir / "state"
    base = ts.KvStore.open(f"file://{state}/").result()
    manifest = ts.ocdbt.dump(base).result()
    nodes = [manifest["versions"][-1]["root"]["location"]]
    while nodes:
        node = ts.ocdbt.dump(base, nodes.pop()).result()
        for entry in node["entries"]:
            if "location" in entry and "key" not in entry:  # an interior node
                nodes.append(entry["location"])
            elif entry.get("key", b"").startswith(key_prefix.encode()) and "indirect_value" in entry:
                # value:<base path>:<data file>:<offset>:<length>, e.g. value:ocdbt.process_0/:d/52e1...:0:4096
                file, offset, length = entry["indirect_value"].removeprefix("value:").rsplit(":", 2)
                path = state / file.replace(":", "")
                data = bytearray(path.read_bytes())
                data[int(offset) + int(length) // 2] ^= 0xFF
                path.write_bytes(bytes(data))
                return str(path.relative_to(step_dir))
    raise AssertionError(f"no stored value under {key_prefix} in {state}")


def test_keeps_the_limit_and_moves_a_damaged_latest_aside(tmp_path, caplog):
    ckpt, state = saved(tmp_path)
    assert ckpt.steps() == [2, 3]
    assert (tmp_path / "ckpt" / "3" / SUMS).is_file()
    for f in (tmp_path / "ckpt" / "3" / "state").rglob("*"):  # a copy cut short
        if f.is_file():
            f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        step, restored, data, _ = ckpt.restore(abstract(state))
    assert step == 2 and int(restored.step) == 2 and data == {"step": 2}
    aside = [p for p in (tmp_path / "ckpt").iterdir() if p.name.startswith("damaged-3-")]
    assert len(aside) == 1 and (aside[0] / "state").is_dir()  # kept, under another name
    assert "checkpoint 3 " in caplog.text and "damaged" in caplog.text and str(aside[0]) in caplog.text
    assert ckpt.steps() == [2] and checkpoint.find(tmp_path / "ckpt") == (tmp_path / "ckpt", None)
    shutil.rmtree(tmp_path / "ckpt" / "2" / "state" / "ocdbt.process_0")
    with pytest.raises(UserError, match="checkpoint 2 .* damaged .*missing"):
        ckpt.restore(abstract(state), step=2)  # named: reported, not moved
    assert ckpt.steps() == [2]
    with pytest.raises(UserError, match="none of the checkpoints .* is intact.*not deleted"):
        ckpt.restore(abstract(state))
    assert sorted(p.name.split("-")[1] for p in (tmp_path / "ckpt").iterdir()) == ["2", "3"]
    ckpt.close()


def test_a_flipped_byte_in_the_optimizer_state_is_found_by_the_checksums(tmp_path, caplog):
    ckpt, state = saved(tmp_path)
    changed = flip_bytes_of(tmp_path / "ckpt" / "3", "opt_state.0.nu")
    with pytest.raises(checkpoint.Damaged, match=f"{changed} differs"):
        checkpoint.verify(tmp_path / "ckpt" / "3")
    with caplog.at_level(logging.WARNING):
        step, restored, _, options = ckpt.restore(abstract(state))
    assert step == 2 and options == {"beta": 2} and changed in caplog.text
    for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(restored.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    ckpt.close()


def test_non_finite_weights_or_optimizer_state_count_as_damage(tmp_path, caplog):
    state = trained_state()
    nan = state._replace(opt_state=jax.tree.map(lambda x: x.at[0].set(jnp.nan) if x.ndim else x, state.opt_state))
    ckpt = Checkpoints(tmp_path / "ckpt")
    ckpt.save(1, state, {"step": 1}, {})
    ckpt.save(2, nan, {"step": 2}, {})  # sums match: the files are what was saved, but not a state to train on
    ckpt.wait()
    with caplog.at_level(logging.WARNING):
        assert ckpt.restore(abstract(state))[0] == 1
    assert "NaN or inf" in caplog.text and "opt_state" in caplog.text
    ckpt.close()


def test_a_checkpoint_without_sums_still_restores(tmp_path):
    ckpt, state = saved(tmp_path, steps=(1,))
    (tmp_path / "ckpt" / "1" / SUMS).unlink()  # as dpo-jax wrote them before it had sums
    assert checkpoint.verify(tmp_path / "ckpt" / "1") is False
    assert ckpt.restore(abstract(state))[0] == 1
    ckpt.close()


def test_a_storage_error_is_retried_then_reported_and_nothing_moves(tmp_path, monkeypatch, caplog):
    ckpt, state = saved(tmp_path)
    monkeypatch.setattr(checkpoint, "RETRY_DELAYS", (0.0, 0.0))
    real, calls = ckpt.manager.restore, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(*args, **kwargs)
    monkeypatch.setattr(ckpt.manager, "restore", flaky)
    with caplog.at_level(logging.WARNING):
        assert ckpt.restore(abstract(state))[0] == 3  # the newest, on the second attempt
    assert len(calls) == 2 and "trying again" in caplog.text

    def failing(*args, **kwargs):
        raise ValueError("UNAVAILABLE: Error reading local file: Connection timed out [os_error_code=110]")
    monkeypatch.setattr(ckpt.manager, "restore", failing)
    with pytest.raises(UserError, match="checkpoint 3 .* after 3 attempts .*storage error, not damage"):
        ckpt.restore(abstract(state))
    assert ckpt.steps() == [2, 3] and sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["2", "3"]
    ckpt.close()


@pytest.mark.parametrize("error, storage", [
    (OSError(errno.EIO, "Input/output error"), True), (PermissionError(errno.EACCES, "denied"), True),
    (TimeoutError("timed out"), True), (FileNotFoundError(errno.ENOENT, "gone"), False),
    (ValueError("DATA_LOSS: Error reading: checksum mismatch"), False),
    (ValueError("NOT_FOUND: Error opening \"state/d/x\": [os_error_code=2] No such file"), False),
    (ValueError("RESOURCE_EXHAUSTED: Failed writing: No space left on device [os_error_code='28']"), True),
    (ValueError("UNAVAILABLE: Error reading gs://bucket/x"), True), (KeyError("params"), False)])
def test_storage_errors_are_told_from_damage(error, storage):
    assert checkpoint._is_storage_error(error) is storage


def test_a_state_of_other_shapes_is_reported_not_moved(tmp_path):
    ckpt, _ = saved(tmp_path, steps=(1,))
    other = S.init_state({"w": jnp.zeros((4, 4)), "b": jnp.zeros(8)}, optax.adamw(1e-3))
    with pytest.raises(UserError, match="other shapes .*nothing was moved"):
        ckpt.restore(abstract(other))
    assert ckpt.steps() == [1]
    ckpt.close()


@pytest.mark.parametrize("where", ["background", "save"])
def test_a_full_disk_while_saving_names_the_newest_intact_checkpoint(tmp_path, monkeypatch, where):
    ckpt, state = saved(tmp_path, steps=(1,))
    full = OSError(errno.ENOSPC, "No space left on device")
    if where == "background":  # the commit, in Orbax's thread, after every array file is written

        def no_space(step_dir):
            raise full
        monkeypatch.setattr(checkpoint, "write_sums", no_space)
    else:
        monkeypatch.setattr(ckpt.manager, "save", lambda *a, **k: (_ for _ in ()).throw(full))
    with pytest.raises(UserError, match=f"saving checkpoint 2 .*no space left on device.*partial files were removed; "
                                        f"the newest intact checkpoint is {tmp_path / 'ckpt' / '1'}"):
        ckpt.save(2, state, {"step": 2}, {})
        ckpt.wait()
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["1"]  # no partial 2.orbax-checkpoint-tmp
    ckpt.close()
    monkeypatch.undo()
    with Checkpoints(tmp_path / "ckpt") as again:
        assert again.steps() == [1] and again.restore(abstract(state))[0] == 1


def threads_left(before: set, patience: float = 5.0) -> list[str]:
    """Threads started since `before` that are still alive after `patience` seconds: an asyncio executor's
    worker that Orbax has shut down may take a moment to return, one left running is left behind."""
    deadline = time.monotonic() + patience
    for thread in set(threading.enumerate()) - before:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t.name for t in set(threading.enumerate()) - before if t.is_alive()]


def test_a_failure_leaves_no_threads_behind_and_a_save_in_flight_completes(tmp_path):
    state = trained_state()
    before = set(threading.enumerate())
    with pytest.raises(RuntimeError, match="in the loop"):
        with Checkpoints(tmp_path / "ckpt") as ckpt:
            ckpt.save(1, state, {"step": 1}, {})  # Orbax starts its writer and metadata threads
            raise RuntimeError("in the loop")
    assert threads_left(before) == []
    assert checkpoint.verify(tmp_path / "ckpt" / "1")
    shutil.rmtree(tmp_path / "ckpt" / "1" / "state" / "ocdbt.process_0")
    with pytest.raises(UserError, match="none of the checkpoints"):
        with Checkpoints(tmp_path / "ckpt", create=False) as again:  # evaluate's and export's way
            again.restore_params(abstract(state.params))
    with pytest.raises(UserError, match="none of the checkpoints"):
        with Checkpoints(tmp_path / "ckpt", create=False) as again:  # resume's
            again.restore(abstract(state))
    assert threads_left(before) == []


def test_train_resumes_past_a_damaged_optimizer_state_and_stops_when_none_is_intact(tmp_path, capsys, caplog):
    """`dpo-jax train` end to end: a flipped byte in the newest checkpoint's optimizer state is found, that
    checkpoint moved aside and the run resumed from the one before (exit 0); damage in every checkpoint stops it
    (exit 2). Storage errors: test_a_storage_error_is_retried_then_reported_and_nothing_moves."""
    from dpo_jax.cli import main
    from test_trainer import tiny_model

    out = tmp_path / "run"
    train = ["train", "--model_name_or_path", tiny_model(tmp_path / "model"), "--output_dir", str(out),
             "--per_device_train_batch_size", "1", "--max_length", "128", "--dataset_test_split", "none",
             "--report_to", "none", "--save_steps", "1", "--logging_steps", "1", "--max_steps"]
    assert main([*train, "2"]) == 0
    changed = flip_bytes_of(out / "checkpoints" / "2", "opt_state")

    with caplog.at_level(logging.WARNING):
        assert main([*train, "3", "--resume_from_checkpoint", "true"]) == 0
    aside = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("damaged-2-")]
    assert len(aside) == 1 and "checkpoint 2 " in caplog.text and changed in caplog.text and aside[0] in caplog.text
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]  # steps 2 and 3 trained again, from 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2", "3"]

    for s in (1, 2, 3):
        flip_bytes_of(out / "checkpoints" / str(s), "opt_state")
    capsys.readouterr()
    assert main([*train, "4", "--resume_from_checkpoint", "true"]) == 2
    err = capsys.readouterr().err
    assert "none of the checkpoints" in err and "not deleted" in err and "Traceback" not in err
