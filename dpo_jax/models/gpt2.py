"""GPT-2: learned position embeddings, LayerNorm, fused q/k/v projection, GELU (tanh) MLP, tied head."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import eager_attention, self_attention, wide
from .blocks import run_blocks, stacked
from .cache import KVCache, mask_and_positions
from .layers import Embed, LayerNorm, Linear, activation

MODEL_TYPES = ("gpt2",)


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    model_type: str
    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int
    layer_norm_epsilon: float
    activation_function: str = "gelu_new"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True

    # The transformers config this was built from (JSON), written back by export_pretrained.
    hf_config_json: str = dataclasses.field(default="", compare=False, repr=False)

    @classmethod
    def from_hf(cls, hf) -> "GPT2Config":
        return cls(
            hf_config_json=hf.to_json_string(use_diff=False),
            model_type=hf.model_type, vocab_size=hf.vocab_size, n_positions=hf.n_positions, n_embd=hf.n_embd,
            n_layer=hf.n_layer, n_head=hf.n_head, n_inner=hf.n_inner or 4 * hf.n_embd,
            layer_norm_epsilon=hf.layer_norm_epsilon, activation_function=hf.activation_function,
            scale_attn_weights=hf.scale_attn_weights,
            scale_attn_by_inverse_layer_idx=hf.scale_attn_by_inverse_layer_idx,
            tie_word_embeddings=bool(hf.tie_word_embeddings))


class Attention(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Fused [q | k | v] as in the checkpoint; its output axis is not sharded ("qkv").
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, ("embed", "qkv"), **kw)
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, ("q_heads", "embed"), **kw)
        self.heads = cfg.n_head

    def __call__(self, x_BxTxD, mask, positions_BxT, cache=None, *, scale, implementation="auto"):
        """`mask`: a TokenMask, or with a cache its [B, T, S] mask; `scale`: this layer's score scale (it may
        depend on the layer: `attention_scales`); `implementation`: see attention.py."""
        b, t, d = x_BxTxD.shape
        q, k, v = jnp.split(self.c_attn(x_BxTxD), 3, axis=-1)
        q, k, v = (y.reshape(b, t, self.heads, d // self.heads) for y in (q, k, v))
        if cache is not None:
            k, v = cache.write(k, v)
            out = eager_attention(q, k, v, mask, scale=scale)
        else:
            out = self_attention(q, k, v, mask, positions_BxT, scale=scale, implementation=implementation)
        return self.c_proj(out.reshape(b, t, d))


class MLP(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.c_fc = Linear(cfg.n_embd, cfg.n_inner, ("embed", "mlp"), **kw)
        self.c_proj = Linear(cfg.n_inner, cfg.n_embd, ("mlp", "embed"), **kw)
        self.act = activation(cfg.activation_function)

    def __call__(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


def attention_scales(cfg: GPT2Config) -> tuple[float, ...]:
    """Each layer's score scale: 1/sqrt(head dim) (or 1), divided by the layer's number when the config says."""
    scale = (cfg.n_embd // cfg.n_head) ** -0.5 if cfg.scale_attn_weights else 1.0
    return tuple(scale / (layer + 1) if cfg.scale_attn_by_inverse_layer_idx else scale for layer in range(cfg.n_layer))


class Block(nnx.Module):
    def __init__(self, cfg: GPT2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_1 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)
        self.attn = Attention(cfg, **kw)
        self.ln_2 = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)
        self.mlp = MLP(cfg, **kw)

    def __call__(self, x_BxTxD, mask, positions_BxT, cache=None, *, scale, implementation="auto"):
        x_BxTxD = x_BxTxD + self.attn(self.ln_1(x_BxTxD), mask, positions_BxT, cache, scale=scale,
                                      implementation=implementation)
        return x_BxTxD + self.mlp(self.ln_2(x_BxTxD))


class GPT2LMHeadModel(nnx.Module):
    """`model(input_ids, attention_mask=None, positions=None) -> logits [B, T, V]` (see LlamaForCausalLM)."""

    def __init__(self, cfg: GPT2Config, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = cfg
        self.remat = False  # recompute each block's activations in the backward pass (set by the step)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wte = Embed(cfg.vocab_size, cfg.n_embd, ("vocab", "embed"), **kw)
        self.wpe = Embed(cfg.n_positions, cfg.n_embd, (None, "embed"), **kw)
        self.h = stacked(lambda rngs: Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs), cfg.n_layer, rngs)
        self.ln_f = LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (None if cfg.tie_word_embeddings
                        else Linear(cfg.n_embd, cfg.vocab_size, ("embed", "vocab"), bias=False, **kw))

    def __call__(self, input_ids_BxT: jax.Array, attention_mask: jax.Array | None = None,
                 positions: jax.Array | None = None, cache: KVCache | None = None) -> jax.Array:
        return self.logits(self.hidden_states(input_ids_BxT, attention_mask, positions, cache))

    def hidden_states(self, input_ids_BxT, attention_mask=None, positions=None, cache=None, *,
                      attn_implementation: str = "auto") -> jax.Array:
        b, t = input_ids_BxT.shape
        mask, positions = mask_and_positions(attention_mask, positions, b, t, cache)
        x = self.wte(input_ids_BxT) + self.wpe(positions)
        x = run_blocks(self.h, x, mask, positions, per_layer={"scale": attention_scales(self.config)}, cache=cache,
                       remat=self.remat and cache is None, implementation=attn_implementation)
        if cache is not None:
            cache.advance(t)
        return self.ln_f(x)

    def output_head(self) -> nnx.Variable:
        """The output head's weight: the embedding when tied."""
        return self.wte.embedding if self.lm_head is None else self.lm_head.kernel

    def logits(self, hidden_BxTxD: jax.Array, head: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] in float32; `head`: output_head()'s value as the caller laid it out."""
        if self.lm_head is None:
            return self.wte.attend(hidden_BxTxD, head)
        return self.lm_head(hidden_BxTxD, preferred_element_type=wide(self.lm_head.dtype), kernel=head)


# GPT-2's Conv1D stores weights [in, out], as we do: no transposes. Our blocks are stacked: `transformer.h.{i}`
# is slice i of `h`.
HF_RULES = (
    ("transformer.wte.weight", "wte.embedding", False),
    ("transformer.wpe.weight", "wpe.embedding", False),
    ("transformer.ln_f.weight", "ln_f.scale", False),
    ("transformer.ln_f.bias", "ln_f.bias", False),
    ("lm_head.weight", "lm_head.kernel", True),
    ("transformer.h.{i}.ln_{n}.weight", "h.ln_{n}.scale", False),
    ("transformer.h.{i}.ln_{n}.bias", "h.ln_{n}.bias", False),
    ("transformer.h.{i}.{m}.c_{p}.weight", "h.{m}.c_{p}.kernel", False),
    ("transformer.h.{i}.{m}.c_{p}.bias", "h.{m}.c_{p}.bias", False),
)
# The causal-mask buffers of older checkpoints.
HF_IGNORED = (r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias",)
EMBEDDING_PATH = "wte.embedding"  # what a tied output head reuses
HF_BASE_PREFIX = "transformer."

Config, Model = GPT2Config, GPT2LMHeadModel
