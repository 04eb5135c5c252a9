"""Export to Hugging Face: `export_pretrained` writes config.json and safetensors that transformers loads.

Every parameter goes back under its checkpoint name through the family's name map, a stacked one as one
tensor per layer, LoRA adapters folded into their kernels and quantised kernels dequantised; the export
replaces its output directory as a whole (`check_export_target` says which directories it may replace).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from flax import nnx

from .errors import CheckpointError
from .hf import _is_stacked, _path_str, _resolve
from .lora import merged_kernels
from .models import family
from .models import quant
from .namemap import NameMap


def _export_tensors(model: nnx.Module) -> Iterator[tuple[str, jax.Array, int | None, bool]]:
    """(their name, our array, the layer of a stacked one or None, transpose) of every tensor to write: a stacked
    parameter gives one tensor per layer again."""
    module = family(model.config.model_type)
    name_map = NameMap(module.HF_RULES, module.HF_IGNORED, module.HF_BASE_PREFIX)
    merged = merged_kernels(model)
    dequantized = {(*path, "codes"): module for path, module in nnx.iter_graph(model)
                   if isinstance(module, quant.QuantizedLinear)}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if isinstance(variable, nnx.LoRAParam) or (isinstance(variable, quant.Quantized) and path[-1] != "codes"):
            continue  # folded into its kernel below
        if path in dequantized:  # a quantised kernel is written dequantised, in float32
            path = (*path[:-1], "kernel")
            array = merged[path] if path in merged else dequantized[(*path[:-1], "codes")].float_kernel()
        else:
            array = merged.get(path, variable.get_value())
        for layer in range(array.shape[0]) if _is_stacked(variable) else (None,):
            name, transpose = name_map.to_theirs(_path_str(path), layer)
            yield name, array, layer, transpose


def export_pretrained(model: nnx.Module, out_dir: str, tokenizer: Any = None, *,
                      max_shard_size: int | str = "5GB", source: str | None = None,
                      protected: dict[str, str] | None = None) -> str:
    """Write config.json and safetensors (sharded above `max_shard_size`) that transformers loads, with the
    tokenizer's files when given. Parameters keep their dtype. Returns `out_dir`.

    The export replaces `out_dir` as a whole, atomically as far as the file system allows: everything is
    written to a temporary directory beside it, then the old directory is renamed aside, the new one renamed
    in, and the old one deleted; a failure before that leaves the old export whole, and no file of it (an
    adapter_config.json, another tokenizer's files) survives into the new one. So `out_dir` must be new,
    empty, or a model directory (config.json and no subdirectories), and must not be, hold or lie inside
    `source` or a path of `protected` ({what it is: path}, e.g. the reference model, a run's checkpoints).
    `source` is the model's directory, repo id or .gguf file: its generation_config.json is carried over (a
    GGUF file has none: transformers then takes bos / eos from config.json, as it does for any model).
    """
    from huggingface_hub import split_state_dict_into_shards_factory
    from safetensors.numpy import save_file

    if not model.config.hf_config_json:
        raise CheckpointError("this model has no transformers config to export; load it with from_pretrained")
    source_path = _resolve(source) if source else None
    out_dir = check_export_target(out_dir, source_path, protected)
    arrays = {name: (array, layer, transpose) for name, array, layer, transpose in _export_tensors(model)}
    shapes = {name: jax.ShapeDtypeStruct(array.shape[(0 if layer is None else 1):], array.dtype)
              for name, (array, layer, _) in arrays.items()}
    split = split_state_dict_into_shards_factory(
        shapes, get_storage_size=lambda a: a.size * a.dtype.itemsize,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size)

    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.export-", dir=os.path.dirname(out_dir))
    try:
        for filename, names in split.filename_to_tensors.items():
            shard = {}
            for name in names:
                array, layer, transpose = arrays[name]
                host = np.asarray(jax.device_get(array if layer is None else array[layer]))
                shard[name] = np.ascontiguousarray(host.T if transpose else host)
            save_file(shard, os.path.join(staging, filename), metadata={"format": "pt"})
            del shard
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(a.size * a.dtype.itemsize for a in shapes.values())},
                     "weight_map": split.tensor_to_filename}
            with open(os.path.join(staging, "model.safetensors.index.json"), "w") as f:
                json.dump(index, f, indent=2, sort_keys=True)
        config = json.loads(model.config.hf_config_json)
        config["dtype"] = str(np.dtype(next(iter(shapes.values())).dtype))
        with open(os.path.join(staging, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if source_path and os.path.isfile(generation := os.path.join(source_path, "generation_config.json")):
            shutil.copyfile(generation, os.path.join(staging, "generation_config.json"))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        _swap_in(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def check_export_target(out_dir: str, source: str | None = None, protected: dict[str, str] | None = None) -> str:
    """The real path of `out_dir` (through a symbolic link: the directory it names is replaced), or
    CheckpointError when an export may not replace it (see `export_pretrained`)."""
    out_dir = os.path.realpath(out_dir)
    protected = {**({"the source model": _resolve(source)} if source else {}), **(protected or {})}
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CheckpointError(f"export output_dir {out_dir} is an existing file: give a directory (a new one, an "
                              f"empty one, or an earlier export)")
    for what, path in protected.items():
        path = os.path.realpath(path)
        if out_dir == path or path.startswith(out_dir + os.sep) or out_dir.startswith(path + os.sep):
            raise CheckpointError(f"export output_dir {out_dir} would write over {what} ({path}): give another "
                                  f"directory")
    entries = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if entries and ("config.json" not in entries or any(os.path.isdir(os.path.join(out_dir, e)) for e in entries)):
        raise CheckpointError(f"export output_dir {out_dir} holds other things than an exported model "
                              f"({', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}); an export replaces "
                              f"the whole directory, so give a new or empty one, or an earlier export")
    return out_dir


def _swap_in(staging: str, out_dir: str) -> None:
    """Put the complete directory `staging` at `out_dir`: the old one (if any) is renamed aside, the new one
    renamed in, then the old one deleted. Only a crash between the two renames leaves no `out_dir`, with the old
    export kept as `.<name>.old-*` beside it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, os.stat(out_dir).st_mode & 0o7777 if os.path.isdir(out_dir) else 0o777 & ~umask)
    if not os.path.exists(out_dir):
        os.rename(staging, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-", dir=os.path.dirname(out_dir))
    os.rmdir(old)  # a free name beside out_dir, on the same file system
    os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
