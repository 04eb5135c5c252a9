"""The Gemma family: Gemma (1), Gemma 2 and Gemma 3 (text).

What sets it apart from Llama: RMSNorm scales by (1 + w); embeddings are multiplied by sqrt(hidden_size);
GeGLU feed-forward; usually a tied output head. Gemma 2 and 3 add "sandwich" norms (after attention and after the
MLP too), alternating sliding-window and global layers and a query scale from `query_pre_attn_scalar`;
Gemma 2 soft-caps attention scores and final logits; Gemma 3 adds q/k RMSNorm and a separate RoPE base
for its local (sliding) layers.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from ..errors import CheckpointError
from .attention import wide
from .blocks import run_blocks, stacked, window_values
from .cache import KVCache, mask_and_positions
from .layers import Embed, GatedMLP, Linear, RMSNorm, SelfAttention
from .rope import rope_inv_freq

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    query_scale: float                         # multiplies q.k
    inv_freqs: tuple[tuple[float, ...], ...]   # RoPE inverse frequencies, per layer
    sliding_windows: tuple[int | None, ...]    # per layer; None = global attention
    sandwich_norms: bool                       # Gemma 2/3: norms after attention and after the MLP too
    qk_norm: bool                              # Gemma 3
    tie_word_embeddings: bool = True
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    # The transformers config this was built from (JSON), written back by export_pretrained.
    hf_config_json: str = dataclasses.field(default="", compare=False, repr=False)

    @classmethod
    def from_hf(cls, hf) -> "GemmaConfig":
        if getattr(hf, "use_bidirectional_attention", None):
            raise CheckpointError(f"{hf.model_type}: use_bidirectional_attention (an encoder) is not a causal LM; "
                                  "dpo-jax supports causal attention only")
        n = hf.num_hidden_layers
        layer_types = getattr(hf, "layer_types", None) or ("full_attention",) * n
        rope = hf.rope_parameters
        # Gemma 3 keeps one RoPE setting per layer type; the others one for all layers.
        per_type = rope if "rope_theta" not in rope else {kind: rope for kind in layer_types}
        freqs = {kind: rope_inv_freq(hf.head_dim, per_type[kind], hf.model_type)[0] for kind in set(layer_types)}
        window = getattr(hf, "sliding_window", None)
        scalar = getattr(hf, "query_pre_attn_scalar", None) or hf.head_dim
        return cls(
            hf_config_json=hf.to_json_string(use_diff=False),
            model_type=hf.model_type, vocab_size=hf.vocab_size, hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size, num_layers=n, num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads, head_dim=hf.head_dim, rms_norm_eps=hf.rms_norm_eps,
            # Gemma 1's MLP reads hidden_act; Gemma 2 and 3 read hidden_activation.
            hidden_act=hf.hidden_act if hf.model_type == "gemma" else hf.hidden_activation,
            query_scale=scalar ** -0.5, tie_word_embeddings=bool(hf.tie_word_embeddings),
            inv_freqs=tuple(freqs[kind] for kind in layer_types),
            sliding_windows=tuple(window if kind == "sliding_attention" else None for kind in layer_types),
            sandwich_norms=hf.model_type != "gemma", qk_norm=hf.model_type == "gemma3_text",
            attn_logit_softcapping=getattr(hf, "attn_logit_softcapping", None),
            final_logit_softcapping=getattr(hf, "final_logit_softcapping", None))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: GemmaConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = dict(offset=1.0, param_dtype=param_dtype, rngs=rngs)
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(d, eps, **norm)
        self.self_attn = SelfAttention(
            hidden=d, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, qkv_bias=False,
            o_bias=False, qk_norm=cfg.qk_norm, norm_eps=eps, norm_offset=1.0, scale=cfg.query_scale,
            softcap=cfg.attn_logit_softcapping, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Gemma 1 uses this as the pre-MLP norm (as Llama); Gemma 2/3 apply it to the attention output.
        self.post_attention_layernorm = RMSNorm(d, eps, **norm)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(d, eps, **norm)
            self.post_feedforward_layernorm = RMSNorm(d, eps, **norm)
        self.mlp = GatedMLP(d, cfg.intermediate_size, cfg.hidden_act, bias=False, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)
        self.sandwich_norms = cfg.sandwich_norms

    def __call__(self, x_BxTxD, mask_BxTxS, positions_BxT, cache=None, **layer):
        """`layer`: this layer's attention settings (SelfAttention's inv_freq and window)."""
        attn = self.self_attn(self.input_layernorm(x_BxTxD), mask_BxTxS, positions_BxT, cache, **layer)
        if not self.sandwich_norms:
            x_BxTxD = x_BxTxD + attn
            return x_BxTxD + self.mlp(self.post_attention_layernorm(x_BxTxD))
        x_BxTxD = x_BxTxD + self.post_attention_layernorm(attn)
        return x_BxTxD + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x_BxTxD)))


class GemmaForCausalLM(nnx.Module):
    """`model(input_ids, attention_mask=None, positions=None) -> logits [B, T, V]` (see LlamaForCausalLM)."""

    def __init__(self, cfg: GemmaConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.remat = False  # recompute each block's activations in the backward pass (set by the step)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, ("vocab", "embed"), **kw)
        self.layers = stacked(lambda rngs: DecoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
                              cfg.num_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, offset=1.0, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), bias=False, **kw))

    def __call__(self, input_ids_BxT: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None) -> jax.Array:
        return self.logits(self.hidden_states(input_ids_BxT, attention_mask, positions, cache))

    def hidden_states(self, input_ids_BxT, attention_mask=None, positions=None, cache=None, *,
                      attn_implementation: str = "auto") -> jax.Array:
        b, t = input_ids_BxT.shape
        mask, positions = mask_and_positions(attention_mask, positions, b, t, cache)
        x = self.embed_tokens(input_ids_BxT)
        # transformers rounds the scale to the embedding's dtype before multiplying.
        x = x * jnp.asarray(math.sqrt(self.config.hidden_size), x.dtype)
        # sliding and global layers differ only in scanned data: their window and RoPE frequencies
        per_layer = {"inv_freq": self.config.inv_freqs, "window": window_values(self.config.sliding_windows)}
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
            logits = self.embed_tokens.attend(hidden_BxTxD, head)
        else:
            logits = self.lm_head(hidden_BxTxD, preferred_element_type=wide(self.lm_head.dtype), kernel=head)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap


HF_RULES = (
    ("model.embed_tokens.weight", "embed_tokens.embedding", False),
    ("model.norm.weight", "norm.weight", False),
    ("lm_head.weight", "lm_head.kernel", True),
    ("model.layers.{i}.input_layernorm.weight", "layers.input_layernorm.weight", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.post_attention_layernorm.weight", False),
    ("model.layers.{i}.pre_feedforward_layernorm.weight", "layers.pre_feedforward_layernorm.weight", False),
    ("model.layers.{i}.post_feedforward_layernorm.weight", "layers.post_feedforward_layernorm.weight", False),
    ("model.layers.{i}.self_attn.{p}_proj.weight", "layers.self_attn.{p}_proj.kernel", True),
    ("model.layers.{i}.self_attn.{p}_norm.weight", "layers.self_attn.{p}_norm.weight", False),
    ("model.layers.{i}.mlp.{p}_proj.weight", "layers.mlp.{p}_proj.kernel", True),
)
HF_IGNORED = (r"(model\.)?(layers\.\d+\.self_attn\.)?rotary_emb\.inv_freq",)
EMBEDDING_PATH = "embed_tokens.embedding"  # what a tied output head reuses
HF_BASE_PREFIX = "model."

Config, Model = GemmaConfig, GemmaForCausalLM
