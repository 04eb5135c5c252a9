"""Attention kernels of one backend each, under attention.py's rule (a TokenMask's segment and branch vectors): Pallas splash attention on
TPU and cuDNN's fused attention on GPU. Each takes the masks it can express and says so; attention.py's
`self_attention` falls back to its pure-JAX blockwise path for the rest.

**Splash** (`jax.experimental.pallas.ops.tpu.splash_attention`) masks by a static mask (causal here) and
per-token segment ids: query t sees key s when s <= t and q_ids[t] == kv_ids[s]. Packing and padding are
segment ids. The shared prompt is not: a prompt key must match both branches' queries while a chosen key must
not match a rejected query. So it is two kernel calls, each query's softmax whole in one of them:
- the first: every query but those of a rejected branch whose segment also holds a chosen branch ("second"
  queries); keys: all of the segment but the second branch's;
- the second (only when a row has second queries, a `lax.cond`): the second queries; keys: the segment's
  context (prompt) and the second branch.
The output takes each query's row from its call. A row with one completion per segment (the `pairs` layout,
a padding mask) is one call. This relies on what every layout does: a segment's context precedes its
branches in the row. Sliding windows are by position, not by index, so windowed layers are not sent here.
On the CPU the kernel runs in Pallas's interpret mode (the tests).

**cuDNN** (`jax.nn.dot_product_attention(implementation="cudnn")`) masks by causality and per-row lengths:
rows holding one sequence each from index 0 (right padding), with at most one completion branch per row
(`pairs` rows, padding masks). Other rows (prompt sharing, packing, left padding) take the blockwise path,
chosen per batch by a `lax.cond`. cuDNN's flash attention needs bfloat16 or float16 and has no soft-capping.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from ..sharding import ROW_AXES, activation_mesh, platform

SPLASH_BLOCK = 512  # queries and keys per splash block (rows are padded to a multiple of it, or of 128 below it)
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


# ---------------------------------------------------------------------------------------------------- splash
def second_branch(segment_BxT: jax.Array, branch_BxT: jax.Array) -> jax.Array:
    """bool [B, T]: tokens of a rejected branch (2) whose segment holds a chosen branch (1) in the same row
    (the TokenMask's vectors)."""
    b, t = segment_BxT.shape
    index = jnp.arange(t)
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_BxT[:, 1:] != segment_BxT[:, :-1]], axis=1)
    run_BxT = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)  # where each token's run of its segment begins

    def row(branch_T, run_T):  # per row: no reduction across the devices holding the rows
        chosen = jax.ops.segment_max((branch_T == 1).astype(jnp.int32), run_T, num_segments=t)
        return chosen[run_T] > 0

    return (branch_BxT == 2) & (segment_BxT >= 0) & jax.vmap(row)(branch_BxT, run_BxT)


def splash_ids(segment_BxT: jax.Array, branch_BxT: jax.Array):
    """The two calls' (query ids, key ids), int32 [B, T] each, and the `second_branch` tokens. Ids that
    must match nothing are -2 (queries) and -3 (keys)."""
    second = second_branch(segment_BxT, branch_BxT)
    real = (segment_BxT >= 0) & (branch_BxT >= 0)
    first_call = (jnp.where(real & ~second, segment_BxT, -2), jnp.where(real & ~second, segment_BxT, -3))
    second_call = (jnp.where(second, segment_BxT, -2),
                   jnp.where(real & ((branch_BxT == 0) | second), segment_BxT, -3))
    return first_call, second_call, second


