"""`dpo-jax bench`: how fast dpo-jax trains, and (`--vs trl`) TRL's DPOTrainer side by side on the same model,
data and settings.

Each side trains in its own process (so its peak resident memory is its own) for `--bench_epochs` epochs over
the same pairs (default 2); the last epoch is measured, so both sides time the same pairs and every compile
falls in the first epoch. Reported per side:

- pairs/s and tokens/s over the measured epoch (real tokens the step computes: padding excluded, a shared
  prompt counted once), and the median step time (ours: from the moment the step before's metrics came back
  to the moment its own did, as the loop dispatches each step before it reads the one before; so the steps'
  times add up to the epoch's wall time);
- useful FLOP/s: per real token 2P + 4 L A (p + 1) for a forward pass (P matmul parameters including the
  output head, L layers, A = heads x head dim, p the token's position), times 3 for the policy's forward and
  backward, plus 1 for a live reference; recomputation (remat) is not counted as useful;
- its fraction of the matrix-multiply peak that the same process measures first (a 4096 x 4096 float32
  matmul through the side's own library: XLA, or torch for TRL). Tokens/s and FLOP/s count the work each
  side does (prompt sharing computes a prompt once where TRL computes it twice): pairs/s is the like-for-like
  figure;
- compiled shapes of the train step, backend compiles and their time, compiles after the first epoch (ours);
- the reference precompute pass, when `--precompute_ref_log_probs true`;
- peak resident memory (`ru_maxrss`) of the process.

TRL and torch are benchmark-only dependencies: `pip install torch==2.13.0 trl` (torch first). TRL runs with
`bf16=False` and `gradient_checkpointing=False` (its fastest float32 setting) unless `--trl_gradient_checkpointing
true`. The options dpo-jax and TRL share (beta, learning_rate, max_length, per_device_train_batch_size, loss_type,
...) are passed to both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import UserError

RESULT = "DPO_JAX_BENCH_RESULT "
# Options passed to TRL's DPOConfig as well (same names, same meanings).
SHARED = ("learning_rate", "beta", "loss_type", "max_length", "per_device_train_batch_size", "max_steps",
          "gradient_accumulation_steps", "seed", "precompute_ref_log_probs", "lr_scheduler_type", "warmup_steps",
          "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "label_smoothing")
# Always set for a measurement: no evaluation, logs or checkpoints, no caches from earlier runs.
FORCED = {"report_to": "none", "save_strategy": "no", "dataset_test_split": "none", "compilation_cache_dir": "none",
          "logging_steps": "1000000"}
DEFAULTS = {"model_name_or_path": "builtin:smollm2", "dataset_name": "builtin:sample",
            "dataset_train_split": "train[:32]", "per_device_train_batch_size": "4"}


# ---------------------------------------------------------------------------------------------- measurement
def summarize(steps: list[dict], epochs: int) -> dict:
    """Figures of the measured steps: those of the last epoch, or with a single epoch (`--bench_steps`) every
    step after the first that compiled nothing."""
    if not steps:
        raise UserError("the benchmark trained no step: give it data (--dataset_train_split) and --bench_epochs or "
                        "--bench_steps of at least 1")
    last = max(s["epoch"] for s in steps)
    if epochs > 1 and last < epochs - 1:
        raise UserError(f"training stopped in epoch {last + 1} of {epochs} (after {len(steps)} steps: --max_steps?), "
                        f"so the epoch to measure, the last, never ran. Drop --max_steps, or measure steps within "
                        f"one epoch with --bench_steps N")
    measured = [s for s in steps if s["epoch"] == last] if epochs > 1 else [s for s in steps[1:] if not s["compiles"]]
    if not measured:
        raise UserError(f"no step to measure: of the {len(steps)} steps trained, the first and every one that "
                        f"compiled a new batch shape are not timed, and that left none. Give a larger --bench_steps, "
                        f"or measure a whole second epoch (--bench_epochs 2 without --bench_steps)")
    seconds = sum(s["seconds"] for s in measured)
    return {"measured_steps": len(measured), "seconds": seconds,
            "pairs_per_second": sum(s["pairs"] for s in measured) / seconds,
            "tokens_per_second": sum(s["tokens"] for s in measured) / seconds,
            "useful_gflops": sum(s["flops"] for s in measured) / seconds / 1e9,
            "step_seconds_median": statistics.median(s["seconds"] for s in measured)}


def token_flops(positions, matmul_params: int, layers: int, attention_width: int, passes: int) -> float:
    """Useful FLOPs of `passes` forward-equivalents over real tokens at `positions` (a flat array)."""
    return passes * float((2 * matmul_params + 4 * layers * attention_width * (positions + 1)).sum())


def max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def xla_matmul_peak(n: int = 4096, repeats: int = 7) -> float:
    """GFLOP/s of an n x n float32 matmul through XLA, median of `repeats`."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def dims(config) -> dict:
    """Layer count and widths of a model config (Llama-style or GPT-2 names), for the FLOP count."""
    get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None))  # noqa: E731
    hidden = get("hidden_size", "n_embd")
    heads = get("num_heads", "n_head")
    return {"layers": get("num_layers", "n_layer"), "hidden": hidden, "heads": heads,
            "intermediate": get("intermediate_size", "n_inner") if getattr(config, "n_inner", 1) else 4 * hidden,
            "vocab": config.vocab_size}


