"""Weight-only quantisation of frozen weights: the reference of a full fine-tune, the base of a QLoRA run.

A `QuantizedLinear` holds a linear layer's kernel [.., in, out] as codes and scales (qwix's `QArray` layout:
value = code * scale, the scale broadcast over its block) and dequantises it to the compute dtype where it is
used, inside the layer's matmul; activations, norms, embeddings and the output head stay as they are
(bitsandbytes leaves the head and the embeddings unquantised too). Three kinds:

- `int8`: symmetric, one float32 scale per output column (absmax / 127, codes rounded half to even; per layer
  of a stack); 8 bits a weight plus 32 per column.
- `nf4`: QLoRA's 4-bit NormalFloat (16 code values, the normal distribution's quantiles on [-1, 1]), one
  float32 absmax scale per block of 64 input rows of each output column (bitsandbytes' blocksize: 64
  consecutive elements of PyTorch's [out, in] weight row); 4.5 bits a weight.
- `fp4`: the OCP 4-bit float e2m1 (+-0, 0.5, 1, 1.5, 2, 3, 4, 6), absmax-scaled per block of 64 as nf4. Not
  bitsandbytes' own fp4 code book (an e2m1 variant with other values): the same size, not the same codes.

A kernel whose input size 64 does not divide gets one block per column. Codes and scales keep the kernel's
logical axes, so they are sharded over the mesh as the kernel would be (a scale dimension the mesh does not
divide stays whole). int8 and fp4 are quantised and dequantised by qwix (`qwix.quantize`,
`qwix.dequantize`); nf4's code conversion is ours: qwix's flattens the array, which on a mesh all-gathers the
weight to quantise it (3 all-gathers measured on a 4 x 2 CPU mesh) and, under explicit sharding, fails to
dequantise it. Scales are float32 (bitsandbytes' "nested" quantisation of the scales is not offered).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from ..sharding import gather_weight
from .layers import Linear

KINDS = ("int8", "nf4", "fp4")
BLOCK = 64  # input rows per scale of the 4-bit kinds (bitsandbytes' default blocksize)
NOT_QUANTIZED = ("lm_head",)  # the output head stays in the frozen dtype (as bitsandbytes' llm_int8_skip_modules)

# NF4's 16 values (QLoRA, Dettmers et al. 2023, appendix E), in increasing order.
NF4_VALUES = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


class Quantized(nnx.Param):
    """A frozen weight's codes or scales. A Param, so that the reference and a LoRA base split out with the rest
    of the frozen weights; it is never trained (quantised layers only exist in frozen models)."""


def block_size(d_in: int, kind: str) -> int:
    """Input rows that share a scale: one per output column for int8; 64 for the 4-bit kinds (the whole column
    when 64 does not divide the input size)."""
    if kind == "int8" or d_in % BLOCK:
        return d_in
    return BLOCK


def quantize(w: jax.Array, kind: str) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of a kernel w [..., in, out] (leading axes, such as a stack's layers, get scales of their
    own). codes: int8, uint4 (nf4: an index into NF4_VALUES) or float4_e2m1fn, w's shape; scales: float32
    [..., in / block, out]."""
    if kind not in KINDS:
        raise ValueError(f"quantization {kind!r}: expected one of {', '.join(KINDS)}")
    w = w.astype(jnp.float32)
    *lead, d_in, _ = w.shape
    block = block_size(d_in, kind)
    channels = (*range(len(lead)), w.ndim - 1)  # own scales: every leading axis and every output column
    if kind != "nf4":
        qtype = jnp.int8 if kind == "int8" else jnp.float4_e2m1fn
        tiles = {w.ndim - 2: block} if block != d_in else None
        # int8: scale absmax / 127 (bitsandbytes'), not qwix's absmax / 127.5, so that quantising dequantised
        # weights gives the same codes back (qwix's bound of 127.5 clips the largest weight to 127 instead)
        method = f"absmax,{127.5 / 127!r}" if kind == "int8" else "absmax"
        q = qwix.quantize(w, qtype, channelwise_axes=channels, tiled_axes=tiles, calibration_method=method)
        return q.qvalue, q.scale
    blocks = w.reshape(*lead, d_in // block, block, w.shape[-1])
    scale = jnp.max(jnp.abs(blocks), axis=-2)  # [..., in / block, out]
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero block: any scale gives zeros
    normed = blocks / scale[..., None, :]
    midpoints = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2  # the nearest value: count the midpoints below
    codes = sum((normed > m).astype(jnp.uint8) for m in midpoints)
    return codes.reshape(w.shape).astype(jnp.uint4), scale


def dequantize(codes: jax.Array, scale: jax.Array, kind: str, dtype) -> jax.Array:
    """The kernel in `dtype` (the product taken in `dtype`: bfloat16 compute dequantises in bfloat16)."""
    if kind == "nf4":
        values = jnp.take(jnp.asarray(NF4_VALUES, dtype), codes.astype(jnp.int32), axis=0)
        return _scaled(values, scale, dtype)
    qtype = jnp.int8 if kind == "int8" else jnp.float4_e2m1fn
    return qwix.dequantize(qwix.QArray(codes, scale.astype(dtype), qtype=qtype))


def _scaled(values: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """values [..., in, out] times scale [..., in / block, out], each scale over its block of rows."""
    *lead, d_in, d_out = values.shape
    blocks = scale.shape[-2]
    out = values.reshape(*lead, blocks, d_in // blocks, d_out) * scale.astype(dtype)[..., None, :]
    return out.reshape(values.shape)


def _take_over(new: Linear, old: Linear) -> None:
    """`new` computes with `old`'s bias, compute dtype and LoRA adapters."""
    new.bias, new.dtype = nnx.data(old.bias), old.dtype
    new.lora_a, new.lora_b, new.lora_key = nnx.data(old.lora_a), nnx.data(old.lora_b), nnx.data(old.lora_key)
    new.lora_scale, new.lora_dropout = old.lora_scale, old.lora_dropout


class QuantizedLinear(Linear):
    """A frozen Linear whose kernel is held quantised (`codes`, `scales`; see the module docstring); the same
    call as Linear's, LoRA adapters included (QLoRA). Made from a Linear by `quantize_linears`."""

    def __init__(self, linear: Linear, codes: jax.Array, scales: jax.Array, kind: str):
        axes = linear.kernel.get_metadata().get("out_sharding")
        self.codes = Quantized(codes, out_sharding=axes, eager_sharding=False)
        self.scales = Quantized(scales, out_sharding=axes, eager_sharding=False)
        self.kind = kind
        _take_over(self, linear)

    def weight(self) -> jax.Array:
        # codes and scales gathered over fsdp as they are used (a hint): the gather moves the small codes, not
        # the dequantised kernel
        return dequantize(gather_weight(self.codes), gather_weight(self.scales), self.kind, self.dtype)

    @property
    def layout(self) -> nnx.Variable:
        return self.codes

    @property
    def weight_dtype(self):
        return self.scales.get_value().dtype

    def float_kernel(self) -> jax.Array:
        return dequantize(self.codes.get_value(), self.scales.get_value(), self.kind, jnp.float32)


class DequantizedLinear(Linear):
    """A plain Linear again, its float32 kernel dequantised from a QuantizedLinear (`dequantize_linears`)."""

    def __init__(self, layer: QuantizedLinear):
        self.kernel = nnx.Param(layer.float_kernel(), out_sharding=layer.codes.get_metadata().get("out_sharding"),
                                eager_sharding=False)
        _take_over(self, layer)


@functools.lru_cache(maxsize=64)
def _quantizer(kind: str, stacked: bool, shardings):
    """`quantize` jitted (layer by layer for a stack, so its temporaries are one layer's), its outputs placed
    in `shardings` (None: where jit puts them)."""
    def run(w):
        if stacked:
            return jax.lax.map(lambda layer: quantize(layer, kind), w)
        return quantize(w, kind)
    return jax.jit(run, out_shardings=shardings)


def quantize_array(w, kind: str, axes, mesh=None, stacked: bool = False):
    """(codes, scales) of kernel `w`, placed on `mesh` by the kernel's logical `axes` (as the loader places a
    kernel); `stacked`: w's first axis is a stack's layers. Works on abstract values (under eval_shape) too."""
    from ..sharding import param_sharding

    shardings = None
    if mesh is not None:
        d_in = w.shape[-2]
        scale_shape = (*w.shape[:-2], d_in // block_size(d_in, kind), w.shape[-1])
        shardings = (param_sharding(axes, tuple(w.shape), mesh), param_sharding(axes, scale_shape, mesh))
    return _quantizer(kind, stacked, shardings)(w)


def quantize_linears(model: nnx.Module, kind: str | None) -> nnx.Module:
    """Replace, in place, every Linear of `model` but the output head by a QuantizedLinear of `kind` (None:
    nothing to do), one kernel at a time: each float kernel is released (if nothing else holds it) once its
    codes exist, so the float weights and their quantised copy are never both held whole. The codes take the
    kernel's sharding. Returns `model`."""
    if kind is None:
        return model
    for path, linear in list(nnx.iter_graph(model)):
        if not path or type(linear) is not Linear or str(path[-1]) in NOT_QUANTIZED:
            continue
        value = linear.kernel.get_value()
        axes = linear.kernel.get_metadata().get("out_sharding")
        placed = getattr(value, "sharding", None)
        mesh = placed.mesh if isinstance(placed, jax.sharding.NamedSharding) else None
        stacked = bool(axes) and axes[0] == "layers"
        codes, scales = quantize_array(value, kind, axes, mesh, stacked)
        _set_module(model, path, QuantizedLinear(linear, codes, scales, kind))
    return model


def dequantize_linears(model: nnx.Module) -> nnx.Module:
    """Replace, in place, every QuantizedLinear by a Linear with its float32 kernel (adapters kept): the plain
    model that computes what the quantised one does (for export). Returns `model`."""
    for path, layer in list(nnx.iter_graph(model)):
        if isinstance(layer, QuantizedLinear):
            _set_module(model, path, DequantizedLinear(layer))
    return model


def _set_module(model: nnx.Module, path: tuple, module: nnx.Module) -> None:
    parent = model
    for name in path[:-1]:
        parent = parent[name] if isinstance(name, int) else getattr(parent, str(name))
    setattr(parent, str(path[-1]), module)


def bits_per_weight(kind: str, d_in: int = 4096) -> float:
    """Storage bits per weight of a kernel with `d_in` inputs (codes and float32 scales)."""
    bits = 8 if kind == "int8" else 4
    return bits + 32 / block_size(d_in, kind)


def describe(kind: str | None) -> str:
    return "none" if kind is None else f"{kind} ({bits_per_weight(kind):.2f} bits/weight)"

