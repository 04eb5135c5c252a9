"""Attention from per-token metadata (dpo_jax/models/attention.py): the blockwise implementation against the
eager one (the whole [T, T] mask, as transformers' eager attention) for every row layout, forward and backward;
float64 gradients against finite differences; no [T, T] array in the blockwise program; the key blocks a query
block visits."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models import attention
from dpo_jax.models.attention import TokenMask, _block_ranges, self_attention

B, T, H, K, E = 3, 50, 4, 2, 8


def pair_rows(pairs_per_row: list[list[tuple[int, int, int]]], length: int):
    """segment, branch, positions [rows, length] of prompt-sharing rows: each (prompt, chosen, rejected) pair in
    its own segment, the rejected tokens' positions restarting after the prompt."""
    rows = len(pairs_per_row)
    segment, branch, positions = (np.full((rows, length), -1), np.full((rows, length), -1),
                                  np.zeros((rows, length), int))
    for r, pairs in enumerate(pairs_per_row):
        start = 0
        for slot, (p, c, j) in enumerate(pairs):
            span = slice(start, start + p + c + j)
            segment[r, span] = slot
            branch[r, span] = [0] * p + [1] * c + [2] * j
            positions[r, span] = list(range(p + c)) + list(range(p, p + j))
            start += p + c + j
    return segment, branch, positions


def layout(name: str):
    """(TokenMask, positions, real-token mask) of B rows of T tokens in one of the step's row layouts."""
    if name == "padding_gaps":  # a [B, T] padding mask with real tokens after padding (from_padding)
        real = np.random.default_rng(5).random((B, T)) < 0.7
        mask = TokenMask.from_padding(jnp.asarray(real), B, T)
        return mask, jnp.asarray(np.maximum(np.cumsum(real, -1) - 1, 0), jnp.int32), real
    if name in ("right_padding", "left_padding"):
        lengths = [T, 31, 7]
        real = np.array([[t < n for t in range(T)] for n in lengths])
        if name == "left_padding":
            real = real[:, ::-1]
        positions = np.maximum(np.cumsum(real, -1) - 1, 0)
        segment, branch = np.where(real, 0, -1), np.zeros((B, T), int)
    elif name == "shared_prefix":
        segment, branch, positions = pair_rows([[(5, 20, 24)], [(0, 9, 3)], [(30, 1, 2)]], T)
    else:  # packed: pairs of different sizes, one row ending in padding, one crossing several blocks
        segment, branch, positions = pair_rows([[(5, 7, 8), (6, 4, 11), (2, 3, 3)], [(1, 40, 9)],
                                                [(3, 3, 3), (0, 2, 1)]], T)
    real = segment >= 0
    mask = TokenMask(jnp.asarray(segment, jnp.int32), jnp.asarray(branch, jnp.int32))
    return mask, jnp.asarray(positions, jnp.int32), real


def inputs(dtype, seed=0, t=T):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, t, n, E)), dtype) for n in (H, K, K))


LAYOUTS = ("right_padding", "left_padding", "padding_gaps", "shared_prefix", "packed")


@pytest.mark.parametrize("name", LAYOUTS)
@pytest.mark.parametrize("softcap,window", [(None, None), (2.0, None), (None, 6), (3.0, 9)])
def test_blockwise_equals_eager_forward_and_backward(name, softcap, window):
    """Every layout, with soft-capping (Gemma 2) and sliding windows, grouped-query heads, blocks of 16 over
    50 tokens (four blocks, the last padded): outputs at real tokens and the gradients of q, k and v within 1e-5
    of eager attention's (float32), the gradients through eager attention's autodiff."""
    mask, positions, real = layout(name)
    q, k, v = inputs(jnp.float32)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, H, E)), jnp.float32) * real[..., None, None]

    def run(implementation, q, k, v):
        return self_attention(q, k, v, mask, positions, scale=0.3, softcap=softcap, window=window,
                              implementation=implementation, block=16)

    eager, blockwise = run("eager", q, k, v), run("blockwise", q, k, v)
    np.testing.assert_allclose(np.asarray(blockwise)[real], np.asarray(eager)[real], rtol=1e-5, atol=1e-5)
    grads = {impl: jax.grad(lambda *x: (run(impl, *x) * weights).sum(), argnums=(0, 1, 2))(q, k, v)
             for impl in ("eager", "blockwise")}
    for got, want, what in zip(grads["blockwise"], grads["eager"], "qkv"):
        assert np.abs(np.asarray(want)).max() > 0.1, what  # the gradient is not trivially zero
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=what)


def test_blockwise_gradients_equal_central_finite_differences():
    """float64: directional derivatives of the blockwise implementation (its own backward pass) against central
    finite differences, on packed rows with a window and soft-capping."""
    mask, positions, real = layout("packed")
    with jax.enable_x64():
        q, k, v = inputs(jnp.float64, seed=2)
        weights = jnp.asarray(np.random.default_rng(3).normal(size=(B, T, H, E))) * real[..., None, None]

        def loss(q, k, v):
            out = self_attention(q, k, v, mask, positions, scale=0.4, softcap=2.5, window=11,
                                 implementation="blockwise", block=16)
            return (out * weights).sum()

        grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
        rng = np.random.default_rng(4)
        for i, g in enumerate(grads):
            direction = jnp.asarray(rng.normal(size=g.shape))
            args = [q, k, v]
            eps = 1e-5
            plus = loss(*[a + eps * direction if n == i else a for n, a in enumerate(args)])
            minus = loss(*[a - eps * direction if n == i else a for n, a in enumerate(args)])
            numeric = float((plus - minus) / (2 * eps))
            analytic = float((g * direction).sum())
            assert abs(analytic - numeric) <= 1e-7 * max(1.0, abs(numeric)), ("qkv"[i], analytic, numeric)


