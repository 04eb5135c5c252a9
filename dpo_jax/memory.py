"""The memory of a training run, from the compiler: the run's own train step is built abstractly (shapes and
shardings, no weight read or allocated) and compiled for the run's mesh, and XLA's `memory_analysis()` says
what one device holds: its arguments (parameters, optimizer state, reference, batch), its outputs (the new
state, aliased to the donated old one) and its temporaries (activations, gradients, gathered weights).

`dpo-jax train` compiles the step this way for the run's largest batch shape before it loads any weight,
refuses a run that does not fit with what would bring it down, and keeps the compiled step for training
(`jax.jit` reuses it for that shape). `dpo-jax plan` (plan.py) does the same for a TPU topology.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import lora, sharding
from . import step as S
from .errors import UserError
from .hf import layer_kinds
from .models import family, quant
from .config import frozen_quantization

GB = 1024 ** 3


class AbstractRun(NamedTuple):
    """The train step's inputs as `jax.ShapeDtypeStruct`s with shardings, and what the step is built from."""

    graphdef: Any
    ref_graphdef: Any  # None with LoRA (the base is the reference) or without a live reference
    state: S.TrainState
    ref: Any  # the reference's parameters (LoRA: (dropout keys, base weights)); None when not live
    batch: dict


def _abstract(tree, mesh):
    """`tree`'s variables holding shapes with the shardings their logical axes give on `mesh` (the structure of
    the arrays the loader places there, so that the step compiled for one is the step of the other)."""
    shardings = S.state_shardings(tree, mesh)
    return jax.tree.map(lambda v, s: v.replace(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s)), tree, shardings,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def frozen_dtype(o, compute):
    """The dtype the frozen weights' matrices are held in: the reference's, and a LoRA run's base."""
    return compute if o.run.ref_dtype == "auto" else jnp.dtype(o.run.ref_dtype)


def held_in_frozen_dtype(variable) -> bool:
    """Whether a frozen weight is held in the frozen dtype: a float matrix (2+ dimensions per layer); vectors stay
    as loaded, quantised codes and their scales as quantised (models/quant.py)."""
    return sharding.is_matrix(variable) and not isinstance(variable, quant.Quantized)


def _held_frozen(tree, dtype):
    """As trainer.hold_frozen holds them: float matrices in `dtype`, the rest as loaded."""
    def hold(variable):
        x = variable.get_value()
        return variable.replace(jax.ShapeDtypeStruct(x.shape, dtype if held_in_frozen_dtype(variable) else x.dtype,
                                                     sharding=x.sharding))
    return jax.tree.map(hold, tree, is_leaf=sharding.is_variable)


