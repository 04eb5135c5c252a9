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

- `gguf` (an option value, not a format): a .gguf file's own blocks of 32 held as stored where they map, which
  makes the quantised model exactly the float one the file dequantises to: Q8_0 (`q8_0`: int8 codes, a scale
  per block; 8.5 bits), Q4_0 (`q4_0`: int4 codes, a scale; 4.5 bits), Q4_1 (`q4_1`: uint4 codes, a scale and an
  offset, w = code * scale + offset; 5 bits). A linear whose layers are of other types (the K-quants, F16, ...)
  or of mixed types stays float (the loader says which).

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

from ..config import GGUF, QUANTIZATION_KINDS
from ..sharding import gather_weight
from .layers import Linear

KINDS = QUANTIZATION_KINDS  # quantised from float weights
# GGUF (config.GGUF): keep a .gguf file's own blocks (GGUF_KINDS)
GGUF_KINDS = ("q8_0", "q4_0", "q4_1")
BLOCK = 64  # input rows per scale of the 4-bit kinds (bitsandbytes' default blocksize)
GGUF_BLOCK = 32
NOT_QUANTIZED = ("lm_head",)  # the output head stays in the frozen dtype (as bitsandbytes' llm_int8_skip_modules)

# NF4's 16 values (QLoRA, Dettmers et al. 2023, appendix E), in increasing order.
NF4_VALUES = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                       -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                       0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                       0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


class Quantized(nnx.Param):
    """A frozen weight's codes, scales or offsets. A Param, so that the reference and a LoRA base split out with
    the rest of the frozen weights; it is never trained (quantised layers only exist in frozen models)."""


def block_size(d_in: int, kind: str) -> int:
    """Input rows that share a scale: one per output column for int8; 64 for the 4-bit kinds (the whole column
    when 64 does not divide the input size); 32 for GGUF's blocks."""
    if kind in GGUF_KINDS:
        return GGUF_BLOCK
    if kind == "int8" or d_in % BLOCK:
        return d_in
    return BLOCK


