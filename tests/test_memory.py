"""The memory planner against XLA's own account of the compiled train step, and the refusal of a run that
does not fit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dpo_jax import memory
from dpo_jax import step as S
from dpo_jax.cli import main
from dpo_jax.losses import LossConfig
from dpo_jax.models import family
from dpo_jax.models.llama import LlamaConfig
from dpo_jax.sharding import make_mesh
from test_trainer import tiny_model

MARGIN = 0.25  # the plan is within 25% of what XLA allocates (the README states it)


def llama(hidden, layers, vocab):
    head_dim = hidden // 4
    inv_freq = tuple(float(x) for x in 1 / 10000 ** (np.arange(0, head_dim, 2) / head_dim))
    return LlamaConfig(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                       num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=head_dim, rms_norm_eps=1e-6,
                       inv_freq=inv_freq, hidden_act="silu", qkv_bias=False, o_bias=False, mlp_bias=False,
                       qk_norm=False, tie_word_embeddings=False, sliding_windows=(None,) * layers)


@pytest.mark.parametrize("hidden,layers,vocab,length,batch,accumulation,remat", [
    (80, 3, 1500, 160, 3, 1, True),
    (128, 6, 5000, 96, 2, 3, True),
    (48, 5, 2500, 224, 2, 1, False),
    (192, 2, 3000, 320, 1, 1, True),
])
def test_plan_agrees_with_the_compiled_step(hidden, layers, vocab, length, batch, accumulation, remat):
    mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
    config = llama(hidden, layers, vocab)
    model_cls = family("llama").Model
    cfg = S.StepConfig(loss=LossConfig(), gradient_accumulation_steps=accumulation, gradient_checkpointing=remat)
    graphdef, params = S.split_policy(model_cls(config, rngs=nnx.Rngs(0)), remat)
    ref_graphdef, ref = S.split_reference(model_cls(config, rngs=nnx.Rngs(1)), remat)
    params, ref = S.shard_params(params, mesh), S.shard_params(ref, mesh)
    tx = S.make_optimizer(S.OptimConfig(), 10)
    state = S.init_state(params, tx)
    n = batch * accumulation
    shape = (n, 2, length)
    abstract_batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=S.batch_sharding(mesh))
                      for k in ("input_ids", "attention_mask", "completion_mask", "position_ids")}
    abstract_batch["pair_mask"] = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=S.batch_sharding(mesh))
    compiled = S.compile_train_step(graphdef, ref_graphdef, cfg, tx, mesh, state, ref).lower(
        state, ref, abstract_batch).compile()
    plan = memory.plan(config, mesh, per_device_batch=batch, max_length=length, compute_dtype=jnp.float32,
                       gradient_accumulation_steps=accumulation, gradient_checkpointing=remat)
    xla = memory.compiled_bytes(compiled)
    assert abs(plan.total / xla - 1) <= MARGIN, (plan, plan.total, xla)


def test_a_run_that_does_not_fit_stops_before_loading(tmp_path, capsys):
    model = tiny_model(tmp_path / "model")
    assert main(["train", "--model_name_or_path", model, "--output_dir", str(tmp_path / "o"), "--memory_limit_gb",
                 "0.001", "--per_device_train_batch_size", "1", "--max_length", "128"]) == 2
    captured = capsys.readouterr()
    assert "memory plan, per device:" in captured.out and "device memory" in captured.out
    assert "needs about" in captured.err and "--use_peft true" in captured.err
    assert "--precompute_ref_log_probs true" in captured.err and "Traceback" not in captured.err
    # the data audit comes before the memory plan: a refused run leaves its audit, and nothing else
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".dpo-jax.lock", "data_audit.json"]
    assert (tmp_path / "o" / ".dpo-jax.lock").read_text() == ""  # released


def test_lora_and_a_precomputed_reference_shrink_the_plan():
    mesh = make_mesh(fsdp=-1)
    config = llama(256, 4, 4096)
    full = memory.plan(config, mesh, per_device_batch=2, max_length=256, compute_dtype=jnp.float32)
    adapters = memory.lora_param_count(config, 16, ("q_proj", "v_proj"))
    assert adapters == 4 * 16 * ((256 + 256) + (256 + 128))  # q: 256 -> 256, v: 256 -> 2 kv heads x 64
    lora = memory.plan(config, mesh, per_device_batch=2, max_length=256, compute_dtype=jnp.float32,
                       lora_params=adapters, live_reference=False)
    assert lora.reference == 0 and lora.optimizer < full.optimizer / 50
    assert memory.plan(config, mesh, per_device_batch=2, max_length=256, compute_dtype=jnp.float32,
                       live_reference=False).reference == 0
    # fsdp=8 splits every matrix (on its 256-wide side); the norms' vectors stay whole (a stacked one: [L, D])
    assert full.parameters == sum(4 * np.prod(s) // (8 if matrix else 1) for s, matrix in _shapes(config))


def _shapes(config):
    """(shape, whether a matrix: two dimensions besides a stacked layer axis) of every parameter."""
    model = nnx.eval_shape(lambda: family("llama").Model(config, rngs=nnx.Rngs(0)))
    return [(v.get_value().shape, v.get_value().ndim - (v.get_metadata()["out_sharding"][0] == "layers") == 2)
            for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
