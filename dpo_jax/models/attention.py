"""Attention from per-token metadata: who may attend to whom is decided from [B, T] vectors, never from a
[B, T, S] mask built in advance.

`TokenMask` holds, per token, its `segment` (which sequence or pair of the row it belongs to; -1 padding) and
its `branch` (0: context every branch of the segment sees, such as the shared prompt; 1, 2: chosen, rejected,
invisible to each other). Query t may attend to key s when both are in the same segment, s <= t (causal in the
row), s is context or of t's branch, and, with a sliding window, t's position - s's position < window. Plain
rows (one sequence each, padding after or before it), prompt-sharing rows (prompt, chosen, rejected) and
packed rows (several of those) are the same rule with different vectors. Segments are contiguous runs of the
row (the blockwise path relies on it to skip blocks).

Implementations (`attn_implementation`, transformers' option name):
- `eager`: the [B, T, S] mask and float32 scores of the whole row, as transformers' eager attention. The
  reference the others are tested against; the KV cache of generation uses it.
- `blockwise`: online softmax over blocks of at most BLOCK queries x BLOCK keys (flash attention's algorithm) in pure
  JAX, with its own backward pass (`jax.custom_vjp`) that recomputes each block's scores: memory O(T x BLOCK)
  per head, forward and backward. Each query block visits only the key blocks from the start of its
  earliest segment to its last real query (causality and packing); visited blocks are masked per element.
- `splash` (TPU) and `cudnn` (GPU): backend kernels, for the masks they can express (kernels.py), `blockwise`
  for the rest.
- `auto` (the default): `splash` on a TPU, `cudnn` on a GPU; elsewhere `eager` when the row fits in one block
  (the same computation, without the loops), else `blockwise`.

Shapes in names as in layers.py: B batch, T query length, S key length, H query heads, K key/value heads,
G = H // K, E head dim.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from .. import sharding
from ..config import ATTN_IMPLEMENTATIONS
from . import kernels

# A large finite negative instead of -inf: a fully masked row (a padding query) then gives a finite
# uniform softmax instead of NaN, and its output is ignored anyway.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
BLOCK = 512  # queries and keys per block of the blockwise path
NO_WINDOW = int(np.iinfo(np.int32).max)  # a full-attention layer among sliding ones: every key is near enough
IMPLEMENTATIONS = ATTN_IMPLEMENTATIONS


def wide(dtype) -> jnp.dtype:
    """The dtype attention scores and softmax run in: float32, or wider when the model is (float64 tests)."""
    return jnp.promote_types(dtype, jnp.float32)


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class TokenMask:
    """Who may attend to whom, per token (see the module's docstring): int32 [B, T] each."""

    segment: jax.Array  # which sequence or pair of the row; -1: padding, seen by and seeing nothing
    branch: jax.Array  # 0: seen by every branch of its segment (the prompt); 1, 2: chosen, rejected

    @classmethod
    def from_padding(cls, attention_mask_BxT: jax.Array | None, batch: int, length: int) -> "TokenMask":
        """One sequence per row (1 in `attention_mask` = a real token; all when None). Real tokens are
        branch 0 and padding branch -1 of one segment, 0: no real token sees padding, and a padding mask with
        gaps (real tokens after padding) keeps the segment one contiguous run, as the blockwise path needs."""
        segment = jnp.zeros((batch, length), jnp.int32)
        if attention_mask_BxT is None:
            return cls(segment, segment)
        return cls(segment, jnp.where(attention_mask_BxT.astype(bool), 0, -1).astype(jnp.int32))


def visible(segment_q, branch_q, index_q, positions_q, segment_k, branch_k, index_k, positions_k,
            window) -> jax.Array:
    """[B, Tq, Sk] True where query may attend to key, from the [B, Tq] / [B, Sk] metadata and [Tq] / [Sk]
    indices in the row; `window` None (full attention) or the sliding window (int or traced scalar)."""
    sq, sk = segment_q[:, :, None], segment_k[:, None, :]
    bq, bk = branch_q[:, :, None], branch_k[:, None, :]
    ok = (sq == sk) & (sk >= 0) & (index_k[None, None, :] <= index_q[None, :, None]) & ((bk == 0) | (bk == bq))
    if window is not None:
        ok &= (positions_q[:, :, None] - positions_k[:, None, :]) < window
    return ok


def dense_mask(mask: TokenMask, positions_BxT: jax.Array, window=None) -> jax.Array:
    """The whole [B, T, T] mask of `eager` attention."""
    index = jnp.arange(mask.segment.shape[1])
    return visible(mask.segment, mask.branch, index, positions_BxT, mask.segment, mask.branch, index,
                   positions_BxT, window)


def _scores(q_BxTxKxGxE, k_BxSxKxE, scale, softcap):
    """Scaled (and soft-capped) scores [B, K, G, T, S] in float32; with the soft cap also tanh(raw / cap)."""
    s = jnp.einsum("btkge,bske->bkgts", q_BxTxKxGxE, k_BxSxKxE, preferred_element_type=wide(q_BxTxKxGxE.dtype))
    s = s * (scale if isinstance(scale, (int, float)) else jnp.asarray(scale, s.dtype))
    if softcap is None:
        return s, None
    capped = jnp.tanh(s / softcap)
    return capped * softcap, capped


def eager_attention(q_BxTxHxE: jax.Array, k_BxSxKxE: jax.Array, v_BxSxKxE: jax.Array, mask_BxTxS: jax.Array, *,
                    scale: float | jax.Array, softcap: float | None = None) -> jax.Array:
    """Grouped-query dot-product attention under a ready [B, T, S] mask; scores and softmax in float32.
    Returns [B, T, H, E]."""
    b, t, h, e = q_BxTxHxE.shape
    k = k_BxSxKxE.shape[2]
    scores, _ = _scores(q_BxTxHxE.reshape(b, t, k, h // k, e), k_BxSxKxE, scale, softcap)
    scores = jnp.where(mask_BxTxS[:, None, None, :, :], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxE.dtype)
    out = jnp.einsum("bkgts,bske->btkge", probs, v_BxSxKxE)
    return out.reshape(b, t, h, e)


def choose_implementation(implementation: str, length: int, block: int = BLOCK, backend: str | None = None) -> str:
    """What `auto` runs on `backend` (default: the traced step's): splash on a TPU, cuDNN on a GPU, else eager
    for rows of at most one block and blockwise beyond. Others are returned as they are. (Layers a kernel
    cannot take go blockwise: see self_attention.)"""
    if implementation != "auto":
        return implementation
    backend = backend or sharding.platform()
    if backend == "tpu":
        return "splash"
    if backend == "gpu":
        return "cudnn"
    return "eager" if length <= block else "blockwise"


def self_attention(q_BxTxHxE: jax.Array, k_BxTxKxE: jax.Array, v_BxTxKxE: jax.Array, mask: TokenMask,
                   positions_BxT: jax.Array, *, scale: float | jax.Array, softcap: float | None = None,
                   window=None, implementation: str = "auto", block: int | None = None) -> jax.Array:
    """Attention of a row's tokens to each other under `mask` (see the module's docstring). [B, T, H, E].
    `window`: None, an int, or a traced scalar (a scanned layer's; NO_WINDOW: full attention). `block`:
    queries and keys per block of the blockwise and splash paths (default BLOCK, SPLASH_BLOCK)."""
    t = q_BxTxHxE.shape[1]
    implementation = choose_implementation(implementation, t, block or BLOCK)
    if implementation not in IMPLEMENTATIONS[1:]:
        raise ValueError(f"attn_implementation {implementation!r}: choose one of {', '.join(IMPLEMENTATIONS)}")

    def blockwise():
        return blockwise_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, mask, positions_BxT, scale=scale,
                                   softcap=softcap, window=window, block=block)

    def kernel(window):  # splash or cuDNN for the rows and window they can take, else blockwise
        if implementation == "splash":
            if window is not None:  # the kernel's windows count row indices, ours positions
                return blockwise()
            return kernels.splash_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, mask.segment, mask.branch,
                                            scale=scale, softcap=softcap, block=block)
        gpu = sharding.platform() == "gpu"
        if not kernels.cudnn_expressible(q_BxTxHxE.dtype, q_BxTxHxE.shape[-1], softcap, scale, gpu):
            return blockwise()
        lengths_B, fits_B = kernels.sequence_lengths(mask.segment, mask.branch, positions_BxT,
                                                     check_positions=window is not None)
        fused = functools.partial(kernels.fused_attention, q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, lengths_B,
                                  scale=scale, window=window, implementation="cudnn" if gpu else "xla")
        return jax.lax.cond(fits_B.all(), fused, blockwise)

    if implementation == "eager":
        return eager_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, dense_mask(mask, positions_BxT, window),
                               scale=scale, softcap=softcap)
    if implementation == "blockwise":
        return blockwise()
    if window is None or isinstance(window, int):
        return kernel(window)
    # a scanned window (layers that slide among layers that do not): the kernel for the full-attention ones
    return jax.lax.cond(window >= NO_WINDOW, lambda: kernel(None), blockwise)