def _large_shapes(hlo: str, t: int) -> list[str]:
    """Array shapes in an HLO text with two dimensions of at least `t`."""
    found = []
    for dims in re.findall(r"\[([\d,]+)\]", hlo):
        sizes = [int(d) for d in dims.split(",") if d]
        if sum(d >= t for d in sizes) >= 2:
            found.append(dims)
    return found


def test_blockwise_program_never_holds_t_by_t_arrays():
    """The compiled forward and backward pass of blockwise attention over 512 tokens in blocks of 64 has no
    array with two dimensions of 512 or more (eager attention's scores and mask have them: the check can see)."""
    t = 512
    mask, positions = TokenMask(jnp.zeros((B, t), jnp.int32), jnp.zeros((B, t), jnp.int32)), jnp.tile(jnp.arange(t), (B, 1))
    q, k, v = inputs(jnp.float32, t=t)

    def compiled(implementation):
        def loss(q, k, v):
            return self_attention(q, k, v, mask, positions, scale=0.3, implementation=implementation,
                                  block=64).sum()
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile().as_text()

    assert _large_shapes(compiled("eager"), t)
    assert _large_shapes(compiled("blockwise"), t) == []


def test_query_blocks_visit_only_keys_they_may_see():
    """Key-block ranges per query block: from the earliest segment start among its real queries to its last
    real query; a block of padding only visits nothing."""
    # blocks of 4 over 16 tokens; row 0: segments at 0-5, 6-13, padding 14-15; row 1: one segment 0-9, padding
    segment = np.full((2, 16), -1)
    segment[0, :6], segment[0, 6:14], segment[1, :10] = 0, 1, 0
    first, last = _block_ranges(jnp.asarray(segment), 4)
    # query block 0 (0-3): keys of block 0; block 1 (4-7): row 0's segments start at 0 and 6, row 1's at 0;
    # block 2 (8-11): row 0's segment 1 starts at 6 (block 1), row 1's at 0; block 3 (12-15): row 0's segment 1
    # from 6 to 13, row 1 padding only
    assert first.tolist() == [0, 0, 0, 1]
    assert last.tolist() == [1, 2, 3, 4]
    only_padding = _block_ranges(jnp.asarray(np.full((1, 8), -1)), 4)
    assert [int(a) >= int(b) for a, b in zip(*only_padding)] == [True, True]


def test_auto_is_eager_within_one_block_and_blockwise_beyond(monkeypatch):
    """`auto` computes rows of at most one block as eager attention (the same values: the same program) and
    longer rows blockwise."""
    mask, positions, real = layout("packed")
    q, k, v = inputs(jnp.float32)
    kw = dict(scale=0.3)
    monkeypatch.setattr(attention, "BLOCK", 64)
    assert (np.asarray(self_attention(q, k, v, mask, positions, implementation="auto", **kw))
            == np.asarray(self_attention(q, k, v, mask, positions, implementation="eager", **kw))).all()
    monkeypatch.setattr(attention, "BLOCK", 16)
    assert (np.asarray(self_attention(q, k, v, mask, positions, implementation="auto", **kw))
            == np.asarray(self_attention(q, k, v, mask, positions, implementation="blockwise", **kw))).all()
    with pytest.raises(ValueError, match="attn_implementation 'flash'"):
        self_attention(q, k, v, mask, positions, implementation="flash", **kw)


def assert_model_equals_eager(name: str, implementation: str, directory) -> None:
    """A whole tiny model of family `name` on packed rows: hidden states at real tokens and the gradient of their
    weighted sum with respect to every weight within 1e-5 of eager attention's."""
    import tiny_models
    from flax import nnx

    from dpo_jax import from_pretrained

    tiny_models.make_model(name).save_pretrained(directory)
    model = from_pretrained(str(directory))
    segment, branch, positions = pair_rows([[(3, 4, 5), (2, 3, 2)], [(0, 6, 4)]], 24)  # within gpt2's 32 positions
    mask = TokenMask(jnp.asarray(segment, jnp.int32), jnp.asarray(branch, jnp.int32))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 128, segment.shape), jnp.int32)
    real = np.asarray(segment >= 0)
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(*segment.shape, 64)), jnp.float32) * real[..., None]
    graphdef, params = nnx.split(model)

    def loss(params, implementation):
        hidden = nnx.merge(graphdef, params).hidden_states(ids, mask, jnp.asarray(positions, jnp.int32),
                                                           attn_implementation=implementation)
        return (hidden * weights).sum(), hidden

    (_, eager), eager_grads = jax.value_and_grad(loss, has_aux=True)(params, "eager")
    (_, got), got_grads = jax.value_and_grad(loss, has_aux=True)(params, implementation)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(eager)[real], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(eager_grads), jax.tree.leaves(got_grads)):
        assert np.linalg.norm(np.asarray(b) - np.asarray(a)) <= 1e-5 * max(1.0, np.linalg.norm(np.asarray(a)))


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen3", "gemma2", "gemma3_text", "gpt2"])
def test_every_architecture_blockwise_equals_eager(name, tmp_path, monkeypatch):
    """Whole models (GQA, sliding windows, Gemma 2's soft-capping, Gemma 3's per-layer windows, Qwen3's q/k norms,
    GPT-2) on packed rows, in blocks of 8: hidden states and every weight's gradient equal eager's."""
    monkeypatch.setattr(attention, "BLOCK", 8)
    assert_model_equals_eager(name, "blockwise", tmp_path)
