"""Backend kernels (dpo_jax/models/kernels.py) against eager attention (the whole [T, T] mask): Pallas splash
attention run by Pallas's interpreter on the CPU, and the cuDNN path's translation of a row to causal lengths
run through the same `jax.nn.dot_product_attention` call's XLA implementation; which rows each takes; the
splash kernel per device on a mesh of 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import LAYOUTS, B, E, H, T, inputs, layout, pair_rows

from dpo_jax import sharding
from dpo_jax.models import kernels
from dpo_jax.models.attention import TokenMask, choose_implementation, self_attention


def pairs_layout(length=T):
    """The `pairs` layout's rows: one (prompt, completion) sequence each, chosen (branch 1) or rejected (2)."""
    segment, branch, positions = (np.full((B, length), -1), np.full((B, length), -1),
                                  np.zeros((B, length), int))
    for r, (p, c, which) in enumerate([(10, length - 10, 1), (10, 25, 2), (3, 4, 2)]):
        segment[r, :p + c], branch[r, :p + c], positions[r, :p + c] = 0, [0] * p + [which] * c, range(p + c)
    mask = TokenMask(jnp.asarray(segment, jnp.int32), jnp.asarray(branch, jnp.int32))
    return mask, jnp.asarray(positions, jnp.int32), segment >= 0


def any_layout(name):
    return pairs_layout() if name == "pairs" else layout(name)