def abstract_models(o, config, ref_config, mesh, dtype, remat: bool):
    """(graphdef, params, ref_graphdef, ref) of the run as the trainer builds them (trainer.build_models), from
    the configs alone. `ref_config` None: no live reference (precomputed log-probs, or reference-free)."""
    kind = frozen_quantization(o)
    if kind == quant.GGUF:  # each layer's kind from the tensor types of the file that is held quantised
        if o.lora.use_peft:
            kind = layer_kinds(o.run.model_name_or_path, kind)
        elif ref_config is not None:
            kind = layer_kinds(o.run.ref_model_name_or_path or o.run.model_name_or_path, kind)
        else:  # no live reference: nothing is held quantised
            kind = None

    def build(cfg, with_adapters: bool, quantization=None):
        model = family(cfg.model_type).Model(cfg, dtype=dtype, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        quant.quantize_linears(model, quantization)  # inside eval_shape: traced, never run
        if with_adapters:
            lora.apply_lora(model, o.lora.lora_r, o.lora.lora_alpha, lora_targets(o), o.lora.lora_dropout,
                            seed=o.run.seed)
        return model

    policy = nnx.eval_shape(lambda: build(config, o.lora.use_peft, kind if o.lora.use_peft else None))
    if o.lora.use_peft:
        graphdef, adapters, (keys, base) = lora.split_lora(policy, remat)
        base = _held_frozen(_abstract(base, mesh), frozen_dtype(o, dtype))
        return graphdef, _abstract(adapters, mesh), None, (_abstract(keys, mesh), base)
    ref_graphdef = ref = None
    if ref_config is not None:
        ref_model = (policy if ref_config is config and kind is None
                     else nnx.eval_shape(lambda: build(ref_config, False, kind)))
        ref_graphdef, ref = S.split_reference(ref_model, remat)
        ref = _held_frozen(_abstract(ref, mesh), frozen_dtype(o, dtype))
    graphdef, params = S.split_policy(policy, remat)
    return graphdef, _abstract(params, mesh), ref_graphdef, ref


def lora_targets(o):
    """lora_target_modules as `apply_lora` takes it: None (PEFT's default), "all-linear", or names."""
    targets = o.lora.lora_target_modules
    return lora.ALL_LINEAR if targets == (lora.ALL_LINEAR,) else targets or None


def abstract_state(params, tx) -> S.TrainState:
    """The training state `step.init_state` builds from `params`, as shapes with its shardings."""
    zero = jnp.zeros((), jnp.int32)
    shapes = jax.eval_shape(lambda p: S.TrainState(zero, p, tx.init(p), zero, zero), params)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                        S.train_state_shardings(params, tx))


def batch_shapes(layout: str, pairs: int, length: int, rows: int | None = None,
                 ref_logps: bool = False) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{name: (shape, dtype)} of a global batch of `pairs` pairs in batching.py's `layout` with rows of
    `length` tokens (`rows`: the packed layout's row count, default one row per pair)."""
    i32 = np.int32
    if layout not in ("pairs", "shared_prefix", "packed"):
        raise UserError(f"pack_pairs must be pairs, shared_prefix or packed, not {layout!r}")
    row_count = {"pairs": 2 * pairs, "shared_prefix": pairs, "packed": rows or pairs}[layout]
    out = {k: ((row_count, length), i32) for k in ("input_ids", "position_ids", "segment", "branch", "source")}
    out["pair_mask"] = ((pairs,), i32)
    if ref_logps:
        out["ref_logps"] = ((pairs, 2), np.float32)
    return out


def abstract_run(o, config, ref_config, mesh, dtype, tx, *, length: int, rows: int | None = None,
                 remat: bool) -> AbstractRun:
    """The run's step inputs for its global batch with rows of `length` tokens, on `mesh`."""
    graphdef, params, ref_graphdef, ref = abstract_models(o, config, ref_config, mesh, dtype, remat)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    pairs = o.run.per_device_train_batch_size * batch_devices * o.run.gradient_accumulation_steps
    placed = S.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype_, sharding=placed) for k, (shape, dtype_) in
             batch_shapes(o.run.pack_pairs, pairs, length, rows, ref_logps=o.run.precompute_ref_log_probs).items()}
    return AbstractRun(graphdef, ref_graphdef, abstract_state(params, tx), ref, batch)


def live_reference(o) -> bool:
    """Whether the step runs a reference model (not precomputed log-probs, not reference-free); LoRA's base
    weights are held either way, as the policy's own."""
    return not (o.run.precompute_ref_log_probs or o.loss.reference_free)


class OutOfMemory(Exception):
    """The compiler refused the step: it needs more memory than the device has (XLA's RESOURCE_EXHAUSTED, whose
    message lists the largest buffers)."""

    def __init__(self, report: str, run: AbstractRun, remat: bool):
        super().__init__(report)
        self.report, self.run, self.remat = report, run, remat


class Step(NamedTuple):
    """The run's train step compiled for one batch shape: `fn` is the jitted step (called with arrays of that
    shape it reuses `compiled`), `usage` its memory per device."""

    fn: Any
    compiled: Any
    run: AbstractRun
    usage: "Usage"
    remat: bool
    seconds: float  # compile time


