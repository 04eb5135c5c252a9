"""Greedy decoding, the simple way: one jitted full forward per new token over a fixed-size buffer.

It recomputes the whole prefix at every step (no KV cache), which is fine for a few dozen tokens on a
small model and keeps a single compiled shape. The KV-cache sampler for the demo comes later.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_generate(model: nnx.Module, prompt_ids: list[int], max_new_tokens: int,
                    eos_token_id: int | None = None) -> list[int]:
    """The prompt's greedy continuation (new token ids only), stopping after `eos_token_id`."""
    graphdef, state = nnx.split(model)
    length = len(prompt_ids) + max_new_tokens
    buffer = np.zeros((1, length), np.int32)
    buffer[0, : len(prompt_ids)] = prompt_ids

    @jax.jit
    def next_token(state, ids_1xT, position):
        # Causal attention: the zeros after `position` cannot change the logits at `position`.
        logits = nnx.merge(graphdef, state)(ids_1xT)
        return jnp.argmax(logits[0, position])

    new = []
    for position in range(len(prompt_ids) - 1, length - 1):
        token = int(next_token(state, jnp.asarray(buffer), position))
        new.append(token)
        buffer[0, position + 1] = token
        if token == eos_token_id:
            break
    return new
