"""Per-token log-probabilities of the target tokens, without a float32 [N, T, V] log-softmax for the batch.

The head runs only at the positions whose next token is a completion target: each row's targets are gathered
to its front and the head runs over the sequence in chunks (`jax.lax.map`), skipping the chunks past the
longest row's targets. On the CPU (NO_SKIP_PLATFORMS), where a skip costs more than it saves, the sequence is
not cut into chunks for skipping, only as memory needs. When one device's float32 logits would exceed
KEEP_BYTES, each chunk of C positions runs under `jax.checkpoint`, so the forward pass holds one chunk's
[N, C, V] logits at a time and the backward pass recomputes them chunk by chunk; below it the chunks' logits
are kept (faster). Chunks are sized from one device's rows and vocabulary; on a mesh each device runs the loop
over its own rows, its shard of the head's weight gathered once for all chunks (`per_device_rows`), so the
weight's gradient is reduced once (a reduce-scatter). Everything after the head's matmul is float32, whatever
the compute dtype.

The log-prob of token t is read from the logits at its source position (batching.py's `source`: t - 1, or for
prompt-sharing rows the prompt's last position for the first rejected token), and only for completion tokens
that have one (as TRL's `completion_mask[..., 1:]`: a completion's first token is not counted when the prompt
is empty). The per-pair sums are segment sums over (pair, branch), whatever the rows' layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .models.attention import TokenMask
from .sharding import constrain_rows, per_device_rows, platform, rows_per_device, vocab_per_device

# float32 logits held per chunk on one device, summed over its rows.
CHUNK_BYTES = 512 * 2**20
KEEP_BYTES = 2**30  # one device's float32 logits up to this size are kept, not chunked and recomputed
MIN_CHUNKS = 4  # sequences of MIN_CHUNKS x MIN_CHUNK_LENGTH positions or more run the head in this many chunks at
MIN_CHUNK_LENGTH = 32  # least, so that the chunks past every row's targets (prompts, padding) can be skipped
# Platforms where the skip (a `lax.cond` per chunk) costs more than the logits it saves. Measured on XLA:CPU
# (SmolLM2, `dpo-jax bench`, 2 cores): 5.4 s per step with the skipping loop, 4.3 s with the same 4 chunks and
# no cond, 3.9 s in one piece. There the head runs in as few chunks as memory allows, each computed; a chunk
# past every row's targets is still skipped when memory makes several.
NO_SKIP_PLATFORMS = ("cpu",)


def chunk_length(length: int, rows: int, vocab: int, budget: int = CHUNK_BYTES) -> int:
    """Positions per chunk: as many as keep [rows, C, vocab] float32 logits within `budget` bytes."""
    return max(1, min(length, budget // (4 * rows * vocab)))


def head_chunks(length: int, rows: int, vocab: int) -> tuple[int, bool]:
    """(positions per chunk, whether chunks are recomputed in the backward pass) for `rows` x `vocab` logits per
    device: the whole sequence in one piece, kept for the backward pass, when its float32 logits fit in
    KEEP_BYTES (recomputing them costs a seventh of a small model's backward pass); else CHUNK_BYTES chunks,
    recomputed. Sized from one device's share, so that adding devices does not shrink the chunks."""
    if 4 * rows * length * vocab <= KEEP_BYTES:
        return length, False
    return chunk_length(length, rows, vocab), True


def batch_logps(model, batch: dict, pairs: int, chunk: int | None = None,
                attn_implementation: str = "auto") -> dict[str, jax.Array]:
    """Per pair, float32 [pairs, 2] (chosen, rejected), for a batch of batching.py's type (any layout):
    `logps` (sum of the target tokens' log-probs), `tokens` (how many targets), `logit_sum` (sum over the
    targets of the mean logit over the vocabulary, for TRL's logits/* metrics) and `length` (completion tokens,
    as TRL's completion_mask.sum). The sums are segment sums over (pair, branch). `attn_implementation`: see
    models/attention.py."""
    ids_RxL, segment_RxL, branch_RxL, source_RxL = (batch[k] for k in ("input_ids", "segment", "branch", "source"))
    hidden_RxLxD = model.hidden_states(ids_RxL, TokenMask(segment_RxL, branch_RxL), batch["position_ids"],
                                       attn_implementation=attn_implementation)
    valid_RxL = source_RxL >= 0
    logp, mean_logit = _target_logps(model, hidden_RxLxD, source_RxL, ids_RxL, valid_RxL, chunk)
    completion_RxL = (segment_RxL >= 0) & (branch_RxL > 0)
    slot_RxL = jnp.where(completion_RxL, 2 * segment_RxL + branch_RxL - 1, 2 * pairs)  # 2 * pairs: nowhere

    def per_pair(values_RxL):
        sums = jax.ops.segment_sum(values_RxL.reshape(-1), slot_RxL.reshape(-1), num_segments=2 * pairs + 1)
        return sums[:-1].reshape(pairs, 2)

    return {"logps": per_pair(logp), "tokens": per_pair(valid_RxL.astype(logp.dtype)),
            "logit_sum": per_pair(mean_logit), "length": per_pair(completion_RxL.astype(logp.dtype))}


def _target_logps(model, hidden_NxTxD, source_NxT, targets_NxT, valid_NxT, chunk):
    """log p(targets[t]) and the mean logit, both from the logits at position source[t], where `valid`; [N, T]
    each, 0 elsewhere.

    The head runs only where there are targets: each row's target positions are gathered to its front, the
    sequence is cut into chunks (at least MIN_CHUNKS, when T >= MIN_CHUNKS x MIN_CHUNK_LENGTH), and the chunks
    past the longest row's targets are skipped (`lax.cond` on the batch's largest target count: prompt and
    padding positions cost no logits, but for a chunk's rounding and rows shorter than the longest). On the CPU
    (NO_SKIP_PLATFORMS) the chunks are only as many as memory needs; when there are several, they still skip.
    On a mesh each device runs the loop over its own rows (`per_device_rows`), so the head's weight gradient is
    reduced once per forward and backward pass (a reduce-scatter), not all-reduced once per chunk.
    """
    n, t = targets_NxT.shape
    wide = jnp.promote_types(hidden_NxTxD.dtype, jnp.float32)  # float32 (float64 in the gradient tests)
    order_NxT = jnp.argsort(~valid_NxT, axis=1, stable=True)  # target positions first, in order
    source_NxT, targets_NxT = (jnp.take_along_axis(x, order_NxT, axis=1) for x in (source_NxT, targets_NxT))
    hidden_NxTxD = constrain_rows(jnp.take_along_axis(hidden_NxTxD, jnp.maximum(source_NxT, 0)[..., None], axis=1))
    c, recompute = (chunk, True) if chunk else head_chunks(t, rows_per_device(n),
                                                           vocab_per_device(model.config.vocab_size))
    skip = platform() not in NO_SKIP_PLATFORMS
    c = min(c, -(-t // MIN_CHUNKS) if skip and t >= MIN_CHUNKS * MIN_CHUNK_LENGTH else t)
    k = -(-t // c)
    if k * c != t:  # pad the sequence to whole chunks; the padded positions are dropped below
        hidden_NxTxD = jnp.pad(hidden_NxTxD, ((0, 0), (0, k * c - t), (0, 0)))
        targets_NxT = jnp.pad(targets_NxT, ((0, 0), (0, k * c - t)))

    def head(hidden_NxCxD, targets_NxC, weight):
        logits_NxCxV = constrain_rows(model.logits(hidden_NxCxD, weight).astype(wide), None, "tensor")
        target_NxC = jnp.take_along_axis(logits_NxCxV, targets_NxC[..., None], axis=-1)[..., 0]
        return target_NxC - jax.nn.logsumexp(logits_NxCxV, axis=-1), logits_NxCxV.mean(axis=-1)

    def nothing(hidden_NxCxD, targets_NxC, weight):
        none = jnp.zeros_like(targets_NxC, wide)  # like its input: per device inside `per_device_rows`
        return none, none

    # The cond runs inside a checkpoint: inside a scan, a cond's residuals are stacked per iteration, the head's
    # weight among them (an 8B model's head 64 times over), while a checkpoint's residuals are its inputs, which
    # the scan keeps once as loop-invariant. Kept chunks save everything (no recomputation), as without the cond.
    @functools.partial(jax.checkpoint, policy=None if recompute else jax.checkpoint_policies.everything_saveable)
    def chunk_or_skip(j, hidden_NxCxD, targets_NxC, needed, weight):
        if k == 1:
            return head(hidden_NxCxD, targets_NxC, weight)
        return jax.lax.cond(j * c < needed, head, nothing, hidden_NxCxD, targets_NxC, weight)

    # the batch's largest target count: chunks past it are skipped. The same on every device (a device's own
    # would skip more, but its branches would then differ, and XLA may place collectives inside them)
    needed = valid_NxT.sum(-1).max()

    def all_chunks(hidden_KxNxCxD, targets_KxNxC, weight, needed):
        return jax.lax.map(lambda xs: chunk_or_skip(*xs, needed, weight),
                           (jnp.arange(k), hidden_KxNxCxD, targets_KxNxC))

    # the head's weight gathered over fsdp and cast to the compute dtype once, before the loop over chunks (an
    # optimization barrier on it would change nothing on TPU and cost XLA:CPU 6% of the bench's step)
    chunks = (hidden_NxTxD.reshape(n, k, c, -1).swapaxes(0, 1), targets_NxT.reshape(n, k, c).swapaxes(0, 1))
    token_logp, mean_logit = per_device_rows(all_chunks, chunks, model.output_head(), hidden_NxTxD.dtype,
                                             (needed,))
    back_NxT = jnp.argsort(order_NxT, axis=1)  # each position's place in the gathered order
    keep = valid_NxT.astype(wide)
    return tuple(jnp.take_along_axis(x.swapaxes(0, 1).reshape(n, k * c)[:, :t], back_NxT, axis=1) * keep
                 for x in (token_logp, mean_logit))