# ------------------------------------------------------------------------------------------------ blockwise
def blockwise_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, mask: TokenMask, positions_BxT, *, scale,
                        softcap=None, window=None, block: int | None = None) -> jax.Array:
    """`self_attention`'s blockwise implementation: [B, T, H, E], never holding more than one block's scores."""
    b, t, h, e = q_BxTxHxE.shape
    kv = k_BxTxKxE.shape[2]
    if block is None:  # as few blocks of at most BLOCK as cover the row, of equal sizes, multiples of 16
        count, multiple = -(-t // BLOCK), min(16, BLOCK)  # (1,100 tokens: 3 blocks of 368, not 3 of 512)
        block = -(-t // (multiple * count)) * multiple
    block = min(block, t)
    pad = -t % block
    if pad:  # whole blocks; the padding is a segment of its own (-1) and is dropped below
        def widen(x, value=0):
            return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=value)
        q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT = map(widen, (q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, positions_BxT))
        mask = TokenMask(widen(mask.segment, -1), widen(mask.branch, -1))
    q = q_BxTxHxE.reshape(b, t + pad, kv, h // kv, e)
    scale = jnp.asarray(scale, wide(q.dtype))
    window = None if window is None else jnp.asarray(window, jnp.int32)
    out = _flash(block, softcap, q, k_BxTxKxE, v_BxTxKxE, mask.segment, mask.branch, positions_BxT, scale, window)
    return out.reshape(b, t + pad, h, e)[:, :t]


def _block_ranges(segment_BxT: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Per query block, int32 [T / block] each: the first and one past the last key block any of its queries
    (in any row) may see: from the start of the earliest segment among its real queries to its last real
    query. A block of padding only gets an empty range."""
    b, t = segment_BxT.shape
    index = jnp.arange(t)
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_BxT[:, 1:] != segment_BxT[:, :-1]], axis=1)
    start_BxT = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)  # where each token's segment begins
    real = segment_BxT >= 0
    first = jnp.where(real, start_BxT, t).reshape(b, -1, block).min(axis=(0, 2))
    last = jnp.where(real, index, -1).reshape(b, -1, block).max(axis=(0, 2))
    return (first // block).astype(jnp.int32), jnp.where(last >= 0, last // block + 1, 0).astype(jnp.int32)


def _slice(x, start, size):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _block_visible(segment, branch, positions, qi, kj, block, window) -> jax.Array:
    """`visible` for the queries of the block at `qi` and the keys of the block at `kj`: [B, 1, 1, Q, S]."""
    index = jnp.arange(segment.shape[1])
    q = [_slice(x, qi, block) for x in (segment, branch, index[None], positions)]
    k = [_slice(x, kj, block) for x in (segment, branch, index[None], positions)]
    return visible(q[0], q[1], q[2][0], q[3], k[0], k[1], k[2][0], k[3], window)[:, None, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(block, softcap, q, k, v, segment, branch, positions, scale, window):
    return _flash_forward(q, k, v, segment, branch, positions, scale, window, block, softcap)[0]


def _flash_forward(q_BxTxKxGxE, k_BxTxKxE, v_BxTxKxE, segment, branch, positions, scale, window, block, softcap):
    """Output [B, T, K, G, E] and the softmax's log-normaliser [B, K, G, T] (float32)."""
    b, t, kv, g, e = q_BxTxKxGxE.shape
    f32 = wide(q_BxTxKxGxE.dtype)
    first, last = _block_ranges(segment, block)

    def query_block(i):
        qi = i * block
        q = _slice(q_BxTxKxGxE, qi, block)

        def key_block(j, carry):
            m_BxKxGxQ, l_BxKxGxQ, acc_BxKxGxQxE = carry
            kj = j * block
            s, _ = _scores(q, _slice(k_BxTxKxE, kj, block), scale, softcap)
            s = jnp.where(_block_visible(segment, branch, positions, qi, kj, block, window), s, MASK_VALUE)
            m_new = jnp.maximum(m_BxKxGxQ, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            correction = jnp.exp(m_BxKxGxQ - m_new)
            pv = jnp.einsum("bkgts,bske->bkgte", p.astype(v_BxTxKxE.dtype), _slice(v_BxTxKxE, kj, block),
                            preferred_element_type=f32)
            return m_new, l_BxKxGxQ * correction + p.sum(-1), acc_BxKxGxQxE * correction[..., None] + pv

        init = (jnp.full((b, kv, g, block), -jnp.inf, f32), jnp.zeros((b, kv, g, block), f32),
                jnp.zeros((b, kv, g, block, e), f32))
        m, l, acc = jax.lax.fori_loop(first[i], jnp.maximum(first[i], last[i]), key_block, init)
        seen = l > 0  # a query that visited no key (padding): output 0, log-normaliser 0
        out = acc / jnp.where(seen, l, 1)[..., None]
        return out.astype(v_BxTxKxE.dtype), jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1)), 0)

    out_NxBxKxGxQxE, lse_NxBxKxGxQ = jax.lax.map(query_block, jnp.arange(t // block))
    out = jnp.moveaxis(out_NxBxKxGxQxE, 0, 1)  # [B, N, K, G, Q, E]
    out_BxTxKxGxE = jnp.moveaxis(out, (2, 3, 4), (3, 4, 2)).reshape(b, t, kv, g, e)
    lse_BxKxGxT = jnp.moveaxis(lse_NxBxKxGxQ, 0, 3).reshape(b, kv, g, t)
    return out_BxTxKxGxE, lse_BxKxGxT


def _flash_fwd(block, softcap, q, k, v, segment, branch, positions, scale, window):
    out, lse = _flash_forward(q, k, v, segment, branch, positions, scale, window, block, softcap)
    return out, (q, k, v, segment, branch, positions, scale, window, out, lse)


def _flash_bwd(block, softcap, residuals, dout_BxTxKxGxE):
    """Flash attention's backward pass: per query block, over the same key blocks as the forward, the
    probabilities recomputed from the saved log-normaliser; dq per query block, dk and dv accumulated."""
    q_BxTxKxGxE, k_BxTxKxE, v_BxTxKxE, segment, branch, positions, scale, window, out, lse_BxKxGxT = residuals
    b, t, kv, g, e = q_BxTxKxGxE.shape
    f32 = wide(q_BxTxKxGxE.dtype)
    first, last = _block_ranges(segment, block)
    # D = rowsum(dO * O): the softmax's backward term, per query and head
    delta_BxKxGxT = jnp.einsum("btkge,btkge->bkgt", dout_BxTxKxGxE.astype(f32), out.astype(f32))

    def query_block(carry, i):
        dk_BxTxKxE, dv_BxTxKxE = carry
        qi = i * block
        q, dout = _slice(q_BxTxKxGxE, qi, block), _slice(dout_BxTxKxGxE, qi, block)
        lse = jax.lax.dynamic_slice_in_dim(lse_BxKxGxT, qi, block, axis=3)
        delta = jax.lax.dynamic_slice_in_dim(delta_BxKxGxT, qi, block, axis=3)

        def key_block(j, carry):
            dq, dk_all, dv_all = carry
            kj = j * block
            k, v = _slice(k_BxTxKxE, kj, block), _slice(v_BxTxKxE, kj, block)
            s, capped = _scores(q, k, scale, softcap)
            ok = _block_visible(segment, branch, positions, qi, kj, block, window)
            p = jnp.where(ok, jnp.exp(s - lse[..., None]), 0)  # [B, K, G, Q, S]
            dv = jnp.einsum("bkgts,btkge->bske", p.astype(dout.dtype), dout, preferred_element_type=f32)
            dp = jnp.einsum("btkge,bske->bkgts", dout, v, preferred_element_type=f32)
            ds = p * (dp - delta[..., None])
            if capped is not None:  # d tanh
                ds = ds * (1 - capped * capped)
            ds = (ds * scale).astype(q.dtype)
            dq = dq + jnp.einsum("bkgts,bske->btkge", ds, k, preferred_element_type=f32)
            dk = jnp.einsum("bkgts,btkge->bske", ds, q, preferred_element_type=f32)
            dk_all = jax.lax.dynamic_update_slice_in_dim(dk_all, _slice(dk_all, kj, block) + dk, kj, axis=1)
            dv_all = jax.lax.dynamic_update_slice_in_dim(dv_all, _slice(dv_all, kj, block) + dv, kj, axis=1)
            return dq, dk_all, dv_all

        init = (jnp.zeros((b, block, kv, g, e), f32), dk_BxTxKxE, dv_BxTxKxE)
        dq, dk_BxTxKxE, dv_BxTxKxE = jax.lax.fori_loop(first[i], jnp.maximum(first[i], last[i]), key_block, init)
        return (dk_BxTxKxE, dv_BxTxKxE), dq

    zeros = jnp.zeros((b, t, kv, e), f32)
    (dk, dv), dq_NxBxQxKxGxE = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(t // block))
    dq = jnp.moveaxis(dq_NxBxQxKxGxE, 0, 1).reshape(b, t, kv, g, e)
    return (dq.astype(q_BxTxKxGxE.dtype), dk.astype(k_BxTxKxE.dtype), dv.astype(v_BxTxKxE.dtype),
            None, None, None, None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