def quantize(w: jax.Array, kind: str) -> tuple[jax.Array, ...]:
    """(codes, scales) of a kernel w [..., in, out] (leading axes, such as a stack's layers, get scales of their
    own), and offsets for q4_1. codes: int8, uint4 (nf4: an index into NF4_VALUES) or float4_e2m1fn, w's shape;
    scales: float32 [..., in / block, out]. The GGUF kinds as llama.cpp's reference quantisers make them (the
    loader takes a file's blocks as they are instead)."""
    if kind not in KINDS + GGUF_KINDS:
        raise ValueError(f"quantization {kind!r}: expected one of {', '.join(KINDS + GGUF_KINDS)}")
    w = w.astype(jnp.float32)
    *lead, d_in, _ = w.shape
    block = block_size(d_in, kind)
    channels = (*range(len(lead)), w.ndim - 1)  # own scales: every leading axis and every output column
    if kind in ("int8", "fp4", "q8_0"):
        qtype = jnp.float4_e2m1fn if kind == "fp4" else jnp.int8
        tiles = {w.ndim - 2: block} if block != d_in else None
        # int8: scale absmax / 127 (bitsandbytes'), not qwix's absmax / 127.5, so that quantising dequantised
        # weights gives the same codes back (qwix's bound of 127.5 clips the largest weight to 127 instead)
        method = "absmax" if kind == "fp4" else f"absmax,{127.5 / 127!r}"
        q = qwix.quantize(w, qtype, channelwise_axes=channels, tiled_axes=tiles, calibration_method=method)
        return q.qvalue, q.scale
    blocks = w.reshape(*lead, d_in // block, block, w.shape[-1])
    if kind == "q4_0":  # the signed value of largest magnitude becomes -8
        extreme = jnp.take_along_axis(blocks, jnp.argmax(jnp.abs(blocks), axis=-2)[..., None, :], axis=-2)[..., 0, :]
        scale = jnp.where(extreme != 0, extreme / -8, 1.0)
        codes = jnp.clip(jnp.round(blocks / scale[..., None, :]), -8, 7)
        return codes.reshape(w.shape).astype(jnp.int4), scale
    if kind == "q4_1":
        low, high = jnp.min(blocks, axis=-2), jnp.max(blocks, axis=-2)
        scale = jnp.where(high > low, (high - low) / 15, 1.0)
        codes = jnp.clip(jnp.round((blocks - low[..., None, :]) / scale[..., None, :]), 0, 15)
        return codes.reshape(w.shape).astype(jnp.uint4), scale, low
    scale = jnp.max(jnp.abs(blocks), axis=-2)  # nf4: [..., in / block, out]
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero block: any scale gives zeros
    normed = blocks / scale[..., None, :]
    midpoints = (NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2  # the nearest value: count the midpoints below
    codes = sum((normed > m).astype(jnp.uint8) for m in midpoints)
    return codes.reshape(w.shape).astype(jnp.uint4), scale


def dequantize(codes: jax.Array, scale: jax.Array, kind: str, dtype, offsets: jax.Array | None = None) -> jax.Array:
    """The kernel in `dtype` (the product taken in `dtype`: bfloat16 compute dequantises in bfloat16)."""
    if kind == "nf4":
        values = jnp.take(jnp.asarray(NF4_VALUES, dtype), codes.astype(jnp.int32), axis=0)
        return _scaled(values, scale, dtype)
    if kind == "q4_1":
        return _scaled(codes.astype(dtype), scale, dtype, offsets)
    qtype = {"int8": jnp.int8, "q8_0": jnp.int8, "q4_0": jnp.int4, "fp4": jnp.float4_e2m1fn}[kind]
    return qwix.dequantize(qwix.QArray(codes, scale.astype(dtype), qtype=qtype))


def _scaled(values: jax.Array, scale: jax.Array, dtype, offsets: jax.Array | None = None) -> jax.Array:
    """values [..., in, out] times scale [..., in / block, out] (plus offsets, alike), each over its block of
    rows."""
    *lead, d_in, d_out = values.shape
    blocks = scale.shape[-2]
    out = values.reshape(*lead, blocks, d_in // blocks, d_out) * scale.astype(dtype)[..., None, :]
    if offsets is not None:
        out = out + offsets.astype(dtype)[..., None, :]
    return out.reshape(values.shape)


def _take_over(new: Linear, old: Linear) -> None:
    """`new` computes with `old`'s bias, compute dtype and LoRA adapters."""
    new.bias, new.dtype = nnx.data(old.bias), old.dtype
    new.lora_a, new.lora_b, new.lora_key = nnx.data(old.lora_a), nnx.data(old.lora_b), nnx.data(old.lora_key)
    new.lora_scale, new.lora_dropout = old.lora_scale, old.lora_dropout


class QuantizedLinear(Linear):
    """A frozen Linear whose kernel is held quantised (`codes`, `scales`; see the module docstring); the same
    call as Linear's, LoRA adapters included (QLoRA). Made from a Linear by `quantize_linears`."""

    def __init__(self, linear: Linear, parts: tuple[jax.Array, ...], kind: str):
        axes = linear.kernel.get_metadata().get("out_sharding")
        codes, scales, *offsets = parts
        self.codes = Quantized(codes, out_sharding=axes, eager_sharding=False)
        self.scales = Quantized(scales, out_sharding=axes, eager_sharding=False)
        self.offsets = nnx.data(Quantized(offsets[0], out_sharding=axes, eager_sharding=False) if offsets else None)
        self.kind = kind
        _take_over(self, linear)

    def weight(self) -> jax.Array:
        # the parts gathered over fsdp as they are used (a hint): the gather moves the small codes, not the
        # dequantised kernel
        offsets = None if self.offsets is None else gather_weight(self.offsets)
        return dequantize(gather_weight(self.codes), gather_weight(self.scales), self.kind, self.dtype, offsets)

    @property
    def layout(self) -> nnx.Variable:
        return self.codes

    @property
    def weight_dtype(self):
        return self.scales.get_value().dtype

    def float_kernel(self) -> jax.Array:
        offsets = None if self.offsets is None else self.offsets.get_value()
        return dequantize(self.codes.get_value(), self.scales.get_value(), self.kind, jnp.float32, offsets)


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
        if not stacked:
            return quantize(w, kind)
        # the layers' codes stacked in a byte container, cast once at the end: XLA:CPU updates a 4-bit array's
        # slice some 2,000 times slower than a byte array's (0.47 s for one 576 x 1536 layer of SmolLM2)
        parts = jax.lax.map(lambda layer: tuple(p.astype(storage(p.dtype)) for p in quantize(layer, kind)), w)
        return tuple(p.astype(d) for p, d in zip(parts, _part_dtypes(kind)))
    return jax.jit(run, out_shardings=shardings)


def storage(dtype):
    """A byte-wide dtype that holds `dtype`'s values exactly (4-bit codes: while a stack is filled layer by
    layer); other dtypes are their own."""
    return {jnp.dtype(jnp.int4): jnp.int8, jnp.dtype(jnp.uint4): jnp.uint8,
            jnp.dtype(jnp.float4_e2m1fn): jnp.float8_e4m3fn}.get(jnp.dtype(dtype), dtype)


def _part_dtypes(kind: str) -> tuple:
    codes = {"int8": jnp.int8, "q8_0": jnp.int8, "q4_0": jnp.int4, "fp4": jnp.float4_e2m1fn}.get(kind, jnp.uint4)
    return (codes, jnp.float32) + ((jnp.float32,) if kind == "q4_1" else ())


def quantize_array(w, kind: str, axes, mesh=None, stacked: bool = False):
    """(codes, scales) of kernel `w`, placed on `mesh` by the kernel's logical `axes` (as the loader places a
    kernel); `stacked`: w's first axis is a stack's layers. Works on abstract values (under eval_shape) too."""
    from ..sharding import param_sharding

    shardings = None
    if mesh is not None:
        d_in = w.shape[-2]
        scale_shape = (*w.shape[:-2], d_in // block_size(d_in, kind), w.shape[-1])
        shardings = (param_sharding(axes, tuple(w.shape), mesh), param_sharding(axes, scale_shape, mesh))
        shardings += shardings[1:] if kind == "q4_1" else ()
    return _quantizer(kind, stacked, shardings)(w)


def place_parts(parts: tuple[np.ndarray, ...], axes, mesh=None) -> tuple[jax.Array, ...]:
    """Stored parts (a GGUF tensor's codes, scales and offsets, [in, out] layout) placed as `quantize_array`
    places its own."""
    from ..sharding import param_sharding

    if mesh is None:
        return tuple(jax.device_put(p) for p in parts)
    return tuple(jax.make_array_from_callback(p.shape, param_sharding(axes, p.shape, mesh), lambda i, p=p: p[i])
                 for p in parts)


def quantize_linears(model: nnx.Module, kind: "str | dict[str, str | None] | None") -> nnx.Module:
    """Replace, in place, every Linear of `model` but the output head by a QuantizedLinear of `kind` (None:
    nothing to do; a dict: each Linear's kind by its dotted path, a missing or None one staying float), one
    kernel at a time (a stack layer by layer). The float kernels are not freed here: the loader runs this under
    eval_shape only (it quantises each tensor as it places it), and the trainer's reference shares the policy's
    kernels. The codes take the kernel's sharding. Returns `model`."""
    if kind is None:
        return model
    for path, linear in list(nnx.iter_graph(model)):
        if not path or type(linear) is not Linear or str(path[-1]) in NOT_QUANTIZED:
            continue
        layer_kind = kind.get(".".join(str(p) for p in path)) if isinstance(kind, dict) else kind
        if layer_kind is None:
            continue
        value = linear.kernel.get_value()
        axes = linear.kernel.get_metadata().get("out_sharding")
        placed = getattr(value, "sharding", None)
        mesh = placed.mesh if isinstance(placed, jax.sharding.NamedSharding) else None
        stacked = bool(axes) and axes[0] == "layers"
        parts = quantize_array(value, layer_kind, axes, mesh, stacked)
        _set_module(model, path, QuantizedLinear(linear, parts, layer_kind))
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
    """Storage bits per weight of a kernel with `d_in` inputs (codes, float32 scales and offsets)."""
    bits = 8 if kind in ("int8", "q8_0") else 4
    return bits + 32 * (2 if kind == "q4_1" else 1) / block_size(d_in, kind)


def describe(kind: str | None) -> str:
    if kind == GGUF:
        return "gguf (the file's Q8_0 / Q4_0 / Q4_1 blocks as stored)"
    return "none" if kind is None else f"{kind} ({bits_per_weight(kind):.2f} bits/weight)"

