"""Building blocks shared by the model families: parameters with logical axis names, norms, RoPE, attention.

Every parameter carries logical axis names (`out_sharding` metadata) such as ("embed", "mlp"); `sharding.py`
maps them to mesh axes. Parameters are created without eager sharding, so a model can be built abstractly
with `nnx.eval_shape` and then filled from a checkpoint straight into its sharding.

Shapes in names: B batch, T query length, S key length, D model width, H query heads, K key/value heads,
G = H // K query heads per key/value head, E head dim, V vocabulary.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..errors import CheckpointError
from ..sharding import constrain_rows
from .attention import NO_WINDOW, TokenMask, eager_attention, self_attention, wide


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], dtype, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter annotated with logical axis names, created unsharded (placement is the loader's job)."""
    return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=axes, eager_sharding=False)


class LoRAKey(nnx.Variable):
    """Raw PRNG key data (uint32 [2]) of a LoRA adapter's dropout; all zeros means no dropout (evaluation and
    the reference). The step writes a fresh key per micro-batch (lora.dropout_keys)."""


class Linear(nnx.Module):
    """y = x @ kernel (+ bias); kernel is [in, out] as in Flax (PyTorch's nn.Linear stores [out, in])."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], *, bias: bool,
                 dtype, param_dtype, rngs: nnx.Rngs):
        self.kernel = param(rngs, nnx.initializers.lecun_normal(), (d_in, d_out), param_dtype, axes)
        self.bias = param(rngs, nnx.initializers.zeros, (d_out,), param_dtype, axes[1:]) if bias else None
        self.dtype = dtype
        self.lora_a = nnx.data(None)  # LoRA adapters [in, r] and [r, out], added by lora.apply_lora
        self.lora_b = nnx.data(None)
        self.lora_key = nnx.data(None)
        self.lora_scale = 0.0
        self.lora_dropout = 0.0

    def __call__(self, x: jax.Array, *, preferred_element_type=None, kernel: jax.Array | None = None) -> jax.Array:
        """`preferred_element_type`: the product's accumulation and output dtype (the output head: float32, so
        bfloat16 logits are not rounded before the softmax). `kernel`: this layer's kernel as the caller laid it
        out (the output head gathered once for all its chunks, logps.py)."""
        x = x.astype(self.dtype)
        kernel = self.weight() if kernel is None else kernel
        y = jnp.dot(x, kernel.astype(self.dtype), preferred_element_type=preferred_element_type)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        if self.lora_a is not None:
            xa = x
            if self.lora_dropout and self.lora_key is not None:  # dropout on the adapter's input, as PEFT
                data = self.lora_key[...]
                keep = jax.random.bernoulli(jax.random.wrap_key_data(data), 1 - self.lora_dropout, x.shape)
                dropped = jnp.where(keep, x / (1 - self.lora_dropout), 0).astype(x.dtype)
                xa = jnp.where(jnp.any(data != 0), dropped, x)
            y = y + self.lora_scale * jnp.dot(jnp.dot(xa, self.lora_a[...].astype(self.dtype)),
                                              self.lora_b[...].astype(self.dtype))
        return y

    def weight(self) -> jax.Array:
        """The kernel [in, out] as the matmul uses it (a quantised layer dequantises here: quant.py)."""
        return self.kernel[...]

    @property
    def layout(self) -> nnx.Variable:
        """The variable shaped and sharded like the kernel [.., in, out] (LoRA places its adapters by it)."""
        return self.kernel

    @property
    def weight_dtype(self):
        """The dtype the kernel is stored in (a quantised layer: its scales'); LoRA adapters take it."""
        return self.kernel.get_value().dtype

    def float_kernel(self) -> jax.Array:
        """The kernel's value as stored (a quantised layer: dequantised to float32)."""
        return self.kernel.get_value()


class Embed(nnx.Module):
    """Token (or position) embedding table [V, D]; `attend` gives tied output logits."""

    def __init__(self, num: int, dim: int, axes: tuple[str, str], *, dtype, param_dtype, rngs: nnx.Rngs):
        self.embedding = param(rngs, nnx.initializers.normal(0.02), (num, dim), param_dtype, axes)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Out-of-range ids (a padding id past the vocabulary, a position past GPT-2's table) are clipped:
        # jnp.take would give NaN rows that spread through masked attention as 0 * NaN. Real tokens are
        # validated by the data pipeline; a jitted model cannot raise.
        return jnp.take(self.embedding[...], ids, axis=0, mode="clip").astype(self.dtype)

    def attend(self, x_BxTxD: jax.Array, embedding: jax.Array | None = None) -> jax.Array:
        """Tied output logits, accumulated and returned in float32 (at least) whatever the compute dtype;
        `embedding` as the caller laid it out (see Linear)."""
        embedding = self.embedding[...] if embedding is None else embedding
        return jnp.dot(x_BxTxD.astype(self.dtype), embedding.astype(self.dtype).T,
                       preferred_element_type=wide(self.dtype))


class RMSNorm(nnx.Module):
    """RMS norm computed in float32. `offset=1.0` is Gemma's `x * (1 + w)` (its weights are stored minus one)."""

    def __init__(self, dim: int, eps: float, *, offset: float = 0.0, param_dtype, rngs: nnx.Rngs):
        init = nnx.initializers.zeros if offset else nnx.initializers.ones
        self.weight = param(rngs, init, (dim,), param_dtype, ("norm",))
        self.eps = eps
        self.offset = offset

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(wide(x.dtype))
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            # Gemma scales in float32, then casts.
            return (normed * (self.offset + self.weight[...].astype(x32.dtype))).astype(x.dtype)
        # Llama casts back first, then scales in the weight's dtype (transformers' LlamaRMSNorm).
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, computed in float32 (GPT-2)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("norm",))
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), param_dtype, ("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(wide(x.dtype))
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(x32.dtype) + self.bias[...].astype(x32.dtype)).astype(x.dtype)


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise CheckpointError(f"activation {name!r} is not supported; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


# ----------------------------------------------------------------------------------------------------------
# Rotary position embeddings


def rope_inv_freq(head_dim: int, params: dict, model_type: str) -> tuple[tuple[float, ...], float]:
    """Inverse frequencies [E/2] and the attention scaling for a transformers `rope_parameters` dict.

    Supports rope_type default, linear and llama3 (Llama 3.1+ long-context scaling). Computed in float32
    as transformers does, with the power correctly rounded, so the frequencies agree to the bit with a
    correctly rounded float32 pow (rounding the whole table from float64 instead moves logits by ~3e-5 at
    position 4096). Returned as Python floats to live in the static model config.
    """
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", "linear", "llama3"):
        raise CheckpointError(
            f"{model_type}: rope_type {rope_type!r} is not supported yet; supported: default, linear, llama3")
    if rope_type != "default" and params.get("partial_rotary_factor", 1.0) != 1.0:
        # (transformers' default RoPE ignores the factor in these families, and so do we.)
        raise CheckpointError(f"{model_type}: partial_rotary_factor with rope_type {rope_type!r} is not supported")
    theta = np.float32(params["rope_theta"])
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    # theta ** exponent correctly rounded to float32 (through float64): float32 pow itself differs by an ulp
    # between numpy and torch, and between CPU kernels (torch's AVX2 and AVX-512 paths disagree), while the
    # correctly rounded value is one table everywhere
    inv_freq = np.float32(1.0) / (np.float64(theta) ** exponents.astype(np.float64)).astype(np.float32)
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(params["factor"])
    elif rope_type == "llama3":
        factor = np.float32(params["factor"])
        low, high = np.float32(params["low_freq_factor"]), np.float32(params["high_freq_factor"])
        old_context = np.float32(params["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_context / low, old_context / high
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return tuple(float(f) for f in inv_freq.astype(np.float32)), 1.0


def apply_rope(x_BxTxNxE: jax.Array, positions_BxT: jax.Array, inv_freq: tuple[float, ...]) -> jax.Array:
    """Rotate-half RoPE over the whole head (transformers' layout: dims i and i + E/2 form a pair)."""
    freqs_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    emb = jnp.concatenate([freqs_BxTxF, freqs_BxTxF], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(emb).astype(x_BxTxNxE.dtype), jnp.sin(emb).astype(x_BxTxNxE.dtype)
    half = x_BxTxNxE.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxTxNxE[..., half:], x_BxTxNxE[..., :half]], axis=-1)
    return x_BxTxNxE * cos + rotated * sin


# ----------------------------------------------------------------------------------------------------------
# Masks and attention


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


# ----------------------------------------------------------------------------------------------------------
# Blocks shared by the Llama and Gemma families


class SelfAttention(nnx.Module):
    """Grouped-query self-attention with RoPE; optional q/k bias, q/k RMSNorm, score soft-capping, window.
    What may differ between layers (RoPE frequencies, window) comes with the call, so every layer has one
    structure and the stacked blocks run in one scan."""

    def __init__(self, *, hidden: int, heads: int, kv_heads: int, head_dim: int, qkv_bias: bool, o_bias: bool,
                 qk_norm: bool, norm_eps: float, norm_offset: float, scale: float, softcap: float | None,
                 dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(hidden, heads * head_dim, ("embed", "q_heads"), bias=qkv_bias, **kw)
        self.k_proj = Linear(hidden, kv_heads * head_dim, ("embed", "kv_heads"), bias=qkv_bias, **kw)
        self.v_proj = Linear(hidden, kv_heads * head_dim, ("embed", "kv_heads"), bias=qkv_bias, **kw)
        self.o_proj = Linear(heads * head_dim, hidden, ("q_heads", "embed"), bias=o_bias, **kw)
        norm = dict(offset=norm_offset, param_dtype=param_dtype, rngs=rngs)
        self.q_norm = RMSNorm(head_dim, norm_eps, **norm) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps, **norm) if qk_norm else None
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scale, self.softcap = scale, softcap

    def __call__(self, x_BxTxD: jax.Array, mask: "TokenMask | jax.Array", positions_BxT: jax.Array,
                 cache: "LayerCache | None" = None, *, inv_freq, window=None,
                 implementation: str = "auto") -> jax.Array:
        """`mask`: a TokenMask, or with a cache its [B, T, S] mask; `inv_freq`: RoPE inverse frequencies
        [E/2]; `window`: the sliding window (None: full attention); `implementation`: see attention.py."""
        b, t, _ = x_BxTxD.shape
        q = self.q_proj(x_BxTxD).reshape(b, t, self.heads, self.head_dim)
        k = self.k_proj(x_BxTxD).reshape(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x_BxTxD).reshape(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions_BxT, inv_freq)
        k = apply_rope(k, positions_BxT, inv_freq)
        if cache is not None:  # attend over every cached key: S = the cache's length
            k, v = cache.write(k, v)
            mask = sliding_window_mask(mask, positions_BxT, window, cache.key_positions)
            out = eager_attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)
        else:
            out = self_attention(q, k, v, mask, positions_BxT, scale=self.scale, softcap=self.softcap,
                                 window=window, implementation=implementation)
        return self.o_proj(out.reshape(b, t, self.heads * self.head_dim))


class GatedMLP(nnx.Module):
    """down(act(gate(x)) * up(x)), the SwiGLU / GeGLU feed-forward of Llama, Qwen and Gemma."""

    def __init__(self, hidden: int, inner: int, act: str, *, bias: bool, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(hidden, inner, ("embed", "mlp"), **kw)
        self.up_proj = Linear(hidden, inner, ("embed", "mlp"), **kw)
        self.down_proj = Linear(inner, hidden, ("mlp", "embed"), **kw)
        self.act = activation(act)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------------------------------------
# Stacked blocks

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
