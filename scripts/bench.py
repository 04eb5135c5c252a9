"""Regenerate BENCHMARKS.md's side-by-side section: dpo-jax against TRL's DPOTrainer on this machine.

    python scripts/bench.py [--write BENCHMARKS.md] [any dpo-jax bench / train option]

Four measurements on the same pairs (default: SmolLM2-135M-Instruct, float32, the first 32 sample pairs,
4 pairs per step, two epochs with the second one measured), each in its own processes:
live reference and precomputed reference, each at dpo-jax's defaults with TRL beside it, and again with
prefix sharing and packing off (`--pack_pairs pairs`: the tokens TRL computes). The table, the targets and
the machine description replace the text between the `bench:begin` and `bench:end` markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

from dpo_jax import bench

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
MODES = (("live reference", []), ("precomputed reference", ["--precompute_ref_log_probs", "true"]))


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    memory = next(int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")) / 2**20
    import importlib.metadata as md

    versions = ", ".join(f"{p} {md.version(p)}" for p in ("jax", "flax", "optax", "torch", "transformers", "trl"))
    return f"{cpu}, {os.cpu_count()} cores, {memory:.0f} GiB, no accelerator; Python {platform.python_version()}; {versions}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", help="the markdown file whose bench section to replace")
    args, extra = parser.parse_known_args()
    work = Path(tempfile.mkdtemp(prefix="dpo_jax_bench_all_"))
    sections = []
    for mode, flags in MODES:
        out_default, out_plain = work / f"{len(sections)}_default.json", work / f"{len(sections)}_plain.json"
        bench.main(["--vs", "trl", "--output_json", str(out_default), "--work_dir", str(work / f"{mode}_default"),
                    *flags, *extra])
        bench.main(["--pack_pairs", "pairs", "--output_json", str(out_plain), "--work_dir",
                    str(work / f"{mode}_plain"), *flags, *extra])
        default = json.loads(out_default.read_text())["results"]
        plain = json.loads(out_plain.read_text())["results"][0]
        plain["side"] = "dpo-jax, pack_pairs pairs"
        ours, trl = default
        results = [ours, {**plain}, trl]
        text = bench.table([ours, trl]).splitlines()
        plain_ratio = plain["pairs_per_second"] / trl["pairs_per_second"]
        sections.append(f"### {mode}\n\n" + "\n".join(text) + "\n\n" + (
            f"With prefix sharing and packing off (`--pack_pairs pairs`): {plain['pairs_per_second']:.3f} pairs/s "
            f"({plain_ratio:.2f}x TRL), {plain['tokens_per_second']:.1f} tokens/s, peak RSS "
            f"{plain['peak_rss_gb']:.2f} GB ({plain['peak_rss_gb'] / trl['peak_rss_gb']:.2f}x TRL), "
            f"{plain['step_shapes']} step shapes, {plain['compile_seconds']:.0f} s compiling.") )
        del results
    text = (f"{BEGIN}\nMachine: {machine()}.\n\nCommand: `python scripts/bench.py --write BENCHMARKS.md "
            f"{' '.join(extra)}`".rstrip() + "`\n\n" + "\n\n".join(sections) + f"\n{END}")
    text = text.replace("` `", "`").replace("``", "`")
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


if __name__ == "__main__":
    main()
