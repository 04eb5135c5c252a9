"""Where one training step's time goes: XLA's own per-op trace of a compiled step, grouped by kind.

    pip install xprof       # JAX's profiler plugin: without it no per-op trace is written
    python scripts/profile_step.py [any dpo-jax train option]

Builds the Trainer as `dpo-jax train` would, compiles the step for the first batch, runs it twice, traces the
third run and prints the summed time of each kind of XLA operation (matrix multiplies, elementwise fusions,
copies and transposes, the optimizer), the ten slowest operations, and the step's wall time. On the CPU the
runtime overlaps independent operations on its threads, so the sums can exceed the wall time.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from dpo_jax import options
from dpo_jax.trainer import Trainer

DEFAULTS = ["--model_name_or_path", "builtin:smollm2", "--dataset_name", "builtin:sample",
            "--dataset_train_split", "train[:32]", "--dataset_test_split", "none", "--report_to", "none",
            "--save_strategy", "no", "--compilation_cache_dir", "none", "--max_steps", "3"]


def kind(name: str, hlo_op: str) -> str:
    if name.startswith(("ynn_fusion", "dot", "xnn_fusion", "onednn")):
        return "matrix multiplies"
    if "cond/branch" in hlo_op:
        return "optimizer update"
    if name.startswith(("copy", "transpose")):
        return "copies and transposes"
    if "scatter" in name or "gather" in name:
        return "gathers and scatters"
    return "elementwise and reductions"


def main(argv: list[str]) -> None:
    out = tempfile.mkdtemp(prefix="dpo_jax_profile_")
    trainer = Trainer(options.parse(DEFAULTS + ["--output_dir", out + "/run"] + argv))
    batch = {k: jnp.asarray(v) for k, v in trainer.batches.batch(0, 1).items() if k != "index"}
    state, ref = trainer.state, trainer.ref
    step = trainer.train_step.lower(state, ref, batch).compile()
    for _ in range(2):
        state, metrics = step(state, ref, batch)
        jax.block_until_ready(metrics)
    jax.profiler.start_trace(out)
    start = time.perf_counter()
    state, metrics = step(state, ref, batch)
    jax.block_until_ready(metrics)
    wall = time.perf_counter() - start
    jax.profiler.stop_trace()
    traces = glob.glob(f"{out}/plugins/profile/*/*.trace.json.gz")
    if not traces:
        sys.exit("no per-op trace was written: install JAX's profiler plugin with `pip install xprof`")
    ops = []
    for event in json.load(gzip.open(traces[0]))["traceEvents"]:
        args = event.get("args", {})
        if event.get("ph") == "X" and "hlo_op" in args and not event["name"].startswith("end:"):
            ops.append((event["dur"] / 1e3, event["name"]))
    # Each operation's source, from the compiled HLO's metadata: tells the optimizer's update apart.
    op_names = dict(re.findall(r"\n\s*%([\w.-]+) = [^\n]*?op_name=\"([^\"]*)\"", step.as_text()))
    ops = [(ms, name, kind(name, op_names.get(name, ""))) for ms, name in ops]
    shapes = {k: tuple(v.shape) for k, v in batch.items() if k == "input_ids"}
    print(f"step wall time {wall * 1e3:.0f} ms; input_ids {shapes['input_ids']}; {len(ops)} operations run")
    totals = collections.Counter()
    counts = collections.Counter()
    for ms, _, k in ops:
        totals[k] += ms
        counts[k] += 1
    for k, ms in totals.most_common():
        print(f"  {k:28s} {ms:8.0f} ms  {counts[k]:5d} ops")
    print("slowest operations:")
    for ms, name, k in sorted(ops, reverse=True)[:10]:
        print(f"  {ms:8.1f} ms  {name:28s} {op_names.get(name, '')[:90]}")


if __name__ == "__main__":
    main(sys.argv[1:])
