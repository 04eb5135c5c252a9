"""`dpo-jax plan`: the memory and cost of a training run before anyone pays for the devices.

The run's own train step (memory.compile_step, the trainer's code path) is built from the model's config.json
alone, its inputs as shapes with shardings, and compiled for a TPU topology by libtpu's compiler (which runs on
any machine: `pip install "dpo-jax[plan]"`) or for this machine's devices. It reports per chip what XLA
allocates (arguments, outputs, temporaries, total against HBM), whether it fits, the step's FLOPs with every
loop counted as often as it runs, the bytes its collectives move, and the compile time; when it does not fit,
XLA's list of the largest buffers and what to change.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import UserError

GIB = 1024 ** 3
# HBM per chip by device kind: the compile-only devices report no memory_stats
HBM = {"TPU v4": 32 * GIB, "TPU v5 lite": 16 * GIB, "TPU v5": 95 * GIB, "TPU v6 lite": 32 * GIB}
INSTALL = 'pip install "dpo-jax[plan]" (in a checkout: pip install -e ".[plan]")'
# Cloud TPU accelerator types: v4 and v5p count TensorCores (two per chip), v5e and v6e count chips
_ACCELERATOR = re.compile(r"^(v4|v5p|v5litepod|v5e|v6e)-(\d+)$")
_LIBTPU_NAME = re.compile(r"^(v4|v5p|v5e|v6e):(\d+(?:x\d+)+)$")
_GENERATION = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v5e": "v5e", "v6e": "v6e"}


def topology_name(name: str) -> str:
    """libtpu's topology name for `name`: one already (`v5p:2x2x2`), or a Cloud TPU accelerator type (`v5p-16`:
    8 chips, 2x2x2; `v5litepod-8`: 2x4). Accelerator types of power-of-two sizes take Cloud TPU's default
    shapes; give other shapes in libtpu's form."""
    if _LIBTPU_NAME.match(name):
        return name
    m = _ACCELERATOR.match(name)
    if not m:
        raise UserError(f"--topology {name!r} is neither a TPU topology (v5p:2x2x2, v5e:2x4, v4:2x2x1, v6e:2x2) nor "
                        f"a Cloud TPU accelerator type (v5p-16, v5litepod-8, v4-8, v6e-8)")
    generation, count = _GENERATION[m.group(1)], int(m.group(2))
    three_d = generation in ("v4", "v5p")
    chips = count // 2 if three_d else count
    smallest = 4 if three_d else 1
    if (three_d and count % 2) or chips < smallest or chips & (chips - 1):
        raise UserError(f"--topology {name}: {'TensorCores' if three_d else 'chips'} {count} is not a size whose "
                        f"shape dpo-jax knows; give the topology as libtpu names it, e.g. "
                        f"{'v5p:4x4x8' if three_d else 'v5e:4x8'}")
    dims = [2, 2, 1] if three_d else [1, 1]
    while dims[0] * dims[1] * (dims[2] if three_d else 1) < chips:  # Cloud TPU's shapes: double the smallest side
        low = min(dims)
        dims[max(i for i, d in enumerate(dims) if d == low)] *= 2
    return f"{generation}:{'x'.join(map(str, dims))}"


def accelerator_type(libtpu_name: str) -> str:
    """The Cloud TPU accelerator type of a libtpu topology name (v5p:2x2x2 -> v5p-16)."""
    generation, shape = libtpu_name.split(":")
    chips = 1
    for d in shape.split("x"):
        chips *= int(d)
    return f"{generation}-{2 * chips if generation in ('v4', 'v5p') else chips}"


def quiet_libtpu(topology: str | None) -> None:
    """For the CLI, before jax starts: on a machine that is not a TPU VM, libtpu asks the metadata server for the
    accelerator type and worker hostnames and warns that it found none. Telling it (the topology's own type,
    this host) silences that; the CPU stays the backend. Values the environment already sets are kept."""
    import os

    if topology is None:
        return
    if "JAX_PLATFORMS" not in os.environ:  # jax read its environment when imported: set its option instead
        import jax

        jax.config.update("jax_platforms", "cpu")
    try:
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(topology_name(topology)))
    except UserError:
        return  # reported with the command's own error
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) meant for processes driving TPU chips; compiling
    # drives none, so several plans (or a plan and a test run) may share the machine
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def tpu_devices(name: str) -> tuple[list, str]:
    """(the abstract devices of a TPU topology, its libtpu name), from libtpu's compiler; no TPU needed."""
    libtpu_name = topology_name(name)
    try:
        import libtpu  # noqa: F401  (the TPU compiler; jax loads it from there)
    except ImportError:
        raise UserError(f"--topology needs the TPU compiler (libtpu), which is not installed: {INSTALL}") from None
    import jax
    from jax.experimental import topologies

    generation, shape = libtpu_name.split(":")
    options = {}
    if generation == "v4":  # one device per chip (its two TensorCores as one), as JAX on a v4 VM
        options["chip_config_name"] = "megacore"
    if all(d == "1" for d in shape.split("x")):
        options["chips_per_host_bounds"] = (1, 1, 1)
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name, **options).devices), \
            libtpu_name
    except jax.errors.JaxRuntimeError as e:
        first = str(e).splitlines()[0][:300]
        if "INVALID_ARGUMENT" in first:
            raise UserError(f"--topology {name}: libtpu does not accept {libtpu_name} ({first})") from None
        raise UserError(f"--topology {name}: libtpu could not start its compiler: {first}") from None