def compile_step(o, config, ref_config, mesh, dtype, tx, *, length: int, rows: int | None = None,
                 remat: bool) -> Step:
    """The run's train step (step.compile_train_step, as the trainer runs it) lowered for its abstract inputs and
    compiled for `mesh`'s devices. Raises OutOfMemory when the compiler finds that it does not fit."""
    import time

    run = abstract_run(o, config, ref_config, mesh, dtype, tx, length=length, rows=rows, remat=remat)
    cfg = S.StepConfig(loss=o.loss, gradient_accumulation_steps=o.run.gradient_accumulation_steps,
                       gradient_checkpointing=remat, lora=o.lora.use_peft, seed=o.run.seed,
                       attn_implementation=o.run.attn_implementation)
    fn = S.compile_train_step(run.graphdef, run.ref_graphdef, cfg, tx, mesh, run.state, run.ref)
    start = time.perf_counter()
    try:
        compiled = fn.lower(run.state, run.ref, run.batch).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        raise OutOfMemory(str(e), run, remat) from None
    return Step(fn, compiled, run, Usage.of(compiled, run), remat, time.perf_counter() - start)


def fitting_step(compile_with, remat: bool | None, limit: int | None) -> Step:
    """`compile_with(remat=...)` for the run's `gradient_checkpointing`; None (the default) compiles without
    remat first, since recomputing costs a forward pass, and with it only when that step does not fit in 80% of
    `limit` (or the compiler refuses it) and remat needs less."""
    if remat is not None:
        return compile_with(remat=remat)
    try:
        off = compile_with(remat=False)
    except OutOfMemory:
        return compile_with(remat=True)
    if limit is None or off.usage.total <= 0.8 * limit:
        return off
    try:
        on = compile_with(remat=True)
    except OutOfMemory:
        return off
    return on if on.usage.total < off.usage.total else off  # weights-bound runs gain nothing from remat


