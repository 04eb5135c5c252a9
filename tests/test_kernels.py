"""Backend kernels (dpo_jax/models/kernels.py) against eager attention (the whole [T, T] mask): Pallas splash
attention run by Pallas's interpreter on the CPU, and the cuDNN path's translation of a row to causal lengths
run through the same `jax.nn.dot_product_attention` call's XLA implementation; which rows each takes; the
splash kernel per device on a mesh of 8 simulated devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import LAYOUTS, B, E, H, T, assert_model_equals_eager, inputs, layout, pair_rows

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


def assert_equal_to_eager(implementation, mask, positions, real, softcap=None, block=None, t=T, window=None):
    """Outputs at real tokens and q/k/v gradients of a weighted sum within 1e-5 of eager attention's."""
    q, k, v = inputs(jnp.float32, t=t)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, t, H, E)), jnp.float32) * real[..., None, None]

    def run(impl, q, k, v):
        return self_attention(q, k, v, mask, positions, scale=0.3, softcap=softcap, window=window,
                              implementation=impl, block=block if impl != "eager" else None)

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


def test_splash_kernel_serves_several_programs():
    """The kernel of a row length is made once (cached) and used by every program traced at that length: a
    second jitted program and a gradient after the first (a train step, then evaluation)."""
    mask, positions, real = layout("packed")
    q, k, v = inputs(jnp.float32)

    def attend(q):
        return self_attention(q, k, v, mask, positions, scale=0.3, implementation="splash")

    first = jax.jit(attend)(q)
    second = jax.jit(lambda q: attend(q) * 2)(q)
    grad = jax.jit(jax.grad(lambda q: attend(q).sum()))(q)
    np.testing.assert_allclose(np.asarray(second), 2 * np.asarray(first), rtol=1e-6)
    assert np.isfinite(np.asarray(grad)).all()


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


@pytest.mark.parametrize("rows,kv_heads", [(4, 2), (3, 3)])
def test_splash_per_device_on_a_mesh_equals_eager(rows, kv_heads):
    """On 8 simulated devices (data 2 x fsdp 2 x tensor 2) the kernel runs per device (shard_map: rows over data
    x fsdp, key/value heads over tensor, each where it divides: 4 rows and 2 heads do, 3 and 3 do not):
    outputs and q/k/v gradients are eager attention's."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    segment, branch, positions = pair_rows([[(5, 7, 8), (6, 4, 11)], [(1, 30, 9)], [(3, 3, 3)], [(9, 9, 9)]][:rows], T)
    mask, positions = TokenMask(jnp.asarray(segment, jnp.int32), jnp.asarray(branch, jnp.int32)), jnp.asarray(positions)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(rows, T, n, E)), jnp.float32) for n in (2 * kv_heads, kv_heads, kv_heads))
    real = segment >= 0
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * real[..., None, None]

    def loss(q, k, v, implementation):
        with sharding.activations_on(mesh if implementation == "splash" else None):
            out = self_attention(q, k, v, mask, positions, scale=0.3, implementation=implementation)
        return (out * weights).sum(), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    placement = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        sharding.ROW_AXES if rows % 4 == 0 else None))
    placed = [jax.device_put(x, placement) for x in (q, k, v)]
    assert "manual_computation" in step.lower(*placed, "splash").as_text()  # per device (shard_map)
    (_, got), got_grads = step(*placed, "splash")
    (_, want), want_grads = step(q, k, v, "eager")
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)
    for a, b, what in zip(got_grads, want_grads, "qkv"):
        assert np.abs(np.asarray(b)).max() > 0.1, what
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=what)


@pytest.mark.parametrize("name", ("pairs",) + LAYOUTS)
def test_cudnn_path_equals_eager(name):
    """The cuDNN path in every layout: rows it can express (one causal sequence from index 0: `pairs` rows,
    right padding) through `jax.nn.dot_product_attention`'s lengths (its XLA implementation on the CPU), the
    others through the blockwise path."""
    mask, positions, real = any_layout(name)
    _, fits = kernels.sequence_lengths(mask.segment, mask.branch)
    assert bool(fits.all()) == (name in ("pairs", "right_padding")), fits
    assert_equal_to_eager("cudnn", mask, positions, real, block=16)


def test_cudnn_path_with_a_sliding_window():
    """Right-padded and `pairs` rows with a window of 6 go through the fused call (positions are the indices),
    forward and backward equal to eager; the call alone on them takes each row's length."""
    for mask, positions, real in (layout("right_padding"), pairs_layout()):
        lengths, fits = kernels.sequence_lengths(mask.segment, mask.branch, positions, check_positions=True)
        assert bool(fits.all()) and lengths.tolist() == real.sum(axis=1).tolist()
        assert_equal_to_eager("cudnn", mask, positions, real, window=6)
    # positions that are not the indices (a caller's own) cannot use cuDNN's index-counted window
    mask, positions, _ = layout("right_padding")
    _, fits = kernels.sequence_lengths(mask.segment, mask.branch, positions + 1, check_positions=True)
    assert not bool(fits.any())