@functools.lru_cache(maxsize=None)
def _splash_kernel(length: int, group: int, block: int, softcap: float | None, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    mask = splash.MultiHeadMask([splash.CausalMask((length, length))] * group)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # one kernel per key/value head, its G query heads sharing the keys (multi-query attention). Its block
    # tables become arrays: made as constants, not as tracers of the first trace (the kernel is cached)
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mqa_single_device(mask, block_sizes=sizes, attn_logits_soft_cap=softcap,
                                                    interpret=interpret)


def splash_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, segment_BxT, branch_BxT, *, scale, softcap=None,
                     block: int | None = None, interpret: bool | None = None) -> jax.Array:
    """Self-attention by the splash kernel under a TokenMask's vectors: [B, T, H, E]. `interpret`: Pallas's
    interpreter (default: when the step does not run on a TPU)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, h, e = q_BxTxHxE.shape
    kv = k_BxTxKxE.shape[2]
    if not block or block % 128:  # the multiple of 128 up to SPLASH_BLOCK that pads the row least
        block = min(range(SPLASH_BLOCK, 0, -128), key=lambda size: -(-t // size) * size)
    pad = -t % block
    if pad:  # whole blocks; the padding matches nothing (segment -1)
        def widen(x, value=0):
            return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=value)
        q_BxTxHxE, k_BxTxKxE, v_BxTxKxE = map(widen, (q_BxTxHxE, k_BxTxKxE, v_BxTxKxE))
        segment_BxT, branch_BxT = widen(segment_BxT, -1), widen(branch_BxT, -1)
    interpret = platform() != "tpu" if interpret is None else interpret
    kernel = _splash_kernel(t + pad, h // kv, block, softcap, interpret)
    # the kernel takes scaled queries, [K, G, T, E] per row, keys [K, T, E]
    q = (q_BxTxHxE.astype(jnp.promote_types(q_BxTxHxE.dtype, jnp.float32)) * scale).astype(q_BxTxHxE.dtype)
    q_BxKxGxTxE = q.reshape(b, t + pad, kv, h // kv, e).transpose(0, 2, 3, 1, 4)
    k_BxKxTxE, v_BxKxTxE = k_BxTxKxE.transpose(0, 2, 1, 3), v_BxTxKxE.transpose(0, 2, 1, 3)

    def one_row(q, k, v, q_ids, kv_ids):
        ids = SegmentIds(q=q_ids, kv=kv_ids)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=ids))(q, k, v)

    def call(ids):
        return per_device_heads(jax.vmap(one_row), (q_BxKxGxTxE, k_BxKxTxE, v_BxKxTxE), ids)

    first_call, second_call, second_BxT = splash_ids(segment_BxT, branch_BxT)
    out = call(first_call)
    out = jax.lax.cond(second_BxT.any(),
                       lambda: jnp.where(second_BxT[:, None, None, :, None], call(second_call), out),
                       lambda: out)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t + pad, h, e)[:, :t]


def per_device_heads(f, heads, ids):
    """`f(*heads, *ids)` per device under the step's mesh (`jax.shard_map`: a Pallas kernel is one device's
    program): `heads` [B, K, ...] split by rows over data x fsdp and by K over tensor where they divide,
    `ids` [B, T] by rows; plain `f` without a mesh."""
    mesh = activation_mesh()
    if mesh is None or mesh.size == 1:
        return f(*heads, *ids)
    rows = ROW_AXES if heads[0].shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0 else None
    split = "tensor" if heads[1].shape[1] % mesh.shape["tensor"] == 0 else None
    head_spec = PartitionSpec(rows, split)
    return jax.shard_map(f, mesh=mesh, in_specs=(head_spec,) * len(heads) + (PartitionSpec(rows),) * len(ids),
                         out_specs=head_spec, check_vma=False)(*heads, *ids)


# ----------------------------------------------------------------------------------------------------- cuDNN
def cudnn_expressible(dtype, head_dim: int, softcap, scale, gpu: bool) -> bool:
    """Whether cuDNN's fused attention can take a layer at all (the rows are checked per batch): no soft cap,
    a scale known when tracing, head dim a multiple of 8 up to 128, and on a GPU bfloat16 or float16
    (elsewhere the call's XLA implementation runs, in any dtype)."""
    shapes = head_dim % 8 == 0 and head_dim <= 128
    return softcap is None and isinstance(scale, (int, float)) and shapes and (
        not gpu or jnp.dtype(dtype) in CUDNN_DTYPES)


def sequence_lengths(segment_BxT: jax.Array, branch_BxT: jax.Array, positions_BxT: jax.Array | None = None, *,
                     check_positions: bool = False) -> tuple[jax.Array, jax.Array]:
    """Per row, int32 [B]: how many real tokens, and whether the row is one causal sequence from index 0 (real
    tokens first, one segment, at most one completion branch; with `check_positions`, positions equal to the
    indices, as cuDNN's sliding window counts indices): all cuDNN's lengths can say."""
    real = (segment_BxT >= 0) & (branch_BxT >= 0)
    index = jnp.arange(real.shape[1])
    lengths = real.sum(axis=1).astype(jnp.int32)
    prefix = (real == (index < lengths[:, None])).all(axis=1)
    one_segment = jnp.where(real, segment_BxT == segment_BxT[:, :1], True).all(axis=1)
    one_branch = ~((real & (branch_BxT == 1)).any(axis=1) & (real & (branch_BxT == 2)).any(axis=1))
    fits = prefix & one_segment & one_branch
    if check_positions:
        fits &= jnp.where(real, positions_BxT == index, True).all(axis=1)
    return lengths, fits


def fused_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, lengths_B, *, scale, window=None,
                    implementation: str = "cudnn") -> jax.Array:
    """Causal attention over each row's first `lengths` tokens through `jax.nn.dot_product_attention`
    (`implementation` "cudnn" on a GPU; "xla", the same call's reference, tests the translation on the CPU).
    Padding queries' outputs are zero."""
    return jax.nn.dot_product_attention(
        q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, scale=float(scale),
        is_causal=True, query_seq_lengths=lengths_B, key_value_seq_lengths=lengths_B,
        local_window_size=None if window is None else (window - 1, 0), implementation=implementation)
