"""The memory planner: per-device memory of a training run, estimated before any weight is loaded or any step
compiled, so a run that cannot fit stops at once with a suggestion instead of failing minutes later.

Parameters, optimizer state and the reference are counted exactly from the model's shapes and their
shardings on the mesh. Activations follow a model of what the step keeps, per device, for one micro-batch of
r rows (sequences) of T tokens (the longest bucket):
- per decoder layer, with nothing recomputed: 3 attention-score buffers r x heads x T x T in float32 (scores,
  probabilities, their gradient) and r x T x (10 hidden + 3 intermediate) values in the compute dtype
  (projections, norms, residuals, the MLP's gate, up and product);
- with `gradient_checkpointing`: each layer keeps only its input (r x T x hidden); one layer's buffers above
  are live at a time, with one attention-score buffer (the blocks' weights are held stacked: the scan reads
  them in place, no copy);
- the output head: 2 buffers r x C x vocab in float32 (a chunk's logits and their gradient), C the chunk;
- the gradient (float32, like the trainable parameters; twice with gradient accumulation: the running sum)
  and one more copy for the optimizer's update.
Checked against XLA's own `compiled.memory_analysis()` of the train step on one CPU device: within 25% over
a range of widths, depths, vocabularies, lengths, batches and accumulation (tests/test_memory.py). On a
multi-device CPU mesh XLA's partitioner adds buffers of its own (whole gathered weights and gradients) that
the plan does not model; accelerators' compilers schedule FSDP gathers per layer, as the plan assumes.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .errors import UserError
from .logps import head_chunks
from .models import family
from .models.layers import LAYERS, Linear
from .sharding import logical_to_spec

GB = 1024 ** 3


@dataclasses.dataclass
class Plan:
    parameters: int  # bytes per device
    gradients: int
    optimizer: int
    reference: int
    activations: int
    batch: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.reference + self.activations + self.batch

    def table(self, limit: int | None, source: str) -> str:
        rows = [("parameters", self.parameters), ("gradients", self.gradients), ("optimizer state", self.optimizer),
                ("reference", self.reference), ("activations", self.activations), ("batch", self.batch),
                ("total", self.total)]
        lines = ["memory plan, per device:"] + [f"  {name:16} {_gb(n):>10}" for name, n in rows]
        if limit:
            lines.append(f"  {'device memory':16} {_gb(limit):>10}  ({source})")
        return "\n".join(lines)


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 2**20:.1f} MB"


def dims(config) -> dict:
    """Layer count and widths of a model config (Llama-style or GPT-2 names)."""
    get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None))  # noqa: E731
    hidden = get("hidden_size", "n_embd")
    heads = get("num_heads", "n_head")
    return {"layers": get("num_layers", "n_layer"), "hidden": hidden, "heads": heads,
            "intermediate": get("intermediate_size", "n_inner") if getattr(config, "n_inner", 1) else 4 * hidden,
            "vocab": config.vocab_size}


def sharded_bytes(config, mesh, param_bytes: int = 4) -> tuple[int, int, int]:
    """(bytes per device of all parameters, parameters of the largest layer, parameter count), from the model's
    abstract shapes and logical axes placed on `mesh` (nothing is allocated)."""
    model = nnx.eval_shape(lambda: family(config.model_type).Model(config, rngs=nnx.Rngs(0)))
    total = count = layer = 0
    for _, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(variable.get_value().shape)
        axes = variable.get_metadata().get("out_sharding") or (None,) * len(shape)
        spec = logical_to_spec(tuple(axes), shape, mesh)
        split = math.prod(mesh.shape[a] for a in spec if a)
        n = math.prod(shape)
        total += n * param_bytes // split
        count += n
        if axes and axes[0] == LAYERS:  # the stacked blocks: one structure, so every layer is the largest
            layer += n // shape[0]
    return total, layer, count


def plan(config, mesh, *, per_device_batch: int, max_length: int, compute_dtype, gradient_accumulation_steps: int = 1,
         gradient_checkpointing: bool = True, lora_params: int | None = None, live_reference: bool = True,
         rows_per_pair: int = 2) -> Plan:
    """The per-device memory of a run: `lora_params` is the adapters' parameter count when training LoRA;
    `live_reference` False when the reference log-probs are precomputed (or LoRA: the base is the reference);
    `rows_per_pair` 2 when chosen and rejected have rows of their own, 1 for the prompt-sharing layouts (whose
    `max_length` is then the row's)."""
    d = dims(config)
    tensor = mesh.shape["tensor"]
    params, largest_layer, count = sharded_bytes(config, mesh)
    devices = mesh.shape["data"] * mesh.shape["fsdp"] * tensor
    trainable = params if lora_params is None else 4 * lora_params // mesh.shape["fsdp"]  # A over fsdp, B mostly
    c = jnp.dtype(compute_dtype).itemsize
    r, t = rows_per_pair * per_device_batch, max_length
    heads, inter, vocab = d["heads"] // tensor or 1, d["intermediate"] // tensor, d["vocab"] // tensor
    scores = r * heads * t * t * 4
    layer = 3 * scores + r * t * (10 * d["hidden"] + 3 * inter) * c
    if gradient_checkpointing:  # block inputs and one block's activations
        layers = d["layers"] * r * t * d["hidden"] * c + (layer - 2 * scores)
    else:
        layers = d["layers"] * layer
    chunk, _ = head_chunks(t, r * devices // tensor, d["vocab"])  # the step sizes chunks from its global shapes
    head = 2 * r * chunk * vocab * 4  # a chunk's logits and their gradient
    gathered = 2 * largest_layer * c if mesh.shape["fsdp"] > 1 else 0  # fsdp: one layer's weights gathered
    gradients = trainable * (2 if gradient_accumulation_steps > 1 else 1)
    batch = r * t * 4 * 5 * gradient_accumulation_steps
    return Plan(parameters=params, gradients=gradients + trainable, optimizer=2 * trainable,
                reference=params if (live_reference and lora_params is None) else 0,
                activations=layers + head + gathered, batch=batch)


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


def check(p: Plan, limit: int | None, *, lora: bool, gradient_checkpointing: bool, live_reference: bool,
          mesh) -> None:
    """Refuse a plan above the device's memory, with what would bring it down."""
    if not limit or p.total <= limit:
        return
    ideas = []
    if not lora:
        ideas.append("--use_peft true (LoRA: no optimizer state or gradients for the base weights, no reference copy)")
    if not gradient_checkpointing:
        ideas.append("--gradient_checkpointing true")
    if live_reference and not lora:
        ideas.append("--precompute_ref_log_probs true (no reference model in memory)")
    if mesh.shape["data"] > 1:
        ideas.append(f"move the data={mesh.shape['data']} devices to fsdp (--mesh fsdp=-1) to shard the weights")
    ideas.append("a smaller per_device_train_batch_size (with more gradient_accumulation_steps) or max_length")
    raise UserError(f"this run needs about {_gb(p.total)} per device (parameters {_gb(p.parameters)}, optimizer "
                    f"{_gb(p.optimizer)}, gradients {_gb(p.gradients)}, reference {_gb(p.reference)}, activations "
                    f"{_gb(p.activations)}) and a device holds {_gb(limit)}. Try: " + "; ".join(ideas) + ".")


def compiled_bytes(compiled) -> int:
    """What XLA allocates per device for a compiled step: its arguments and outputs (less what the outputs
    alias, the donated state) and its temporaries."""
    m = compiled.memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


def lora_param_count(config, rank: int, targets) -> int:
    """Adapters' parameter count: rank x (in + out) per targeted linear layer."""
    model = nnx.eval_shape(lambda: family(config.model_type).Model(config, rngs=nnx.Rngs(0)))
    total = 0
    for path, module in nnx.iter_graph(model):
        name = str(path[-1]) if path else ""
        if isinstance(module, Linear) and name != "lm_head" and (targets == "all-linear" or name in targets):
            *layers, d_in, d_out = module.kernel.get_value().shape  # layers: (L,) for the stacked blocks
            total += math.prod(layers) * rank * (d_in + d_out)
    return total

