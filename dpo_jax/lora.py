"""LoRA: low-rank adapters on the model's linear layers, trained while the base weights stay frozen.

`apply_lora` gives each targeted `Linear` a pair A [in, r] (PEFT's initialisation: uniform in
+-1/sqrt(in)) and B [r, out] (zeros), and its output gains (alpha / r) * x A B; with B = 0 the model is the
base model exactly. A linear of the stacked blocks (kernel [L, in, out]) gets stacked adapters [L, in, r] and
[L, r, out], and a dropout key per layer. The adapters are `nnx.LoRAParam`s, so `split_lora` separates them
from the base weights: the optimizer sees only the adapters, and the reference is the same base weights with
the adapters zeroed, so no second copy of the model is kept. With `dropout` > 0, the adapters' input is
dropped out in training (PEFT's lora_dropout) with a key per layer and micro-batch that the step derives
(`dropout_keys`); the reference and evaluation use no dropout.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from . import sharding
from .errors import UserError
from .models import quant
from .models.layers import Linear, LoRAKey

ALL_LINEAR = "all-linear"  # every Linear but the output head, as PEFT's "all-linear"
DEFAULT_TARGETS = {"gpt2": ("c_attn",)}  # else PEFT's default for Llama-style models
LLAMA_DEFAULT = ("q_proj", "v_proj")


def default_targets(config) -> tuple[str, ...]:
    """PEFT's default target layers for this model family."""
    return DEFAULT_TARGETS.get(getattr(config, "model_type", ""), LLAMA_DEFAULT)


def apply_lora(model, rank: int, alpha: float, targets=None, dropout: float = 0.0, seed: int = 0):
    """Add adapters of rank `rank` to the Linear layers named in `targets` (default: PEFT's per family)."""
    if not 0 <= dropout < 1:
        raise UserError(f"lora_dropout must be in [0, 1), not {dropout}")
    if rank < 1:
        raise UserError(f"lora_r must be at least 1, not {rank}")
    targets = targets or default_targets(model.config)
    linears = [(path, m) for path, m in nnx.iter_graph(model) if isinstance(m, Linear) and path]
    names = {str(path[-1]) for path, _ in linears}
    if isinstance(targets, str) and targets != ALL_LINEAR:  # as PEFT: a string is a regular expression
        pattern = re.compile(targets)
        targets = tuple(n for n in names if pattern.fullmatch(n))
    if targets != ALL_LINEAR:
        unknown = [t for t in targets if t not in names]
        if unknown or not targets:
            raise UserError(f"lora_target_modules: no linear layer named {', '.join(unknown) or 'by it'}; this model "
                            f"has {', '.join(sorted(names))} (or use {ALL_LINEAR})")
    key = jax.random.key(seed)
    count = 0
    for path, linear in linears:
        name = str(path[-1])
        if name == "lm_head" or (targets != ALL_LINEAR and name not in targets):
            continue
        layout = linear.layout  # the kernel, or a quantised kernel's codes
        *layers, d_in, d_out = layout.shape  # layers: (L,) for a stacked linear, else ()
        axes = layout.get_metadata().get("out_sharding") or (None,) * layout.ndim
        *layer_axes, in_axis, out_axis = axes
        bound = 1.0 / jnp.sqrt(d_in)
        dtype = linear.weight_dtype  # a quantised base's adapters: its scales' float32
        a = jax.random.uniform(jax.random.fold_in(key, count), (*layers, d_in, rank), dtype, -bound, bound)
        b = jnp.zeros((*layers, rank, d_out), dtype)
        a_axes, b_axes = (*layer_axes, in_axis, None), (*layer_axes, None, out_axis)
        placed = getattr(layout.get_value(), "sharding", None)
        if isinstance(placed, jax.sharding.NamedSharding):  # the model is on a mesh: the adapters go there too
            a = jax.device_put(a, sharding.param_sharding(a_axes, a.shape, placed.mesh))
            b = jax.device_put(b, sharding.param_sharding(b_axes, b.shape, placed.mesh))
        linear.lora_a = nnx.LoRAParam(a, out_sharding=a_axes, eager_sharding=False)
        linear.lora_b = nnx.LoRAParam(b, out_sharding=b_axes, eager_sharding=False)
        linear.lora_scale = alpha / rank
        if dropout:
            linear.lora_dropout = dropout
            key_data = jnp.zeros((*layers, 2), jnp.uint32)
            if isinstance(placed, jax.sharding.NamedSharding):  # replicated over the model's mesh
                key_data = jax.device_put(key_data, jax.sharding.NamedSharding(placed.mesh, jax.sharding.PartitionSpec()))
            linear.lora_key = LoRAKey(key_data)
        count += 1
    if not count:
        raise UserError("lora_target_modules matched no linear layer")
    return model


def split_lora(model, gradient_checkpointing: bool = True):
    """(graphdef, adapters, base) of a model with adapters; base = (dropout keys, base weights), what the step
    takes as its frozen `ref_params`. Merge with nnx.merge(graphdef, adapters, *base)."""
    model.remat = gradient_checkpointing
    graphdef, adapters, keys, weights = nnx.split(model, nnx.LoRAParam, LoRAKey, nnx.Param)
    return graphdef, adapters, (keys, weights)


def dropout_keys(keys: nnx.State, salt: jax.Array, seed: int) -> nnx.State:
    """A fresh, non-zero dropout key per adapter (per layer of a stacked one) for this `salt` (one per
    micro-batch of each step)."""
    leaves, tree = jax.tree.flatten(keys)
    base = jax.random.fold_in(jax.random.key(seed), salt)

    def fresh(i, leaf):  # leaf: [2], or [L, 2] for stacked adapters
        key = jax.random.fold_in(base, i)
        key = key if leaf.ndim == 1 else jax.random.split(key, leaf.shape[0])
        return jax.random.key_data(key) | jnp.uint32(1)
    return jax.tree.unflatten(tree, [fresh(i, leaf) for i, leaf in enumerate(leaves)])


def merged_kernels(model) -> dict:
    """Kernels with their adapters folded in (W + scale * A B, in float32, cast back; a quantised kernel is
    dequantised to float32 first), by parameter path."""
    out = {}
    for path, module in nnx.iter_graph(model):
        if isinstance(module, Linear) and module.lora_a is not None:
            kernel = module.float_kernel()
            delta = module.lora_scale * (module.lora_a.get_value().astype(jnp.float32)
                                         @ module.lora_b.get_value().astype(jnp.float32))
            out[(*path, "kernel")] = (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)
    return out


def merge(model):
    """Fold the adapters into their kernels, in place: the model becomes a plain model computing the same (a
    quantised base is dequantised to float32 kernels first: QLoRA's merge)."""
    merged = merged_kernels(quant.dequantize_linears(model))
    for path, module in nnx.iter_graph(model):
        if (*path, "kernel") in merged:
            module.kernel.set_value(merged[(*path, "kernel")])
            module.lora_a = module.lora_b = module.lora_key = None
            module.lora_scale = module.lora_dropout = 0.0
    return model
