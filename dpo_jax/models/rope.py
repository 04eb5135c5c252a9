"""Rotary position embeddings: the inverse frequencies of a transformers `rope_parameters` dict, and the rotation.

Shapes in names as in layers.py.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ..errors import CheckpointError


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
