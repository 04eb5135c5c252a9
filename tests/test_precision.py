"""The output head accumulates in float32 under bfloat16 compute: the logits are not rounded to bfloat16 before
the softmax, so a bfloat16 run's log-probs stay closer to float32's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpo_jax
from dpo_jax.batching import plain_rows
from dpo_jax.logps import batch_logps
from tiny_models import batch, make_model, positions


def sequence_logps(model, ids, attention, completion, _positions=None):
    """batch_logps of each row as a pair's chosen (its rejected the same row): [N]."""
    rows = plain_rows(*(np.repeat(np.asarray(x)[:, None], 2, axis=1) for x in (ids, attention, completion)))
    return {k: v[:, 0] for k, v in batch_logps(model, jax.tree.map(jnp.asarray, rows), len(ids)).items()}


@pytest.mark.parametrize("name", ["llama", "llama_tied_linear_rope", "gpt2"])
def test_head_logits_are_float32_products_of_bfloat16_inputs(tmp_path, name):
    make_model(name).save_pretrained(tmp_path)
    model = dpo_jax.from_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    ids, mask = batch()
    hidden = model.hidden_states(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions(mask)))
    assert hidden.dtype == jnp.bfloat16
    logits = model.logits(hidden)
    assert logits.dtype == jnp.float32
    head = model.lm_head.kernel[...] if getattr(model, "lm_head", None) is not None else None
    if head is None:  # tied: the embedding's transpose
        table = model.wte if hasattr(model, "wte") else model.embed_tokens
        head = table.embedding[...].T
    exact = np.asarray(hidden, np.float64) @ np.asarray(head.astype(jnp.bfloat16), np.float64)
    if getattr(model, "lm_head", None) is not None and model.lm_head.bias is not None:
        exact = exact + np.asarray(model.lm_head.bias[...].astype(jnp.bfloat16), np.float64)
    scale = np.abs(exact).max()
    assert np.abs(np.asarray(logits) - exact).max() / scale < 1e-5  # float32 accumulation
    rounded = np.asarray(jnp.asarray(exact, jnp.float32).astype(jnp.bfloat16), np.float64)
    assert np.abs(rounded - exact).max() / scale > 1e-3  # what a bfloat16 output would have lost


def test_bfloat16_log_probs_closer_to_float32(tmp_path):
    make_model("llama").save_pretrained(tmp_path)
    ids, mask = batch()
    args = (jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(mask), jnp.asarray(positions(mask)))
    reference = dpo_jax.from_pretrained(str(tmp_path), dtype=jnp.float32)
    want = np.asarray(sequence_logps(reference, *args)["logps"])
    model = dpo_jax.from_pretrained(str(tmp_path), dtype=jnp.bfloat16)
    got = np.asarray(sequence_logps(model, *args)["logps"])

    # the same bfloat16 model with its logits rounded to bfloat16 before the softmax (the head before this fix)
    hidden = model.hidden_states(args[0], args[1], args[3])
    logits = model.logits(hidden).astype(jnp.bfloat16).astype(jnp.float32)
    token = jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), args[0][:, 1:, None], -1)[..., 0]
    rounded = np.asarray((token * args[2][:, 1:]).sum(-1))
    assert np.abs(got - want).max() < np.abs(rounded - want).max()


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_reference_held_in_bfloat16_scores_as_the_float32_weights_do(tmp_path, name):
    """Under bfloat16 compute the reference's matrices are held in bfloat16 (half the memory); every layer casts
    its weights to the compute dtype anyway, so its log-probs are those of the float32 weights, to the bit."""
    from flax import nnx

    from dpo_jax import trainer
    from dpo_jax.config import Options, RunConfig
    from dpo_jax.sharding import is_matrix, is_variable, make_mesh

    make_model(name).save_pretrained(tmp_path)
    mesh = make_mesh(fsdp=1, devices=jax.devices()[:1])
    ids, mask = batch()
    rows = [jnp.asarray(x) for x in (ids, mask, mask, positions(mask))]
    got = {}
    for ref_dtype in ("auto", "float32"):
        o = Options(run=RunConfig(model_name_or_path=str(tmp_path), bf16=True, ref_dtype=ref_dtype))
        models = trainer.build_models(o, mesh, jnp.bfloat16)
        weights = jax.tree.leaves(models.ref, is_leaf=is_variable)  # stacked blocks: a leading layer axis
        dtypes = {v.get_value().dtype for v in weights if is_matrix(v)}
        assert dtypes == {jnp.dtype(jnp.bfloat16 if ref_dtype == "auto" else jnp.float32)}
        assert {v.get_value().dtype for v in weights if not is_matrix(v)} == {jnp.dtype(jnp.float32)}
        forward = jax.jit(lambda ref: sequence_logps(nnx.merge(models.ref_graphdef, ref), *rows)["logps"])
        got[ref_dtype] = np.asarray(forward(models.ref))
    np.testing.assert_array_equal(got["auto"], got["float32"])
