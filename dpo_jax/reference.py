"""Precomputed reference log-probs (`precompute_ref_log_probs`): one pass of the reference model over the
data before training, stored under a key that hashes the reference weights, the compute dtype, and the
tokenized data with its truncation; reused on resume and by any later run with the same three.

The table is float32 [n_pairs, 2] (chosen, rejected), indexed like `pairs.Pairs`; `BatchIterator` attaches
the rows of each batch as `ref_logps`, and the step then needs no reference model in memory. With LoRA, pass
the LoRA graphdef and `(zeroed adapters, base weights)` as the reference state.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .batching import BatchIterator
from .logps import batch_logps
from .pairs import Pairs

CACHE_ENV = "DPO_JAX_CACHE"  # default: ~/.cache/dpo_jax
logger = logging.getLogger(__name__)
FORMAT = "ref-logps-v2"  # part of every key: change it when the log-prob computation changes


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "dpo_jax")) / "ref_logps"


def params_fingerprint(params) -> str:
    """A hash of every parameter's path, dtype, shape and values (of a state, or a tuple of states).

    The values enter through checksums computed where the weights live (`_digest`: a few uint32 sums of each
    array's bits, weighted by position), so only 12 bytes per array reach the host, not the weights (an 8B
    model's would be 32 GB), and an array split over devices or processes gives the same key as a whole one.
    Not a cryptographic hash: it tells different weights apart, which is all a cache key needs."""
    h = hashlib.blake2b(digest_size=10)
    states = params if isinstance(params, tuple) else (params,)
    flat = [kv for state in states for kv in nnx.to_flat_state(state)]
    for path, leaf in sorted(flat, key=lambda kv: str(kv[0])):
        value = leaf.get_value() if hasattr(leaf, "get_value") else leaf
        h.update(f"{path}:{value.dtype}:{value.shape}".encode())
        h.update(np.asarray(jax.device_get(_digest(value))).tobytes())
    return h.hexdigest()


def _digest(x) -> jax.Array:
    """uint32 [3] checksums of an array's bits, computed on its devices (replicated result)."""
    sharding = getattr(x, "sharding", None)
    mesh = sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None
    return _checksums_on(mesh)(x if mesh is not None else jnp.asarray(x))


@functools.lru_cache(maxsize=8)
def _checksums_on(mesh):
    """`_checksums` jitted once per mesh, its result replicated so that every process can read it."""
    if mesh is None:
        return jax.jit(_checksums)
    return jax.jit(_checksums, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _checksums(x: jax.Array) -> jax.Array:
    item = jnp.dtype(x.dtype).itemsize
    if item == 4:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    elif item == 2:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
    elif item == 8:  # float64 (the gradient tests): both halves of each element
        halves = jax.lax.bitcast_convert_type(x, jnp.uint32)
        bits = halves[..., 0] ^ (halves[..., 1] * jnp.uint32(0x9E3779B1))
    elif jnp.issubdtype(x.dtype, jnp.floating):  # float8 / float4 codes: their values, exactly, as float32 bits
        bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    else:  # int8, uint8 and 4-bit integer codes
        bits = x.astype(jnp.uint32)
    # each element's linear index, from iotas in the array's own shape (no reshape: it would regather a
    # sharded array); odd multipliers so that moving a value changes the weighted sums
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, dim) * jnp.uint32(stride % 2**32)
        stride *= x.shape[dim]
    weights = index * jnp.uint32(2654435761) + jnp.uint32(1)
    mixed = (bits ^ (bits >> 15)) * jnp.uint32(0x85EBCA6B)
    return jnp.stack([bits.sum(dtype=jnp.uint32), (bits * weights).sum(dtype=jnp.uint32),
                      (mixed * (weights ^ jnp.uint32(0x27D4EB2F))).sum(dtype=jnp.uint32)])


def cache_key(ref_params: nnx.State, config, pairs: Pairs, compute_dtype, layout: str = "pairs") -> str:
    """Hashes the weights, the model config (RoPE, norms, windows... change log-probs too), the tokenized and
    truncated data (with BOS handling), the compute dtype, the batch layout (its rounding differs) and this
    computation's version."""
    h = hashlib.blake2b(digest_size=10)
    h.update(repr((FORMAT, repr(config), pairs.bos, jnp.dtype(compute_dtype).name, layout)).encode())
    return f"{params_fingerprint(ref_params)}-{pairs.fingerprint}-{h.hexdigest()}"


def precompute(ref_graphdef, ref_params, pairs: Pairs, *, batch_size: int, pad_token_id: int,
               chunk: int | None = None, cache_dirs: list[Path] = (), key: str | None = None,
               mesh=None, layout: str = "pairs", attn_implementation: str = "auto") -> np.ndarray:
    """The reference's (chosen, rejected) log-probs of every pair: read from the first cache directory that has
    `key`, else computed in one ordered pass and written to every cache directory (atomically). With a `mesh`
    the batches are split over its data x fsdp devices; with several processes each builds its own rows and
    every process gets the whole table."""
    table = _cached(cache_dirs, key, len(pairs))
    if jax.process_count() > 1:  # every process computes, or none: the pass is collective
        from jax.experimental import multihost_utils

        if not multihost_utils.process_allgather(np.int32(table is not None)).all():
            table = None
    if table is not None:
        return table
    devices = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    if layout != "pairs" and pairs.truncation.truncation_mode != "keep_start":
        layout = "pairs"
    batches = BatchIterator(pairs, global_batch_size=batch_size, pad_token_id=pad_token_id, shuffle=False,
                            process_index=jax.process_index(), process_count=jax.process_count(), layout=layout,
                            row_multiple=max(1, devices // jax.process_count()), num_buckets=1)  # one length
    fn = functools.partial(_ref_logps, ref_graphdef, chunk=chunk, attn_implementation=attn_implementation)
    if mesh is None:
        step = jax.jit(fn)
    else:  # the values replicated, so that every process reads the whole batch's
        from . import step as S
        from .step import put_batch

        step = jax.jit(S._on_mesh(fn, mesh),
                       out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    table = np.zeros((len(pairs), 2), np.float32)
    for s in range(batches.steps_per_epoch):
        batch = {k: v for k, v in batches.batch(0, s).items() if k != "index"}
        values = np.asarray(step(ref_params, batch if mesh is None else put_batch(batch, mesh)))
        index = batches.order(0)[s * batch_size:(s + 1) * batch_size]  # the whole global batch's pairs
        real = index >= 0
        table[index[real]] = values[real]
    for d in cache_dirs:
        if key and jax.process_index() == 0:
            _save(Path(d) / f"{key}.npy", table)
    return table


def _cached(cache_dirs, key: str | None, n_pairs: int) -> np.ndarray | None:
    """The first usable table under `key`. A damaged file (cut short by a full disk, overwritten) is reported and
    passed over: the table is then computed again and written over it (atomically)."""
    for d in cache_dirs:
        path = Path(d) / f"{key}.npy"
        if not (key and path.exists()):
            continue
        try:
            table = np.load(path, allow_pickle=False)
            problem = _table_problem(table, n_pairs)
        except Exception as e:  # ValueError, EOFError, OSError: cut short, or not a .npy file at all
            problem = f"cannot be read ({type(e).__name__}: {e})"
        if problem is None:
            return table
        logger.warning("the reference log-prob cache %s is damaged: it %s. The reference log-probs are computed "
                       "again and the file replaced.", path, problem)
    return None


def _table_problem(table: np.ndarray, n_pairs: int) -> str | None:
    if table.shape != (n_pairs, 2) or table.dtype != np.float32:
        return f"holds a {table.dtype} array of shape {table.shape}, not float32 [{n_pairs}, 2]"
    return None if np.isfinite(table).all() else "holds non-finite values"


def _ref_logps(graphdef, params, batch: dict, chunk: int | None, attn_implementation: str) -> jax.Array:
    """`params` is the state to merge, or a tuple of states (LoRA: zeroed adapters and the base weights)."""
    states = params if isinstance(params, tuple) else (params,)
    return batch_logps(nnx.merge(graphdef, *states), batch, batch["pair_mask"].shape[0], chunk=chunk,
                       attn_implementation=attn_implementation)["logps"]


def _save(path: Path, table: np.ndarray) -> None:
    """Write atomically; a cache that cannot be written (read-only, full disk) costs only a later recompute."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".ref_logps.", suffix=".npy")
        with os.fdopen(fd, "wb") as f:
            np.save(f, table)
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        logger.warning("the reference log-probs could not be cached in %s (%s); this run goes on without the cache "
                       "(set %s to a writable directory to keep it)", path.parent, e, CACHE_ENV)
