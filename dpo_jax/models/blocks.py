"""Stacked blocks: a family's decoder blocks held as one module with a leading layer axis, run by one scan over
it (with the KV cache's layers scanned alongside).

Shapes in names as in layers.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..sharding import constrain_rows
from .attention import NO_WINDOW
from .cache import KVCache, LayerCache

LAYERS = "layers"  # the logical axis of stacked blocks' weights (not split over the mesh: see sharding.py)


# What the backward pass of the scan keeps without remat: every matmul's output, while elementwise results
# (norms, activations, softmax, casts) are recomputed from them. A scan materialises every residual it saves
# as a stacked array; unrolled blocks let XLA fuse those cheap producers into the backward instead. Saving
# everything in the scan took 11% more temporaries than the unrolled blocks did, and was slower; this policy
# takes 37% fewer than the unrolled blocks, at their speed within XLA:CPU's noise here (Llama 256 wide, 8 layers,
# 4 pairs x 2 x 256 tokens, float32: 806 MiB unrolled, 893 MiB scanned saving everything, 506 MiB with it).
SAVE_WITHOUT_REMAT = jax.checkpoint_policies.dots_saveable


def stacked(make_block, count: int, rngs: nnx.Rngs) -> nnx.Module:
    """`count` blocks `make_block(rngs)` held as one module whose every weight has a leading layer axis (logical
    name LAYERS), each layer initialised with its own keys. Run it with `run_blocks`."""
    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: LAYERS})
    def make(rngs):
        return make_block(rngs)
    return make(rngs)


def window_values(windows: tuple[int | None, ...]) -> tuple[int | None, ...]:
    """Per-layer sliding windows for `run_blocks`: where some layers slide and others do not, the full-attention
    ones get NO_WINDOW, so that the window is scanned data and not a difference of structure."""
    if len(set(windows)) <= 1:
        return windows
    return tuple(NO_WINDOW if w is None else w for w in windows)


def block_output(block: nnx.Module, x_BxTxD: jax.Array, *args, **kwargs) -> jax.Array:
    """One block's output [B, T, D]: the one place where the scan over the blocks produces one. Its input and
    output are pinned to batch rows (FSDP's layout: rows split over data x fsdp, weights gathered per layer as
    used; see sharding.constrain_rows)."""
    return constrain_rows(block(constrain_rows(x_BxTxD), *args, **kwargs))


def run_blocks(blocks: nnx.Module, x_BxTxD: jax.Array, *args, per_layer: dict[str, tuple] | None = None,
               cache: KVCache | None = None, remat: bool = False, **same) -> jax.Array:
    """Apply stacked blocks (`stacked`) in order: one `jax.lax.scan` over their layer axis, each step a block
    called with `args`, its layer's `cache` part, its `per_layer` values (name -> one value per layer; a
    value the same in every layer is passed as it is, the others become scanned arrays) and the keyword
    arguments `same` (static settings such as the attention implementation).

    With `remat` each step is under `jax.checkpoint`: the backward pass keeps only each block's input and
    recomputes the rest. The scan is what makes XLA keep that promise: blocks checkpointed one after the other
    in straight-line code are often scheduled so that every recomputation lands early and the memory is not
    saved (XLA:CPU). Without `remat` the backward pass keeps the matmuls' outputs (SAVE_WITHOUT_REMAT)."""
    graphdef, state = nnx.split(blocks)
    count = jax.tree.leaves(state)[0].shape[0]
    fixed, scanned = dict(same), {}
    for name, values in (per_layer or {}).items():
        if len(values) != count:
            raise ValueError(f"per_layer {name!r}: {len(values)} values for {count} layers")
        if all(v == values[0] for v in values):
            fixed[name] = values[0]
        else:
            scanned[name] = jnp.asarray(values)

    def step(layer_state, x, layer_values, layer_cache):
        return block_output(nnx.merge(graphdef, layer_state), x, *args, cache=layer_cache, **fixed, **layer_values)

    xs = (state, scanned, jnp.arange(count))
    if cache is None:
        step = jax.checkpoint(step, policy=None if remat else SAVE_WITHOUT_REMAT)
        return jax.lax.scan(lambda x, s: (step(s[0], x, s[1], None), None), x_BxTxD, xs)[0]
    if remat:
        raise ValueError("run_blocks: no rematerialisation with a KV cache (there is no backward pass)")
    if cache.keys is None:  # the first forward: each layer makes its keys and values, the scan stacks them

        def first(x, s):
            view = LayerCache(cache)
            x = step(s[0], x, s[1], view)
            return x, (view.keys, view.values)

        x_BxTxD, (cache.keys, cache.values) = jax.lax.scan(first, x_BxTxD, xs)
        return x_BxTxD

    def later(carry, s):
        x, keys, values = carry
        view = LayerCache(cache, s[2], keys, values)
        x = step(s[0], x, s[1], view)
        return (x, view.keys, view.values), None

    x_BxTxD, cache.keys, cache.values = jax.lax.scan(later, (x_BxTxD, cache.keys, cache.values), xs)[0]
    return x_BxTxD