def plan_length(o) -> tuple[int, int | None]:
    """(row length, packed rows) of the longest batch the options allow, without data: pairs are rows of
    max_length; the prompt-sharing layouts hold prompt, chosen and rejected in one row of up to twice that
    (packed: one such row per pair, the most rows it packs into)."""
    if o.data.max_length is None:
        raise UserError("plan needs --max_length (the batch shapes come from it)")
    return o.data.max_length * (1 if o.run.pack_pairs == "pairs" else 2), None


def plan(o, topology: str | None = None) -> dict:
    """The figures of a run's train step compiled for `topology` (or this machine's devices), printed; the same
    as JSON-ready values."""
    import jax
    import jax.numpy as jnp

    from . import hlo, memory
    from . import step as S
    from .hf import load_config
    from .config import frozen_quantization
    from .models import quant
    from .models.attention import choose_implementation
    from .sharding import check_mesh, make_mesh, parse_mesh

    if not o.run.model_name_or_path:
        raise UserError("plan needs --model_name_or_path (a directory holding the model's config.json is enough)")
    config = load_config(o.run.model_name_or_path, trust_remote_code=o.run.trust_remote_code)
    ref_config = None
    if not o.run.precompute_ref_log_probs and not o.lora.use_peft:
        ref_path = o.run.ref_model_name_or_path
        ref_config = config if not ref_path or ref_path == o.run.model_name_or_path else \
            load_config(ref_path, trust_remote_code=o.run.trust_remote_code)
    if topology:
        devices, name = tpu_devices(topology)
        kind = devices[0].device_kind
        hbm, source = (int(o.run.memory_limit_gb * GIB), "memory_limit_gb") if o.run.memory_limit_gb else \
            (HBM.get(kind), f"{kind} HBM")
    else:
        devices, name = jax.devices(), f"this machine ({jax.default_backend()})"
        kind = devices[0].device_kind
        hbm, source = memory.device_memory(o.run.memory_limit_gb)
    mesh = make_mesh(**parse_mesh(o.run.mesh), devices=devices)
    check_mesh(mesh, config, per_device_batch=o.run.per_device_train_batch_size)
    bf16 = o.run.bf16 if o.run.bf16 is not None else (topology is not None or jax.default_backend() != "cpu")
    dtype = jnp.bfloat16 if bf16 else jnp.float32
    tx = S.make_optimizer(o.optim, max(o.run.max_steps, 1))  # the schedule's length changes no shape
    length, rows = plan_length(o)
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    pairs = o.run.per_device_train_batch_size * batch_devices * o.run.gradient_accumulation_steps
    shown_mesh = ",".join(f"{k}={v}" for k, v in mesh.shape.items())
    quantization = frozen_quantization(o)
    frozen = "" if quantization is None else (f", {'QLoRA base' if o.lora.use_peft else 'reference'} "
                                              f"{quant.describe(quantization)}")
    attention = choose_implementation(o.run.attn_implementation, length, backend=devices[0].platform)
    if attention != o.run.attn_implementation:
        attention = f"{o.run.attn_implementation} ({attention})"
    print(f"plan: {o.run.model_name_or_path} on {name}: {len(devices)} chips ({kind}), mesh {shown_mesh}\n"
          f"  {pairs} pairs per step ({o.run.per_device_train_batch_size} per device x {batch_devices} x "
          f"{o.run.gradient_accumulation_steps} accumulation), pack_pairs {o.run.pack_pairs}, rows of {length} "
          f"tokens, {'bfloat16' if bf16 else 'float32'} compute, {'LoRA' if o.lora.use_peft else 'full fine-tune'}, "
          f"reference {'precomputed' if o.run.precompute_ref_log_probs else 'live'}{frozen}, attention {attention}",
          flush=True)
    figures = {"topology": name, "chips": len(devices), "device_kind": kind, "mesh": dict(mesh.shape),
               "pairs_per_step": pairs, "row_length": length, "hbm": hbm, "hbm_source": source,
               "attn_implementation": attention, "frozen_quantization": quantization or "none"}

    def compile_with(remat: bool):
        print(f"  compiling the train step (gradient_checkpointing {str(remat).lower()}) ...", flush=True)
        return memory.compile_step(o, config, ref_config, mesh, dtype, tx, length=length, rows=rows, remat=remat)

    try:
        step = memory.fitting_step(compile_with, o.run.gradient_checkpointing, hbm)
    except memory.OutOfMemory as e:
        parts = {k: memory.per_device_bytes(v) for k, v in
                 (("parameters", e.run.state.params), ("optimizer state", e.run.state.opt_state),
                  ("reference", e.run.ref), ("batch", e.run.batch))}
        figures.update(fits=False, gradient_checkpointing=e.remat, argument=sum(parts.values()), temp=None,
                       total=None, arguments=parts, flops=None, collective_bytes=None, compile_seconds=None,
                       largest_buffers=memory.largest_buffers(e.report))
        print("\n".join([f"  arguments per chip: {memory.gb(figures['argument'])} ("
                         + ", ".join(f"{k} {memory.gb(v)}" for k, v in parts.items()) + ")",
                         "  DOES NOT FIT: the compiler reports", "", figures["largest_buffers"], "",
                         "  to bring it down: " + "; ".join(memory.suggestions(o, mesh, e.remat))]))
        return figures
    usage = step.usage
    client = jax.devices("cpu")[0].client  # XLA's cost analysis is the same on every backend
    counted = hlo.analyse(step.compiled.as_text(), client)
    fits = hbm is None or usage.total <= hbm
    # the model's weights, for the gathers in copies of them: the policy's, or a LoRA run's base (its reference)
    weights = max(sum(x.size for x in jax.tree.leaves(tree)) for tree in (step.run.state.params, step.run.ref))
    figures.update(fits=fits, gradient_checkpointing=step.remat, argument=usage.argument, output=usage.output,
                   alias=usage.alias, temp=usage.temp, total=usage.total, arguments=usage.parts,
                   flops=counted.flops, flops_loops_once=counted.flops_once,
                   loop_trip_counts=[n for _, n in counted.loops], collective_bytes=counted.collectives,
                   collective_roles=counted.roles, model_parameters=weights,
                   compile_seconds=round(step.seconds, 1))
    print(usage.table(hbm, source, title=f"  memory per chip (XLA, gradient_checkpointing {str(step.remat).lower()}):",
                      indent="    "))
    if hbm and fits:
        print(f"  fits: {memory.gb(usage.total)} of {memory.gb(hbm)} ({100 * (1 - usage.total / hbm):.0f}% free)")
    elif hbm:
        print(f"  DOES NOT FIT: {memory.gb(usage.total)} of {memory.gb(hbm)}; try: "
              + "; ".join(memory.suggestions(o, mesh, step.remat)))
    loops = ", ".join(str(n) for _, n in counted.loops) or "none"
    flops = "unknown (a loop could not be counted)" if counted.flops is None else f"{counted.flops:.4g}"
    print(f"  FLOPs per chip per step: {flops} (XLA's count, each loop once: {counted.flops_once:.4g}; loop trip "
          f"counts {loops})")
    print("  collectives per chip per step: " + (", ".join(f"{k} {memory.gb(v)}" for k, v in
                                                           counted.collectives.items() if v) or "none"))
    roles = counted.roles
    itemsize, compute = jnp.dtype(dtype).itemsize, jnp.dtype(dtype).name
    print(f"    by what they do: gathers {memory.gb(roles['gather'])} "
          f"({roles['gather'] / (itemsize * weights):.2f} {compute} copies of the model's "
          f"{f'{weights / 1e9:.2f}B' if weights >= 1e9 else f'{weights / 1e6:.1f}M'} weights), reductions {memory.gb(roles['reduce'])}, exchanges {memory.gb(roles['exchange'])}  "
          f"(collective-permutes counted by the ring they belong to)")
    print(f"  compile time {step.seconds:.1f} s")
    return figures


def write_json(figures: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=1) + "\n")


PLAN_FLAGS = ("topology", "output_json")  # plan's own, besides the train options


def main(argv: list[str]) -> int:
    """`dpo-jax plan [--topology T] [--output_json F] <train options>`: 0 when the run fits, 1 when not."""
    from . import options

    flags, rest = options.split_flags(argv, PLAN_FLAGS)
    topology, output = flags["topology"], flags["output_json"]
    given = options.parse_values(rest)
    o = options.from_dict(given)
    figures = plan(o, topology)
    if output:
        write_json(figures, output)
        print(f"wrote {output}")
    return 0 if figures["fits"] else 1


def own_topology(argv: list[str]) -> str | None:
    """--topology of a plan command line, read before anything starts jax (for `quiet_libtpu`)."""
    from . import options

    try:
        return options.split_flags(argv, PLAN_FLAGS)[0]["topology"]
    except UserError:
        return None

