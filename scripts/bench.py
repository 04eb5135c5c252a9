"""Regenerate BENCHMARKS.md's side-by-side section: dpo-jax against TRL's DPOTrainer on this machine.

    python scripts/bench.py [--write BENCHMARKS.md] [--datasets sample,long] [any dpo-jax bench / train option]

Measured on the same pairs (SmolLM2-135M-Instruct, float32, 4 pairs per step, two epochs with the second
measured), each side in its own process, on two datasets:
- `sample`: the first 32 sample pairs (short completions beside a shared prompt, where prefix sharing and
  packing gain the most);
- `long`: 32 generated pairs (`scripts/long_pairs.py`: 64-token prompts, unrelated chosen and rejected
  completions of 64-128 tokens, max_length 256), where only the prompt is shared;
and for each: live and precomputed reference at dpo-jax's defaults with TRL beside it, and again with prefix
sharing and packing off (`--pack_pairs pairs`: the tokens TRL computes); on `long`, a whole 10-step run of each
side, start to exit (compiles included); on `sample`, dpo-jax's pairs/s on 1,000 and 100,000 pairs (the sample
repeated), 12 steps each: the cost of a step must not grow with the dataset.
The tables and the machine description replace the text between the `bench:begin` and `bench:end` markers
(--write needs every dataset).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

# A CPU benchmark: where jax[tpu] is installed (the plan extra), every dpo-jax process would otherwise load
# libtpu and look for a TPU (0.1 GB of RSS and warnings TRL's side does not pay). The children inherit this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from bench_data import write_pairs
from long_pairs import write_pairs as write_long_pairs

from dpo_jax import bench

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
MODES = (("Live reference", []), ("Precomputed reference", ["--precompute_ref_log_probs", "true"]))
DATASETS = {"sample": "the sample pairs", "long": "long completions"}


def machine() -> str:
    import importlib.metadata as md

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    memory = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    versions = ", ".join(f"{p} {md.version(p)}" for p in ("jax", "flax", "optax", "torch", "transformers", "trl"))
    return (f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, no accelerator; Python "
            f"{platform.python_version()}; {versions}")


def run(work: Path, name: str, args: list[str]) -> list[dict]:
    out = work / f"{name}.json"
    bench.main([*args, "--output_json", str(out), "--work_dir", str(work / name)])
    return json.loads(out.read_text())["results"]


def dataset_args(name: str, work: Path) -> list[str]:
    if name == "sample":
        return []
    data = work / "long_pairs.jsonl"
    write_long_pairs(str(data), 32, 64, (64, 128), seed=0)
    return ["--dataset_name", str(data), "--dataset_train_split", "train", "--max_length", "256"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", help="the markdown file whose bench section to replace")
    parser.add_argument("--datasets", default="sample,long", help="which to measure, of: " + ", ".join(DATASETS))
    args, extra = parser.parse_known_args()
    chosen = args.datasets.split(",")
    if set(chosen) - set(DATASETS) or (args.write and set(chosen) != set(DATASETS)):
        parser.error(f"--datasets: a comma-separated list of {', '.join(DATASETS)} (--write needs all of them)")
    work = Path(tempfile.mkdtemp(prefix="dpo_jax_bench_all_"))
    sections = []
    for name in chosen:
        data = dataset_args(name, work)
        for i, (mode, flags) in enumerate(MODES):
            ours, trl = run(work, f"{name}_{i}_default", ["--vs", "trl", *data, *flags, *extra])
            plain = run(work, f"{name}_{i}_plain", ["--pack_pairs", "pairs", *data, *flags, *extra])[0]
            plain["side"] = "dpo-jax, `--pack_pairs pairs`"
            sections.append(f"### {DATASETS[name].capitalize()}: {mode.lower()}\n\n{bench.table([ours, plain, trl])}")
        if name == "long":
            ours, trl = run(work, f"{name}_10_steps", ["--vs", "trl", "--bench_steps", "10", *data, *extra])
            sections.append(f"### {DATASETS[name].capitalize()}: a whole 10-step run, start to exit\n\n"
                            "Each side's process from its start to its exit (the model load, tokenizing, every "
                            "compile and the 10 steps; the step time is of the steps after the first that "
                            "compiled nothing).\n\n" + bench.table([ours, trl], rows=bench.WHOLE_RUN_ROWS))
    if "sample" in chosen:
        sections.append(scale_section(work, extra))
    command = " ".join(["python scripts/bench.py --write BENCHMARKS.md", *extra])
    text = (f"{BEGIN}\nMachine: {machine()}.\n\nRegenerate with `{command}` (about 60 minutes). Ratios are "
            f"dpo-jax / TRL; TRL runs with `bf16=False` and `gradient_checkpointing=False`, its fastest float32 "
            f"setting.\n\n" + "\n\n".join(sections) + f"\n{END}")
    print(text)
    if args.write:
        path = Path(args.write)
        old = path.read_text() if path.exists() else ""
        if BEGIN in old and END in old:
            new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
        else:
            new = old.rstrip() + "\n\n## dpo-jax against TRL\n\n" + text + "\n"
        path.write_text(new)
        print(f"wrote {path}")


def scale_section(work: Path, extra: list[str]) -> str:
    rows = []
    for n in (1_000, 100_000):
        data = work / f"pairs_{n}.jsonl"
        write_pairs(str(data), n)
        result = run(work, f"scale_{n}", ["--dataset_name", str(data), "--dataset_train_split", "train",
                                           "--bench_steps", "12", *extra])[0]
        per_pair = result["tokens_per_second"] / result["pairs_per_second"]
        rows.append(f"| {n:,} | {result['pairs_per_second']:.3f} | {result['tokens_per_second']:.1f} | "
                    f"{per_pair:.1f} | {result['useful_gflops']:.1f} | {result['measured_steps']} | "
                    f"{result['wall_seconds']:.0f} |")
    return ("### Cost from 1k to 100k pairs (dpo-jax, live reference, 12 steps)\n\n"
            "The 12 steps see different pairs in each set (and the numbered prompts are longer in the "
            "large one), so tokens/s and FLOP/s are the figures to compare.\n\n"
            "| pairs in the dataset | pairs/s | tokens/s | tokens per pair | useful GFLOP/s | steps measured "
            "| wall time incl. tokenizing (s) |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
