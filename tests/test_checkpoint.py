"""Orbax checkpoints of the training state: round trip, restore onto another mesh, fall back past a damaged one."""

import logging
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpo_jax import step as S
from dpo_jax.checkpoint import Checkpoints, abstract
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


def test_keeps_the_limit_and_falls_back_past_a_damaged_latest(tmp_path, caplog):
    state, _ = tiny_state()
    ckpt = Checkpoints(tmp_path / "ckpt", max_to_keep=2)
    for s in (1, 2, 3):
        ckpt.save(s, state._replace(step=jnp.int32(s)), {"step": s}, {})
        ckpt.wait()
    assert ckpt.steps() == [2, 3]
    for f in (tmp_path / "ckpt" / "3" / "state").rglob("*"):  # damage the newest
        if f.is_file():
            f.write_bytes(b"")
    with caplog.at_level(logging.WARNING):
        step, restored, data, _ = ckpt.restore(abstract(state))
    assert step == 2 and int(restored.step) == 2 and data == {"step": 2}
    assert "checkpoint 3" in caplog.text
    with pytest.raises(Exception, match="checkpoint 3 .* cannot be read"):
        ckpt.restore(abstract(state), step=3)
    shutil.rmtree(tmp_path / "ckpt" / "2")
    with pytest.raises(Exception, match="none of the checkpoints"):
        ckpt.restore(abstract(state))
    ckpt.close()
