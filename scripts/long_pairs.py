"""Generated preference pairs of a chosen length, for benchmarks at long rows: the bundled sample pairs'
words in a random order, a prompt and two unrelated completions per pair (no prefix shared beyond the prompt).

    python scripts/long_pairs.py OUT.jsonl [--pairs 16] [--prompt_tokens 340] [--completion_tokens 340 | LOW-HIGH]

Token counts are approximate (SmolLM2's tokenizer gives about 1.6 tokens per word of this text); with the
defaults a sequence (prompt and completion) is about 680 tokens and a prompt-sharing row about 1,020, and `dpo-jax bench --dataset_name OUT.jsonl --max_length
1024` measures 1024-token rows. `--completion_tokens 64-128` draws each completion's length uniformly from that
range (the benchmark's second dataset: `scripts/bench.py`). Nothing is committed: the file is written where you say.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

TOKENS_PER_WORD = 1.6


def write_pairs(path: str, pairs: int, prompt_tokens: int, completion_tokens: int | tuple[int, int],
                seed: int = 0) -> None:
    """`completion_tokens`: a length, or (low, high) to draw each completion's length from uniformly."""
    from dpo_jax.data import SAMPLE_DIR

    words = sorted({w for line in open(SAMPLE_DIR / "train.jsonl") for v in json.loads(line).values()
                    if isinstance(v, str) for w in v.split()})
    rng = np.random.default_rng(seed)

    def text(tokens: int) -> str:
        return " ".join(rng.choice(words, size=max(1, round(tokens / TOKENS_PER_WORD))))

    low, high = completion_tokens if isinstance(completion_tokens, tuple) else (completion_tokens,) * 2
    with open(path, "w") as f:
        for _ in range(pairs):
            chosen, rejected = rng.integers(low, high + 1, size=2)
            row = {"prompt": text(prompt_tokens), "chosen": " " + text(chosen), "rejected": " " + text(rejected)}
            f.write(json.dumps(row) + "\n")


def _length(text: str) -> int | tuple[int, int]:
    low, _, high = text.partition("-")
    return (int(low), int(high)) if high else int(low)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--prompt_tokens", type=int, default=340)
    parser.add_argument("--completion_tokens", type=_length, default=340, help="N, or LOW-HIGH")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_pairs(args.out, args.pairs, args.prompt_tokens, args.completion_tokens, args.seed)


if __name__ == "__main__":
    main()
