"""Building blocks shared by the model families: parameters with logical axis names, linears, embeddings,
norms, activations, self-attention and the gated MLP.

Every parameter carries logical axis names (`out_sharding` metadata) such as ("embed", "mlp"); `sharding.py`
maps them to mesh axes. Parameters are created without eager sharding, so a model can be built abstractly
with `nnx.eval_shape` and then filled from a checkpoint straight into its sharding.

Shapes in names: B batch, T query length, S key length, D model width, H query heads, K key/value heads,
G = H // K query heads per key/value head, E head dim, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import CheckpointError
from .attention import TokenMask, eager_attention, self_attention, wide
from .cache import LayerCache, sliding_window_mask
from .rope import apply_rope


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