def run_ours(option_args: list[str], epochs: int) -> dict:
    """Train with dpo-jax for `epochs` epochs and measure (in this process)."""
    import jax
    import numpy as np

    from . import losses, options
    from .hf import load_config
    from .trainer import Trainer

    peak = xla_matmul_peak()
    compiles: list[tuple[float, float]] = []  # (end time, seconds) of every XLA backend compile
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, seconds, **_: compiles.append((time.perf_counter(), seconds))
        if event == "/jax/core/compile/backend_compile_duration" else None)
    started = time.perf_counter()
    o = options.parse(option_args + ["--num_train_epochs", str(epochs)])
    trainer = Trainer(o)
    config = load_config(o.run.model_name_or_path, trust_remote_code=o.run.trust_remote_code)
    d = dims(config)
    matmul, width = matmul_params(config), d["heads"] * (getattr(config, "head_dim", None) or d["hidden"] // d["heads"])
    reference_pass = not (o.loss.reference_free or all(n in losses.REFERENCE_FREE for n, _ in o.loss.terms()))
    steps: list[dict] = []

    def on_step(step, batch, start, end):
        real = batch["segment"] >= 0
        steps.append({"step": step, "epoch": (step - 1) // trainer.batches.steps_per_epoch, "seconds": end - start,
                      "pairs": int(batch["pair_mask"].sum()), "tokens": int(real.sum()),
                      "flops": token_flops(batch["position_ids"][real].astype(np.float64), matmul, d["layers"], width,
                                           3 + (reference_pass and "ref_logps" not in batch)),
                      "compiles": sum(1 for t, _ in compiles if start <= t <= end), "end": end - started})
    trainer.on_step = on_step
    trainer.train()
    first_epoch = [s for s in steps if s["epoch"] == 0]
    return {"side": "dpo-jax", "matmul_peak_gflops": peak,
            "step_shapes": trainer.train_step._cache_size(), "compiles": len(compiles),
            "compile_seconds": sum(s for _, s in compiles),
            "compiles_after_first_epoch": sum(s["compiles"] for s in steps if s["epoch"] > 0),
            "steps_that_compiled": sum(1 for s in steps if s["compiles"]),
            "first_epoch_seconds": sum(s["seconds"] for s in first_epoch),
            "precompute_seconds": trainer.timings.get("precompute"),
            "wall_seconds": time.perf_counter() - started, "peak_rss_gb": max_rss_gb(),
            "first_step_seconds": steps[0]["end"] if steps else None,
            "pack_pairs": trainer.o.run.pack_pairs, "gradient_checkpointing": trainer.o.run.gradient_checkpointing,
            "steps": steps}


def matmul_params(config) -> int:
    """Parameters that take part in a matmul for every token: all but the embedding tables, plus the output
    head when it is the token embedding (tied)."""
    import math

    from flax import nnx

    from .models import family

    model = nnx.eval_shape(lambda: family(config.model_type).Model(config, rngs=nnx.Rngs(0)))
    total = tables = 0
    head = False
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        n = math.prod(variable.get_value().shape)
        total += n
        tables += n if path[-1] == "embedding" else 0
        head = head or "lm_head" in path
    return total - tables + (0 if head else config.vocab_size * dims(config)["hidden"])


# ------------------------------------------------------------------------------------------------- driver
def _child(side: str, spec: dict, log: Path) -> dict:
    """Run one side in a fresh process; its result is the last line it prints."""
    if side == "trl":
        command = [sys.executable, str(Path(__file__).with_name("bench_trl.py")), json.dumps(spec)]
    else:
        command = [sys.executable, "-m", "dpo_jax.bench", "--child", json.dumps(spec)]
    env = {**os.environ, "DPO_JAX_CACHE": spec["cache"], "HF_DATASETS_CACHE": str(Path(spec["cache"]) / "datasets"),
           "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    process_seconds = time.perf_counter() - start
    lines = [line for line in log.read_text().splitlines() if line.startswith(RESULT)]
    if done.returncode != 0 or not lines:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise UserError(f"the {side} benchmark failed (exit {done.returncode}); its log is {log}:\n{tail}")
    result = json.loads(lines[-1][len(RESULT):])
    return {**result, **summarize(result["steps"], spec["epochs"]), "process_seconds": process_seconds}


def _prepare(option_args: list[str], work: Path, need_hf_model: bool) -> tuple[list[str], dict]:
    """The rows both sides train on, written once (jsonl), and a Hugging Face directory for TRL."""
    from . import options
    from .data import load_split
    from .data import validate

    o = options.parse(option_args)
    rows = validate(load_split(o.data.dataset_name, o.data.dataset_train_split, config_name=o.data.dataset_config),
                    fmt=o.data.data_format)
    columns = [c for c in rows.dataset.column_names if not c.startswith("__")]
    data = work / "pairs.jsonl"
    rows.dataset.select_columns(columns).to_json(str(data), lines=True, force_ascii=False)
    shared = options.to_dict(o)
    flat = {k: v for section in shared.values() for k, v in section.items()}
    if need_hf_model:
        unlike = {"use_peft": o.lora.use_peft, "reference_free": o.loss.reference_free, "bf16": o.run.bf16,
                  "max_prompt_length": o.data.max_prompt_length, "max_completion_length": o.data.max_completion_length,
                  "truncation_mode keep_end": o.data.truncation_mode == "keep_end",
                  "ref_quantization": o.run.ref_quantization != "none"}
        unlike = [name for name, value in unlike.items() if value]
        if unlike:
            raise UserError(f"--vs trl runs both sides with the same settings, and TRL 1.16's DPOTrainer has no "
                            f"equivalent of {', '.join(unlike)} here; drop them to compare")
    model = o.run.model_name_or_path
    if need_hf_model:
        model = str(_hf_directory(model, work))
    ours = option_args + ["--dataset_name", str(data), "--dataset_train_split", "train"]
    shared = {k: flat[k] for k in SHARED if k in flat}
    shared["precompute_ref_batch_size"] = o.run.per_device_eval_batch_size  # our precompute's batch
    return ours, {"model": model, "data": str(data), "options": shared, "trust_remote_code": o.run.trust_remote_code,
                  "pairs": len(rows.dataset)}


def _hf_directory(model: str, work: Path) -> Path:
    """`model` itself when it is a Hugging Face directory; else (builtin:smollm2, a .gguf) its float32 export,
    kept in the dpo-jax cache for later benchmarks."""
    if Path(model).is_dir() and (Path(model) / "config.json").exists():
        return Path(model)
    from .reference import default_cache_dir

    target = default_cache_dir().parent / "bench_models" / Path(model.replace(":", "_")).stem
    if not (target / "config.json").exists():
        code = ("import sys, dpo_jax; m = dpo_jax.from_pretrained(sys.argv[1]); "
                "dpo_jax.export_pretrained(m, sys.argv[2], dpo_jax.load_tokenizer(sys.argv[1]))")
        subprocess.run([sys.executable, "-c", code, model, str(target)], check=True)
    return target


ROWS = [("pairs/s", "pairs_per_second", "{:.3f}"), ("tokens/s", "tokens_per_second", "{:.1f}"),
        ("step time, median (s)", "step_seconds_median", "{:.2f}"),
        ("useful GFLOP/s", "useful_gflops", "{:.1f}"), ("matmul peak GFLOP/s", "matmul_peak_gflops", "{:.1f}"),
        ("FLOP utilisation", "utilisation", "{:.0%}"), ("precompute pass (s)", "precompute_seconds", "{:.1f}"),
        ("peak RSS (GB)", "peak_rss_gb", "{:.2f}"), ("compiled step shapes", "step_shapes", "{}"),
        ("XLA compiles / seconds", "compile_summary", "{}"),
        ("compiles after epoch 1", "compiles_after_first_epoch", "{}"),
        ("measured steps", "measured_steps", "{}"), ("wall time (s)", "wall_seconds", "{:.0f}"),
        ("process, start to exit (s)", "process_seconds", "{:.0f}")]
WHOLE_RUN_ROWS = [("process, start to exit (s)", "process_seconds", "{:.0f}"),
                  ("first step done after (s)", "first_step_seconds", "{:.0f}"),
                  ("step time, median (s)", "step_seconds_median", "{:.2f}"),
                  ("steps that waited for a compile", "steps_that_compiled", "{}"),
                  ("compiled step shapes", "step_shapes", "{}"), ("XLA compiles / seconds", "compile_summary", "{}"),
                  ("peak RSS (GB)", "peak_rss_gb", "{:.2f}")]


def table(results: list[dict], rows: list[tuple[str, str, str]] = ROWS) -> str:
    """Markdown: one column per side, and the ratio dpo-jax / TRL when both ran."""
    for r in results:
        r["utilisation"] = r["useful_gflops"] / r["matmul_peak_gflops"]
        if r.get("compiles") is not None:
            r["compile_summary"] = f"{r['compiles']} / {r['compile_seconds']:.1f}"
    trl = next((r for r in results if r["side"] == "trl"), None)
    ours = [r for r in results if r is not trl] if trl else []
    head = "| | " + " | ".join(r["side"] for r in results) + " |" + "".join(
        f" {r['side']} / TRL |" for r in ours)
    lines = [head, "|" + "---|" * (len(results) + 1 + len(ours))]
    for label, key, form in rows:
        cells = [form.format(r[key]) if r.get(key) is not None else "-" for r in results]
        ratios = ""
        for r in ours:
            a, b = r.get(key), trl.get(key)
            ratios += f" {a / b:.2f}x |" if isinstance(a, float) and isinstance(b, float) and b else " |"
        lines.append(f"| {label} | " + " | ".join(cells) + " |" + ratios)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpo-jax bench", description=__doc__.splitlines()[0],
        epilog="Any train option may follow (e.g. --pack_pairs pairs --precompute_ref_log_probs true). Defaults: "
               + ", ".join(f"--{k} {v}" for k, v in DEFAULTS.items()))
    parser.add_argument("--vs", choices=["trl"], help="also run TRL's DPOTrainer on the same model, data, settings")
    parser.add_argument("--bench_epochs", type=_at_least(1), default=2,
                        help="epochs to train; the last one is measured")
    parser.add_argument("--bench_steps", type=_at_least(2), help="instead: train this many steps of one epoch and "
                        "measure those after the first that compiled nothing (for datasets too large for whole epochs)")
    parser.add_argument("--trl_gradient_checkpointing", default="false", choices=["true", "false"])
    parser.add_argument("--output_json", help="write every figure (and per-step times) here")
    parser.add_argument("--work_dir", help="keep the runs' logs here (default: a temporary directory)")
    return parser


def _at_least(low: int):
    """An argparse type: a whole number >= low (the first step compiles, so --bench_steps 1 measures nothing)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value
    parse.__name__ = "int"
    return parse


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--child":  # one side, in its own process
        spec = json.loads(argv[1])
        result = run_ours(spec["args"], spec["epochs"])
        print(RESULT + json.dumps(result), flush=True)
        return 0
    args, option_args = build_parser().parse_known_args(argv)
    given = {a[2:].split("=")[0] for a in option_args if a.startswith("--")}
    option_args = [x for k, v in DEFAULTS.items() if k not in given for x in (f"--{k}", v)] + option_args
    if args.bench_steps:
        option_args, args.bench_epochs = option_args + ["--max_steps", str(args.bench_steps)], 1
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="dpo_jax_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    ours_args, shared = _prepare(option_args, work, need_hf_model=args.vs == "trl")
    forced = [x for k, v in FORCED.items() for x in (f"--{k}", v)]
    results = []
    print(f"dpo-jax bench: {shared['pairs']} pairs, {args.bench_epochs} epochs, logs in {work}", flush=True)
    shutil.rmtree(work / "dpo_jax_run", ignore_errors=True)  # scratch: a new run refuses an earlier run's files
    spec = {"args": ours_args + forced + ["--output_dir", str(work / "dpo_jax_run")], "epochs": args.bench_epochs,
            "cache": str(work / "cache_ours")}
    results.append(_child("ours", spec, work / "dpo_jax.log"))
    print(f"  dpo-jax: {results[-1]['pairs_per_second']:.3f} pairs/s", flush=True)
    if args.vs == "trl":
        spec = {**shared, "epochs": args.bench_epochs, "output_dir": str(work / "trl_run"),
                "gradient_checkpointing": args.trl_gradient_checkpointing == "true", "cache": str(work / "cache_trl")}
        results.append(_child("trl", spec, work / "trl.log"))
        print(f"  TRL: {results[-1]['pairs_per_second']:.3f} pairs/s", flush=True)
    print(table(results))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({"options": option_args, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
