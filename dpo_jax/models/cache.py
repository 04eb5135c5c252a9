"""What a forward attends over: its mask and positions, and generation's KV cache (a TokenMask without a
cache; with one, the [B, T, S] mask over the cache's slots).

Shapes in names as in layers.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .attention import TokenMask


def default_positions(attention_mask_BxT: "jax.Array | TokenMask | None", batch: int, length: int) -> jax.Array:
    """Position ids that count only real tokens, so left padding does not shift a sequence's positions.

    With no mask, or a TokenMask, positions are 0..T-1 (pass `positions` for packed or prompt-sharing rows).
    """
    if attention_mask_BxT is None or isinstance(attention_mask_BxT, TokenMask):
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return jnp.maximum(jnp.cumsum(attention_mask_BxT.astype(jnp.int32), axis=-1) - 1, 0)


def mask_and_positions(attention_mask: "jax.Array | TokenMask | None", positions: jax.Array | None, batch: int,
                       length: int, cache: "KVCache | None" = None) -> tuple["TokenMask | jax.Array", jax.Array]:
    """A forward's attention mask and positions (see default_positions). Without a cache, a TokenMask:
    `attention_mask` is one already, or None (all tokens real), or a [B, T] padding mask (1 = real token).
    With a cache, the boolean [B, T, S] mask over the cache's slots; `attention_mask` can then only be a
    [B, T] padding mask; give `positions` for tokens after the prompt."""
    if positions is None:
        positions = default_positions(attention_mask, batch, length)
    if cache is not None:
        return cache.extend(positions, attention_mask), positions
    if isinstance(attention_mask, TokenMask):
        return attention_mask, positions
    return TokenMask.from_padding(attention_mask, batch, length), positions


def sliding_window_mask(mask_BxTxS: jax.Array, positions_BxT: jax.Array, window: int | None,
                        key_positions_BxS: jax.Array | None = None) -> jax.Array:
    """Restrict attention to keys less than `window` positions back (key > query - window), as transformers.
    The keys' positions are the queries' unless given (a KV cache's)."""
    if window is None:
        return mask_BxTxS
    keys = positions_BxT if key_positions_BxS is None else key_positions_BxS
    distance = positions_BxT[:, :, None] - keys[:, None, :]
    return mask_BxTxS & (distance < window)


@jax.tree_util.register_pytree_node_class
class KVCache:
    """Every attention layer's keys and values for generation, in `length` slots per row: [L, B, S, K, E] arrays
    (S = `length`), scanned with the stacked blocks (`run_blocks`).

    A model called with a cache runs its new tokens in the next free slots: `extend` records their positions
    and gives their attention mask (a key is visible when it is a real token in an earlier or the same slot),
    each layer writes its keys and values through its `LayerCache` and attends over all slots, and `advance`
    moves the free slot on. The arrays are made by the first forward (the prompt's), each layer's in its scan
    step; later forwards update them in place, layer by layer. Left-padded prompts keep their padding slots as
    invisible keys. A pytree, so it can be the carry of a `lax.while_loop`; its methods update it in place
    while tracing.
    """

    def __init__(self, keys_LxBxSxKxE, values_LxBxSxKxE, key_positions_BxS, key_valid_BxS, index):
        self.keys, self.values = keys_LxBxSxKxE, values_LxBxSxKxE  # None until the first forward
        self.key_positions, self.key_valid, self.index = key_positions_BxS, key_valid_BxS, index

    @classmethod
    def empty(cls, batch: int, length: int) -> "KVCache":
        return cls(None, None, jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length), bool),
                   jnp.zeros((), jnp.int32))

    def tree_flatten(self):
        return (self.keys, self.values, self.key_positions, self.key_valid, self.index), None

    @classmethod
    def tree_unflatten(cls, _, children):
        return cls(*children)

    def extend(self, positions_BxT: jax.Array, valid_BxT: jax.Array | None) -> jax.Array:
        """Record the new tokens' positions; their [B, T, S] mask (True = may attend)."""
        b, t = positions_BxT.shape
        valid = jnp.ones((b, t), bool) if valid_BxT is None else valid_BxT.astype(bool)
        start = (0, self.index)
        self.key_positions = jax.lax.dynamic_update_slice(self.key_positions, positions_BxT.astype(jnp.int32), start)
        self.key_valid = jax.lax.dynamic_update_slice(self.key_valid, valid, start)
        slots = jnp.arange(self.key_valid.shape[1])
        earlier = slots[None, :] <= (self.index + jnp.arange(t))[:, None]
        return self.key_valid[:, None, :] & earlier[None]

    def advance(self, tokens: int) -> None:
        self.index = self.index + tokens


class LayerCache:
    """One layer's part of a `KVCache`, inside the scan over the blocks. `write` stores the layer's new keys and
    values in the next free slots and gives all of its keys and values [B, S, K, E]. Given the stacked arrays and
    the layer index, it writes into them (in place: they are the scan's carry); without (the first forward) it
    makes the layer's arrays, which the scan stacks."""

    def __init__(self, cache: KVCache, layer: jax.Array | None = None, keys_LxBxSxKxE=None, values_LxBxSxKxE=None):
        self.key_positions, self.index, self.length = cache.key_positions, cache.index, cache.key_valid.shape[1]
        self.layer, self.keys, self.values = layer, keys_LxBxSxKxE, values_LxBxSxKxE

    def write(self, k_BxTxKxE: jax.Array, v_BxTxKxE: jax.Array) -> tuple[jax.Array, jax.Array]:
        if self.layer is None:
            b, _, heads, dim = k_BxTxKxE.shape
            self.keys = jax.lax.dynamic_update_slice(
                jnp.zeros((b, self.length, heads, dim), k_BxTxKxE.dtype), k_BxTxKxE, (0, self.index, 0, 0))
            self.values = jax.lax.dynamic_update_slice(
                jnp.zeros((b, self.length, heads, dim), v_BxTxKxE.dtype), v_BxTxKxE, (0, self.index, 0, 0))
            return self.keys, self.values
        start = (self.layer, 0, self.index, 0, 0)
        self.keys = jax.lax.dynamic_update_slice(self.keys, k_BxTxKxE[None].astype(self.keys.dtype), start)
        self.values = jax.lax.dynamic_update_slice(self.values, v_BxTxKxE[None].astype(self.values.dtype), start)
        return (jax.lax.dynamic_index_in_dim(self.keys, self.layer, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.values, self.layer, keepdims=False))
