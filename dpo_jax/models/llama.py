"""The Llama family: Llama 2/3.x, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm), SmolLM2.

Pre-norm decoder: x + attn(rmsnorm(x)), then x + mlp(rmsnorm(x)); grouped-query attention with RoPE;
SwiGLU feed-forward; tied or untied output head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import wide
from .blocks import run_blocks, stacked, window_values
from .cache import KVCache, mask_and_positions
from .layers import Embed, GatedMLP, Linear, RMSNorm, SelfAttention
from .rope import rope_inv_freq

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")

# What each model_type fixes that its transformers config does not say.
_VARIANTS = {
    "llama": {},
    "mistral": {"qkv_bias": False, "o_bias": False},
    "qwen2": {"qkv_bias": True, "o_bias": False},
    "qwen3": {"qk_norm": True},
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    inv_freq: tuple[float, ...]          # RoPE inverse frequencies, scaling already applied
    hidden_act: str = "silu"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False                # Qwen3: RMSNorm over each head of q and k before RoPE
    tie_word_embeddings: bool = False
    sliding_windows: tuple[int | None, ...] = ()   # per layer; None = full causal attention

    # The transformers config this was built from (JSON), written back by export_pretrained.
    hf_config_json: str = dataclasses.field(default="", compare=False, repr=False)

    @classmethod
    def from_hf(cls, hf) -> "LlamaConfig":
        """From a transformers config of one of MODEL_TYPES."""
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        bias = bool(getattr(hf, "attention_bias", False))
        variant = {"qkv_bias": bias, "o_bias": bias, "qk_norm": False, **_VARIANTS[hf.model_type]}
        window = getattr(hf, "sliding_window", None)
        layer_types = getattr(hf, "layer_types", None)
        if layer_types:
            windows = tuple(window if kind == "sliding_attention" else None for kind in layer_types)
        else:  # Mistral: every layer slides when the config sets a window
            windows = (window,) * hf.num_hidden_layers
        inv_freq, _ = rope_inv_freq(head_dim, hf.rope_parameters, hf.model_type)
        return cls(
            hf_config_json=hf.to_json_string(use_diff=False),
            model_type=hf.model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=hf.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads, head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps, inv_freq=inv_freq, hidden_act=hf.hidden_act,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)), tie_word_embeddings=bool(hf.tie_word_embeddings),
            sliding_windows=windows, **variant)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.self_attn = SelfAttention(
            hidden=cfg.hidden_size, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            qkv_bias=cfg.qkv_bias, o_bias=cfg.o_bias, qk_norm=cfg.qk_norm, norm_eps=cfg.rms_norm_eps,
            norm_offset=0.0, scale=cfg.head_dim ** -0.5, softcap=None, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **norm)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, bias=cfg.mlp_bias,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_BxTxD, mask_BxTxS, positions_BxT, cache=None, **layer):
        """`layer`: this layer's attention settings (SelfAttention's inv_freq and window)."""
        x_BxTxD = x_BxTxD + self.self_attn(self.input_layernorm(x_BxTxD), mask_BxTxS, positions_BxT, cache,
                                           **layer)
        return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))


class LlamaForCausalLM(nnx.Module):
    """`model(input_ids, attention_mask=None, positions=None) -> logits [B, T, V]`.

    `attention_mask` is None, a [B, T] padding mask (1 = real token; combined with the causal mask) or a
    `TokenMask` (attention.py: segments and branches, for packed and prompt-sharing rows). `positions`
    default to counting real tokens only, so left padding does not shift them (transformers counts padding
    unless given `position_ids`).
    """

    def __init__(self, cfg: LlamaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.remat = False  # recompute each block's activations in the backward pass (set by the step)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
        self.layers = stacked(lambda rngs: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                              cfg.num_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, **kw))

    def __call__(self, input_ids_BxT: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None) -> jax.Array:
        return self.logits(self.hidden_states(input_ids_BxT, attention_mask, positions, cache))

    def hidden_states(self, input_ids_BxT, attention_mask=None, positions=None, cache=None, *,
                      attn_implementation: str = "auto") -> jax.Array:
        """The final-norm hidden states [B, T, D], before the output head; `attn_implementation`: see
        attention.py (the KV cache's forwards use eager attention)."""
        b, t = input_ids_BxT.shape
        mask, positions = mask_and_positions(attention_mask, positions, b, t, cache)
        x = self.embed_tokens(input_ids_BxT)
        per_layer = {"inv_freq": (self.config.inv_freq,) * self.config.num_layers,
                     "window": window_values(self.config.sliding_windows)}
        x = run_blocks(self.layers, x, mask, positions, per_layer=per_layer, cache=cache,
                       remat=self.remat and cache is None, implementation=attn_implementation)
        if cache is not None:
            cache.advance(t)
        return self.norm(x)

    def output_head(self) -> nnx.Variable:
        """The output head's weight: the embedding when tied."""
        return self.embed_tokens.embedding if self.lm_head is None else self.lm_head.kernel

    def logits(self, hidden_BxTxD: jax.Array, head: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] in float32; `head`: output_head()'s value as the caller laid it out."""
        if self.lm_head is None:
            return self.embed_tokens.attend(hidden_BxTxD, head)
        return self.lm_head(hidden_BxTxD, preferred_element_type=wide(self.lm_head.dtype), kernel=head)


# transformers' checkpoint names -> our parameter paths; (hf, ours, transpose). `{i}` is a layer index (ours
# have none: the blocks are stacked, layer i is slice i), any other `{x}` a short lowercase word (q, k, v, o,
# gate, up, down). The loader requires every tensor on both sides to be used exactly once.
HF_RULES = (
    ("model.embed_tokens.weight", "embed_tokens.embedding", False),
    ("model.norm.weight", "norm.weight", False),
    ("lm_head.weight", "lm_head.kernel", True),
    ("model.layers.{i}.input_layernorm.weight", "layers.input_layernorm.weight", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.post_attention_layernorm.weight", False),
    ("model.layers.{i}.self_attn.{p}_proj.weight", "layers.self_attn.{p}_proj.kernel", True),
    ("model.layers.{i}.self_attn.{p}_proj.bias", "layers.self_attn.{p}_proj.bias", False),
    ("model.layers.{i}.self_attn.{p}_norm.weight", "layers.self_attn.{p}_norm.weight", False),
    ("model.layers.{i}.mlp.{p}_proj.weight", "layers.mlp.{p}_proj.kernel", True),
    ("model.layers.{i}.mlp.{p}_proj.bias", "layers.mlp.{p}_proj.bias", False),
)
# Buffers some older checkpoints carry; recomputed, not loaded.
HF_IGNORED = (r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",)
EMBEDDING_PATH = "embed_tokens.embedding"  # what a tied output head reuses
HF_BASE_PREFIX = "model."

Config, Model = LlamaConfig, LlamaForCausalLM