def test_auto_chooses_by_backend(monkeypatch):
    """auto: splash on a TPU, cuDNN on a GPU, eager or blockwise on the CPU; cuDNN does not take float32 on a
    GPU, soft-capping, a traced scale or odd head dims (those layers go blockwise)."""
    for backend, want in (("tpu", "splash"), ("gpu", "cudnn"), ("cpu", "blockwise")):
        monkeypatch.setattr(sharding, "platform", lambda backend=backend: backend)
        assert choose_implementation("auto", 1024, 512) == want, backend
    monkeypatch.setattr(sharding, "platform", lambda: "cpu")
    assert choose_implementation("auto", 512, 512) == "eager"
    assert kernels.cudnn_expressible(jnp.bfloat16, 128, None, 0.1, gpu=True)
    assert not kernels.cudnn_expressible(jnp.float32, 128, None, 0.1, gpu=True)
    assert kernels.cudnn_expressible(jnp.float32, 128, None, 0.1, gpu=False)
    assert not kernels.cudnn_expressible(jnp.bfloat16, 128, 50.0, 0.1, gpu=True)
    assert not kernels.cudnn_expressible(jnp.bfloat16, 128, None, jnp.float32(0.1), gpu=True)
    assert not kernels.cudnn_expressible(jnp.bfloat16, 12, None, 0.1, gpu=True)
    assert not kernels.cudnn_expressible(jnp.bfloat16, 256, None, 0.1, gpu=True)


def test_scanned_windows_use_the_kernel_on_full_attention_layers(monkeypatch):
    """A traced window (a scan over sliding and full layers, Gemma 2/3): a NO_WINDOW layer takes the kernel and
    equals eager attention, a sliding one the blockwise path (made to give NaN here, to see which ran)."""
    from dpo_jax.models import attention

    mask, positions, real = layout("packed")
    q, k, v = inputs(jnp.float32)
    want = self_attention(q, k, v, mask, positions, scale=0.3, implementation="eager")
    monkeypatch.setattr(attention, "blockwise_attention", lambda q, *a, **kw: jnp.full_like(q, jnp.nan))
    run = jax.jit(lambda q, k, v, window: self_attention(q, k, v, mask, positions, scale=0.3, window=window,
                                                         implementation="splash"))
    got = run(q, k, v, jnp.int32(attention.NO_WINDOW))
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)
    assert np.isnan(np.asarray(run(q, k, v, jnp.int32(6)))).all()


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2", "gemma2"])
def test_every_architecture_splash_equals_eager(name, tmp_path):
    """Whole models on packed rows with the splash kernel (Gemma 2's sliding layers go blockwise, its full
    ones through the kernel, by a cond on the scanned window): hidden states and every weight's gradient equal
    eager's (test_attention.assert_model_equals_eager)."""
    assert_model_equals_eager(name, "splash", tmp_path)