def per_device_bytes(tree) -> int:
    """Bytes one device holds of the arrays (or ShapeDtypeStructs with shardings) in `tree`: each leaf's
    shard shape on its mesh, the largest shard where they differ. 4-bit codes count half a byte where XLA packs
    them (TPU, GPU) and a byte on the CPU, which holds one per byte."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        placed = getattr(leaf, "sharding", None)
        shard = placed.shard_shape(leaf.shape) if placed else leaf.shape
        bits = jax.dtypes.itemsize_bits(leaf.dtype)
        if bits < 8 and (placed is None or next(iter(placed.device_set)).platform == "cpu"):
            bits = 8
        total += math.prod(shard) * bits // 8
    return total


@dataclasses.dataclass(frozen=True)
class Usage:
    """Bytes per device of a compiled step, as XLA allocates them, and its arguments by kind."""

    argument: int
    output: int
    alias: int  # outputs written into donated arguments (the state): not allocated twice
    temp: int
    parts: dict  # arguments by kind: parameters, optimizer state, reference, batch (our own count)

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp

    @classmethod
    def of(cls, compiled, run: AbstractRun) -> "Usage":
        m = compiled.memory_analysis()
        parts = {"parameters": per_device_bytes(run.state.params),
                 "optimizer state": per_device_bytes((run.state.opt_state, run.state.step, run.state.nonfinite_run,
                                                      run.state.nonfinite_total)),
                 "reference": per_device_bytes(run.ref), "batch": per_device_bytes(run.batch)}
        return cls(m.argument_size_in_bytes, m.output_size_in_bytes, m.alias_size_in_bytes, m.temp_size_in_bytes,
                   parts)

    def table(self, limit: int | None, source: str, title: str = "memory, per device (XLA's compiled step):",
              indent: str = "  ") -> str:
        rows = [("arguments", self.argument)] + [(f"  {k}", v) for k, v in self.parts.items()]
        rows += [("outputs", self.output), ("  aliased", self.alias), ("temporaries", self.temp),
                 ("total", self.total)]
        lines = [title] + [f"{indent}{name:18} {gb(n):>11}" for name, n in rows]
        if limit:
            lines.append(f"{indent}{'device memory':18} {gb(limit):>11}  ({source})")
        return "\n".join(lines)


def gb(n: int) -> str:
    """Bytes as GiB, MiB below a tenth of a GiB, KiB below a tenth of a MiB."""
    if n >= GB / 10:
        return f"{n / GB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 / 10 else f"{n / 2**10:.1f} KiB"


def device_memory(limit_gb: float | None = None) -> tuple[int | None, str]:
    """(bytes one device can hold, where that figure comes from)."""
    if limit_gb:
        return int(limit_gb * GB), "memory_limit_gb"
    stats = jax.local_devices()[0].memory_stats() or {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{jax.local_devices()[0].device_kind}"
    try:  # the CPU: its devices share the host's memory (MemAvailable counts the page cache it may reclaim)
        fields = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None, "unknown"
    if jax.process_count() > 1:  # every process must take the same decision
        from jax.experimental import multihost_utils

        mib = multihost_utils.process_allgather(np.int32(available // 2**20))  # int32: JAX's default ints
        available = int(np.asarray(mib).min()) * 2**20
    return available // jax.local_device_count(), f"host memory available / {jax.local_device_count()} devices"


def suggestions(o, mesh, remat: bool) -> list[str]:
    """What would bring a run's memory down, for the settings it has."""
    ideas = []
    if not o.lora.use_peft:
        ideas.append("--use_peft true (LoRA: no optimizer state or gradients for the base weights, no reference copy)")
    if not remat:
        ideas.append("--gradient_checkpointing true")
    if live_reference(o) and not o.lora.use_peft:
        ideas.append("--precompute_ref_log_probs true (no reference model in memory)")
    if mesh.shape["data"] > 1:
        ideas.append(f"move the data={mesh.shape['data']} devices to fsdp (--mesh fsdp=-1) to shard the weights")
    ideas.append("a smaller per_device_train_batch_size (with more gradient_accumulation_steps) or max_length")
    return ideas


def check(step: Step, limit: int | None, o, mesh) -> None:
    """Refuse a run whose compiled step needs more than a device holds, with what would bring it down."""
    usage = step.usage
    if not limit or usage.total <= limit:
        return
    args = ", ".join(f"{k} {gb(v)}" for k, v in usage.parts.items())
    raise UserError(f"this run needs {gb(usage.total)} per device (XLA's compiled train step: arguments "
                    f"{gb(usage.argument)} ({args}), temporaries {gb(usage.temp)}) and a device holds {gb(limit)}. "
                    f"Try: " + "; ".join(suggestions(o, mesh, step.remat)) + ".")


def refuse_out_of_memory(error: OutOfMemory, o, mesh) -> UserError:
    """The compiler's refusal as a user error: XLA's account of the largest buffers, and what to change."""
    return UserError(f"the compiler finds that this run's train step does not fit in a device's memory:\n"
                     f"{largest_buffers(error.report)}\nTry: " + "; ".join(suggestions(o, mesh, error.remat)) + ".")


def largest_buffers(report: str, lines: int = 40) -> str:
    """The useful part of XLA's RESOURCE_EXHAUSTED message: the totals and the largest allocations."""
    text = report.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
    kept = text.splitlines()
    return "\n".join(kept[:lines] + ([f"... ({len(kept) - lines} more lines)"] if len(kept) > lines else []))


def release_freed_host_memory() -> None:
    """Hand the host memory that loading and compiling have freed back to the operating system. glibc keeps
    freed memory in its per-thread arenas, and XLA's compiler threads leave a few hundred MB there that the
    step's buffers (allocated apart) never reuse: on the CPU that is resident memory for the whole run
    (`dpo-jax bench`, SmolLM2: peak RSS 4.62 -> 4.42 GB). Nothing happens where the C library has no
    malloc_trim (macOS, musl)."""
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)