def assert_equal_to_eager(implementation, mask, positions, real, softcap=None, block=None, t=T):
    """Outputs at real tokens and q/k/v gradients of a weighted sum within 1e-5 of eager attention's."""
    q, k, v = inputs(jnp.float32, t=t)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, t, H, E)), jnp.float32) * real[..., None, None]

    def run(impl, q, k, v):
        return self_attention(q, k, v, mask, positions, scale=0.3, softcap=softcap, implementation=impl,
                              block=block if impl != "eager" else None)

    want, got = run("eager", q, k, v), run(implementation, q, k, v)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)
    grads = {impl: jax.grad(lambda *x: (run(impl, *x) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
             for impl in ("eager", implementation)}
    for got, want, what in zip(grads[implementation], grads["eager"], "qkv"):
        assert np.abs(np.asarray(want)).max() > 0.1, what
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("name", ("pairs",) + LAYOUTS)
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_splash_equals_eager_forward_and_backward(name, softcap):
    """Splash attention (interpreted) in every layout, with Gemma 2's soft cap, grouped-query heads; 50 tokens
    padded to one block of 128."""
    assert_equal_to_eager("splash", *any_layout(name), softcap=softcap)


def test_splash_over_several_blocks():
    """Packed pairs across three 128-token blocks (300 tokens padded to 384), a pair crossing two blocks."""
    segment, branch, positions = pair_rows([[(20, 70, 40), (5, 100, 30), (9, 9, 9)], [(100, 90, 80)],
                                            [(0, 3, 2), (150, 40, 60)]], 300)
    mask = TokenMask(jnp.asarray(segment, jnp.int32), jnp.asarray(branch, jnp.int32))
    assert_equal_to_eager("splash", mask, jnp.asarray(positions, jnp.int32), segment >= 0, block=128, t=300)


def test_splash_calls_split_only_rows_with_both_branches():
    """The second kernel call takes the rejected tokens of segments that also hold a chosen branch, and sees
    their prompt and themselves; `pairs` rows and padding masks need one call."""
    for name in ("pairs", "right_padding", "left_padding", "padding_gaps"):
        mask = any_layout(name)[0]
        assert not bool(kernels.second_branch(mask.segment, mask.branch).any()), name
    segment, branch, _ = pair_rows([[(2, 2, 3), (1, 1, 1)]], 12)
    (first_q, first_kv), (second_q, second_kv), second = kernels.splash_ids(jnp.asarray(segment, jnp.int32),
                                                                           jnp.asarray(branch, jnp.int32))
    # row: prompt 0 0, chosen 0 0, rejected 0 0 0, prompt 1, chosen 1, rejected 1, padding x 2
    assert second[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 1, 0, 0]
    assert first_q[0].tolist() == [0, 0, 0, 0, -2, -2, -2, 1, 1, -2, -2, -2]
    assert first_kv[0].tolist() == [0, 0, 0, 0, -3, -3, -3, 1, 1, -3, -3, -3]
    assert second_q[0].tolist() == [-2, -2, -2, -2, 0, 0, 0, -2, -2, 1, -2, -2]
    assert second_kv[0].tolist() == [0, 0, -3, -3, 0, 0, 0, 1, -3, 1, -3, -3]


def test_splash_per_device_on_a_mesh_equals_one_device():
    """On 8 simulated devices (data 2 x fsdp 2 x tensor 2) the kernel runs per device (shard_map: rows over data
    x fsdp, key/value heads over tensor) and gives one device's numbers; the output keeps the rows' split."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    segment, branch, positions = pair_rows([[(5, 7, 8), (6, 4, 11)], [(1, 30, 9)], [(3, 3, 3)], [(9, 9, 9)]], T)
    mask = TokenMask(jnp.asarray(segment, jnp.int32), jnp.asarray(branch, jnp.int32))
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(4, T, n, E)), jnp.float32) for n in (H, 2, 2))
    real = segment >= 0

    def run(q, k, v):
        return self_attention(q, k, v, mask, jnp.asarray(positions, jnp.int32), scale=0.3, implementation="splash")

    want = self_attention(q, k, v, mask, jnp.asarray(positions, jnp.int32), scale=0.3, implementation="eager")

    def on_mesh(q, k, v):
        with sharding.activations_on(mesh):
            return run(q, k, v)

    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(sharding.ROW_AXES))
    placed = [jax.device_put(x, rows) for x in (q, k, v)]
    got = jax.jit(on_mesh)(*placed)
    assert "manual_computation" in jax.jit(on_mesh).lower(*placed).as_text()  # per device (shard_map)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)
    assert got.sharding.shard_shape(got.shape)[0] == 1  # each of the 4 row groups holds one row


@pytest.mark.parametrize("name", ("pairs",) + LAYOUTS)
def test_cudnn_path_equals_eager(name):
    """The cuDNN path in every layout: rows it can express (one causal sequence from index 0: `pairs` rows,
    right padding) through `jax.nn.dot_product_attention`'s lengths (its XLA implementation on the CPU), the
    others through the blockwise path."""
    mask, positions, real = any_layout(name)
    _, fits = kernels.sequence_lengths(mask.segment, mask.branch)
    assert bool(fits.all()) == (name in ("pairs", "right_padding")), fits
    assert_equal_to_eager("cudnn", mask, positions, real, block=16)


def test_cudnn_call_takes_the_rows_lengths_and_window():
    """The fused call alone (no fallback) on right-padded rows with a sliding window of 6: eager's numbers."""
    mask, positions, real = layout("right_padding")
    lengths, fits = kernels.sequence_lengths(mask.segment, mask.branch)
    assert lengths.tolist() == [T, 31, 7] and bool(fits.all())
    q, k, v = inputs(jnp.float32)
    got = kernels.fused_attention(q, k, v, lengths, scale=0.3, window=6, implementation="xla")
    want = self_attention(q, k, v, mask, positions, scale=0.3, window=6, implementation="eager")
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)


def test_auto_chooses_by_backend(monkeypatch):
    """auto: splash on a TPU (blockwise for sliding-window layers), cuDNN on a GPU, eager or blockwise on the
    CPU; on a GPU, float32 and soft-capped layers are not cuDNN's (the blockwise path)."""
    for backend, window, want in (("tpu", None, "splash"), ("tpu", 4, "blockwise"), ("gpu", None, "cudnn"),
                                  ("cpu", None, "blockwise")):
        monkeypatch.setattr(sharding, "platform", lambda backend=backend: backend)
        assert choose_implementation("auto", 1024, 512, None, window) == want, (backend, window)
    monkeypatch.setattr(sharding, "platform", lambda: "cpu")
    assert choose_implementation("auto", 512, 512, None, None) == "eager"
    assert not kernels.cudnn_expressible(jnp.float32, None, None, 0.1, gpu=True)
    assert not kernels.cudnn_expressible(jnp.bfloat16, 50.0, None, 0.1, gpu=True)
    assert kernels.cudnn_expressible(jnp.bfloat16, None, 4096, 0.1, gpu=True)
    assert not kernels.cudnn_expressible(jnp.bfloat16, None, jnp.int32(4096), 0.1, gpu=True)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2", "gemma2"])
def test_every_architecture_splash_equals_eager(name, tmp_path):
    """Whole models on packed rows with the splash kernel (Gemma 2's sliding-window layers go blockwise):
    hidden states at real tokens and every weight's gradient within 1e-5 of eager attention's."""
    import tiny_models
    from flax import nnx

    from dpo_jax import from_pretrained

    tiny_models.make_model(name).save_pretrained(tmp_path)
    model = from_pretrained(str(tmp_path))
    segment, branch, positions = pair_rows([[(3, 4, 5), (2, 3, 2)], [(0, 6, 4)]], 24)
    mask = TokenMask(jnp.asarray(segment, jnp.int32), jnp.asarray(branch, jnp.int32))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, segment.shape), jnp.int32)
    real = jnp.asarray(segment >= 0)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(*segment.shape, 64)), jnp.float32) * real[..., None]
    graphdef, params = nnx.split(model)

    def loss(params, implementation):
        hidden = nnx.merge(graphdef, params).hidden_states(ids, mask, jnp.asarray(positions, jnp.int32),
                                                           attn_implementation=implementation)
        return (hidden * weights).sum(), hidden

    (_, eager), eager_grads = jax.value_and_grad(loss, has_aux=True)(params, "eager")
    (_, splash), splash_grads = jax.value_and_grad(loss, has_aux=True)(params, "splash")
    np.testing.assert_allclose(np.asarray(splash)[np.asarray(real)], np.asarray(eager)[np.asarray(real)],
                               rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(eager_grads), jax.tree.leaves(splash_grads)):
        assert np.linalg.norm(np.asarray(b) - np.asarray(a)) <= 1e-5 * max(1.0, np.linalg.norm(np.asarray(a)))
