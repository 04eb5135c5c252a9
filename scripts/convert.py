"""Convert a model dpo-jax can load (HF directory, repo id or .gguf) into a Hugging Face safetensors directory.

    python scripts/convert.py --model_name_or_path model.gguf --output_dir smollm2-hf [--param_dtype bfloat16]

Useful to turn the SmolLM2 GGUF into a float32 directory that transformers and TRL load directly.
"""

import argparse
import sys

import jax.numpy as jnp

import dpo_jax
from dpo_jax.errors import UserError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_name_or_path", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--param_dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max_shard_size", default="5GB")
    args = parser.parse_args(argv)
    try:
        model = dpo_jax.from_pretrained(args.model_name_or_path, param_dtype=jnp.dtype(args.param_dtype))
        tokenizer = dpo_jax.load_tokenizer(args.model_name_or_path)
        dpo_jax.export_pretrained(model, args.output_dir, tokenizer, max_shard_size=args.max_shard_size,
                                  source=args.model_name_or_path)
    except UserError as e:
        print(f"convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
