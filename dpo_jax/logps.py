"""Per-token log-probabilities of the target tokens, without a float32 [N, T, V] log-softmax for the batch.

The output head and the log-softmax run over the sequence in chunks of C positions (`jax.lax.map`), each
chunk under `jax.checkpoint`, so the forward pass holds one chunk's [N, C, V] logits at a time and the
backward pass recomputes them chunk by chunk instead of keeping them all. Everything after the head's matmul
is float32, whatever the compute dtype.

The log-prob of token t is read from the logits at t - 1, and only where `completion_mask[t]` is 1 (as TRL's
`completion_mask[..., 1:]`): a completion's first token is not counted when the prompt is empty.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

CHUNK_BYTES = 256 * 2**20  # float32 logits held per chunk, summed over the rows of the batch


def chunk_length(length: int, rows: int, vocab: int, budget: int = CHUNK_BYTES) -> int:
    """The largest divisor of `length` whose [rows, C, vocab] float32 logits fit in `budget` bytes (at least 1)."""
    limit = max(1, budget // (4 * rows * vocab))
    return max(c for c in range(1, length + 1) if length % c == 0 and (c <= limit or c == 1))


def sequence_logps(model, input_ids_NxT: jax.Array, attention_mask_NxT: jax.Array,
                   completion_mask_NxT: jax.Array, positions_NxT: jax.Array,
                   chunk: int | None = None) -> dict[str, jax.Array]:
    """Per sequence, float32 [N]: `logps` (sum of completion-token log-probs), `tokens` (how many), and
    `logit_sum` (sum over those tokens of the mean logit over the vocabulary, for TRL's logits/* metrics)."""
    n, t = input_ids_NxT.shape
    hidden_NxTxD = model.hidden_states(input_ids_NxT, attention_mask_NxT, positions_NxT)
    targets_NxT = jnp.roll(input_ids_NxT, -1, axis=1)  # position t predicts token t + 1
    wide = jnp.promote_types(hidden_NxTxD.dtype, jnp.float32)  # float32 (float64 in the gradient tests)
    mask_NxT = jnp.roll(completion_mask_NxT, -1, axis=1).at[:, -1].set(0).astype(wide)
    vocab = model.config.vocab_size
    c = chunk or chunk_length(t, n, vocab)
    k = t // c

    @jax.checkpoint
    def head(hidden_NxCxD, targets_NxC):
        logits_NxCxV = model.logits(hidden_NxCxD).astype(wide)
        target_NxC = jnp.take_along_axis(logits_NxCxV, targets_NxC[..., None], axis=-1)[..., 0]
        return target_NxC - jax.nn.logsumexp(logits_NxCxV, axis=-1), logits_NxCxV.mean(axis=-1)

    chunks_KxNxCxD = hidden_NxTxD.reshape(n, k, c, -1).swapaxes(0, 1)
    token_logp, mean_logit = jax.lax.map(lambda xs: head(*xs),
                                         (chunks_KxNxCxD, targets_NxT.reshape(n, k, c).swapaxes(0, 1)))
    token_logp_NxT = token_logp.swapaxes(0, 1).reshape(n, t)
    mean_logit_NxT = mean_logit.swapaxes(0, 1).reshape(n, t)
    return {"logps": (token_logp_NxT * mask_NxT).sum(-1), "tokens": mask_NxT.sum(-1),
            "logit_sum": (mean_logit_NxT * mask_NxT).sum(-1)}
