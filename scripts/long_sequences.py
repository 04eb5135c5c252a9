"""Peak memory of `dpo-jax evaluate` on long pairs: a toy Llama (2 layers, 4 heads, hidden 64, random weights)
evaluating 4 pairs of about 4k tokens each (a 1,000-token prompt, 3,000-token chosen and rejected completions),
at several max_length values, each evaluation in a fresh process.

    python scripts/long_sequences.py [--max_length 2048 8192] [--attn_implementation auto] [--pack_pairs packed]

Prints one JSON line per max_length: the longest row the step saw, peak RSS of the evaluate process (GB) and
its wall time. The model, tokenizer (a word-level one over 1,000 words) and data are written to a temporary
directory; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

WORDS = 1000


def write_toy(directory: str) -> None:
    """The toy model (exported by dpo-jax itself), its tokenizer and the pairs, under `directory`."""
    import numpy as np
    import transformers
    from flax import nnx
    from tokenizers import Tokenizer, models, pre_tokenizers

    from dpo_jax.hf_export import export_pretrained
    from dpo_jax.models.llama import LlamaConfig, LlamaForCausalLM

    vocab = {"<pad>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    hf = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                  max_position_embeddings=16384, eos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(LlamaConfig.from_hf(hf), rngs=nnx.Rngs(0))
    export_pretrained(model, os.path.join(directory, "model"), tokenizer)
    rng = np.random.default_rng(0)

    def text(n: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, WORDS, n))

    with open(os.path.join(directory, "pairs.jsonl"), "w") as f:
        for _ in range(4):
            f.write(json.dumps({"prompt": text(1000), "chosen": " " + text(3000), "rejected": " " + text(3000)}) + "\n")


def evaluate(directory: str, max_length: int, extra: list[str]) -> dict:
    """One `dpo-jax evaluate` in a fresh process, run by a small wrapper process that reports its peak RSS
    (ru_maxrss of the wrapper's children: the evaluation alone)."""
    command = [sys.executable, "-m", "dpo_jax", "evaluate", "--model_name_or_path", os.path.join(directory, "model"),
               "--dataset_name", os.path.join(directory, "pairs.jsonl"), "--dataset_test_split", "train",
               "--max_length", str(max_length), "--per_device_eval_batch_size", "4", *extra]
    start = time.perf_counter()
    wrapper = ("import resource, subprocess, sys, json; r = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
               "print(json.dumps({'rc': r.returncode, 'err': r.stderr[-2000:], 'out': r.stdout,"
               "'rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    done = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    row = {"max_length": max_length, "options": " ".join(extra), "seconds": round(time.perf_counter() - start, 1),
           "peak_rss_gb": round(result["rss_kb"] / 2**20, 2), "returncode": result["rc"]}
    if result["rc"]:
        row["error"] = result["err"].strip().splitlines()[-1:]
    else:
        metrics = json.loads(result["out"])
        row["eval_logps_chosen"] = metrics.get("eval_logps/chosen")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max_length", type=int, nargs="+", default=[2048, 8192])
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as directory:
        write_toy(directory)
        for length in args.max_length:
            print(json.dumps(evaluate(directory, length, extra)), flush=True)


if __name__ == "__main__":
    main()
