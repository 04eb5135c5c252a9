"""dpo-jax: Direct Preference Optimization of language models in JAX.

Errors a user can fix exit with status 2 and a one-paragraph message; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .errors import UserError
from .assets import smollm2_path

def _demo(args) -> int:
    from .demo import main

    return main(args.options)


def _generate(args) -> None:
    from .generate import generate_text, load_for_generation

    _check_generate_numbers(args)
    model, tokenizer, eos = load_for_generation(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    answers = generate_text(model, tokenizer, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_p=args.top_p, seed=args.seed, eos_token_ids=eos)
    for prompt, answer in zip(args.prompt, answers):
        print(f"prompt: {prompt}\n{answer}\n" if len(args.prompt) > 1 else answer)


def _check_generate_numbers(args) -> None:
    """Sampling settings that would decode nothing or decode wrongly, refused before the model loads."""
    from .config import check_range, check_seed

    check_range("max_new_tokens", args.max_new_tokens, 1)
    check_range("temperature", args.temperature, 0)
    check_range("top_p", args.top_p, 0, 1, above=True)
    check_seed("seed", args.seed)


def _add_trust_remote_code(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust_remote_code", type=_parse_bool, default=False, metavar="{true,false}",
                        help="let transformers run the model directory's own config / tokenizer code (auto_map); "
                             "default false: that code is never run")


def _add_config_options(parser: argparse.ArgumentParser, config_class) -> None:
    """One --option per field of a config section (audit's DataConfig), named as the field; each value is
    converted and checked by `options.parse_value`, the converter of train's options and YAML."""
    import typing

    from . import options

    hints = typing.get_type_hints(config_class)
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        parser.add_argument(f"--{f.name}", type=_converter(f.name, hints[f.name], options.parse_value),
                            default=default, metavar="{true,false}" if hints[f.name] is bool else None)


def _converter(name: str, annotation, parse_value):
    """An argparse type: `parse_value`'s conversion, its UserError as argparse's own error (exit status 2)."""
    def convert(text: str):
        try:
            return parse_value(name, text, annotation)
        except UserError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    convert.__name__ = getattr(annotation, "__name__", name)
    return convert


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _audit(args) -> None:
    from . import audit, load_tokenizer
    from .batching import BatchIterator
    from .pairs import load_pairs
    from .config import DataConfig
    from .data import MissingSplit

    asked = hasattr(args, "dataset_test_split")  # its default is SUPPRESS: absent unless given
    cfg = DataConfig(**{f.name: getattr(args, f.name, f.default) for f in dataclasses.fields(DataConfig)})
    tokenizer = load_tokenizer(args.model_name_or_path or smollm2_path(), trust_remote_code=args.trust_remote_code)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # as train: keep_end can cut a pair's two prompts differently, so it batches chosen and rejected apart
    layout = "pairs" if cfg.truncation_mode == "keep_end" else args.pack_pairs
    accumulation = args.gradient_accumulation_steps
    reports = {}
    for name, split in (("train", cfg.dataset_train_split), ("test", cfg.dataset_test_split)):
        if split is None:
            continue
        try:
            pairs, rows = load_pairs(cfg, split, tokenizer)
        except MissingSplit as e:
            if name == "test" and not asked:
                one = f"has one split, {e.splits[0]!r}, and " if len(e.splits) == 1 else "has "
                print(f"{cfg.dataset_name} {one}no '{split}' split: no held-out audit (give --dataset_test_split, "
                      f"e.g. \"train[90%:]\" with --dataset_train_split \"train[:90%]\")")
                continue
            raise
        batches, reports[name] = audit.batched(pairs, rows, tokenizer, lambda p: BatchIterator(
            p, global_batch_size=args.per_device_train_batch_size * accumulation, pad_token_id=pad, seed=cfg.seed,
            shuffle=cfg.shuffle, num_buckets=cfg.num_length_buckets, multiple=cfg.pad_to_multiple_of,
            layout=layout, micro_batches=accumulation))
        print(audit.format_table(reports[name]))
    for report in reports.values():
        audit.check(report, cfg.audit_fail_on)
    if args.output_dir:
        print(f"wrote {audit.write(reports, args.output_dir)}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="dpo-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dpo-jax {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", add_help=False,
                          help="train SmolLM2-135M-Instruct with DPO on the sample data and show what changed; "
                               "--help for more")
    demo.set_defaults(run=_demo)
    gen = sub.add_parser("generate", help="continue prompts with a model, a dpo-jax run or a checkpoint (KV cache)")
    gen.add_argument("--model_name_or_path", default="builtin:smollm2",
                     help="model directory, repo id, .gguf, or a dpo-jax run / checkpoint (default: builtin:smollm2)")
    gen.add_argument("--prompt", action="append", required=True, help="a prompt; repeat for several (one batch)")
    gen.add_argument("--chat", action="store_true", help="send each prompt as a user turn of the chat template")
    gen.add_argument("--max_new_tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    gen.add_argument("--top_p", type=float, default=1.0,
                     help="sample only from the smallest set of tokens whose probability reaches top_p")
    gen.add_argument("--seed", type=int, default=0)
    _add_trust_remote_code(gen)
    gen.set_defaults(run=_generate)

    from .config import DataConfig

    check = sub.add_parser("audit", help="load, validate and tokenize a preference dataset and print its data audit")
    check.add_argument("--model_name_or_path", help="model or tokenizer directory, repo id or .gguf (default: SmolLM2)")
    check.add_argument("--output_dir", help="also write data_audit.json here")
    check.add_argument("--per_device_train_batch_size", type=_positive_int, default=8,
                       help="pairs per batch (one device) for the bucket and padding figures")
    check.add_argument("--gradient_accumulation_steps", type=_positive_int, default=1,
                       help="micro-batches per step (packed: each packed on its own)")
    check.add_argument("--pack_pairs", choices=("pairs", "shared_prefix", "packed"), default="packed",
                       help="the layout whose buckets and padding to show, as train's (default: packed)")
    _add_config_options(check, DataConfig)
    _add_trust_remote_code(check)
    # absent from the arguments unless given: only a split asked for by name must exist
    next(a for a in check._actions if a.dest == "dataset_test_split").default = argparse.SUPPRESS
    check.set_defaults(run=_audit)

    train = sub.add_parser("train", help="train with DPO (options: TRL's names; --config run.yaml)",
                           description="Options are TRL's DPOConfig names, e.g. --beta 0.1 --learning_rate 1e-6; "
                                       "--config run.yaml takes the same keys and the command line overrides it.",
                           epilog=_option_list(), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.set_defaults(run=_train)
    evaluate = sub.add_parser("evaluate", help="TRL's eval_* metrics of a model or checkpoint on a split, as JSON",
                              description="--model_name_or_path M (a model, or a run / checkpoint of dpo-jax train) "
                                          "[--ref_model_name_or_path R] --dataset_name D [--dataset_test_split S] "
                                          "[--output_json F], and any train option (beta, loss_type, max_length, "
                                          "...). A checkpoint's run options are the defaults.",
                              epilog=_option_list(), formatter_class=argparse.RawDescriptionHelpFormatter)
    evaluate.set_defaults(run=_evaluate)
    export = sub.add_parser("export", help="a checkpoint to a Hugging Face directory (config, safetensors, tokenizer)")
    export.add_argument("--checkpoint", required=True, help="a run's output_dir (newest checkpoint) or checkpoints/<step>")
    export.add_argument("--output_dir", required=True)
    export.add_argument("--mesh", default="fsdp=-1", help="devices to load the checkpoint onto")
    _add_trust_remote_code(export)  # consent of this command: the run's saved option does not count
    export.set_defaults(run=_export)
    bench = sub.add_parser("bench", add_help=False,
                           help="training speed and memory, and TRL's side by side (--vs trl); --help for more")
    bench.set_defaults(run=_bench)
    plan = sub.add_parser("plan", add_help=False,
                          help="memory, FLOPs and collectives of a run's train step, compiled for a TPU topology "
                               "(--topology v5p-16) or this machine, from config.json alone; --help for more")
    plan.set_defaults(run=_plan)
    return parser


def _option_list() -> str:
    """Every option name by section (README.md has the table with defaults and meanings)."""
    import textwrap

    from .options import FIELDS

    sections: dict[str, list[str]] = {}
    for name, owners in FIELDS.items():
        sections.setdefault(owners[0][0], []).append(f"--{name}")
    return "options (defaults and meanings: README.md, Options):\n" + "\n".join(
        textwrap.fill(" ".join(names), 100, initial_indent=f"  {section:6} ", subsequent_indent=" " * 9)
        for section, names in sections.items())


def _evaluate(args) -> None:
    import json

    from .runs import evaluate

    print(json.dumps(evaluate(args.options), indent=1))


def _export(args) -> None:
    from .runs import export

    export(args.checkpoint, args.output_dir, args.mesh, trust_remote_code=args.trust_remote_code)


def _train(args) -> int:
    from . import distributed, options
    from .trainer import Trainer

    given = options.parse_values(args.options)
    o = options.from_dict(given)
    distributed.initialize(o.run.distributed, o.run.coordinator_address, o.run.num_processes, o.run.process_id)
    trainer = Trainer(o, test_split_asked="dataset_test_split" in given)
    trainer.train()
    return 0 if trainer.finished else 128 + trainer.stopped_by  # stopped early: as a process killed by it


def _plan(args) -> int:
    from . import plan

    if any(a in ("-h", "--help") for a in args.options):
        print(PLAN_HELP)
        return 0
    plan.quiet_libtpu(plan.own_topology(args.options))  # before the TPU compiler starts
    return plan.main(args.options)


PLAN_HELP = """usage: dpo-jax plan --model_name_or_path DIR [--topology T] [--output_json FILE] [train options]

The train step of `dpo-jax train` with these options, built from DIR's config.json alone (no weights, tokenizer
or data) and compiled for --topology: a TPU topology as libtpu names it (v5p:2x2x2, v5e:2x4, v4:2x2x1, v6e:2x4)
or a Cloud TPU accelerator type (v5p-16 = 8 chips: v4 and v5p count TensorCores; v5litepod-8, v6e-8 count
chips). Without --topology it plans this machine's devices. Needs the TPU compiler for --topology:
pip install "dpo-jax[plan]".

The batch is the longest the options allow: per_device_train_batch_size x (data x fsdp) x
gradient_accumulation_steps pairs, pack_pairs pairs: rows of max_length tokens; shared_prefix and packed: a row
of 2 x max_length per pair. It prints per chip XLA's arguments, outputs, temporaries and total against HBM,
whether it fits, FLOPs per step (loops counted as often as they run), collective bytes per step by kind, and
the compile time; when the compiler refuses the step, its list of the largest buffers and what to change.
--output_json FILE writes the same figures (bytes per chip: argument, temp, total, hbm; fits; ...).
Exit status: 0 fits, 1 does not fit, 2 a bad option."""


def _bench(args) -> int:
    from .bench import main

    return main(args.options)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere, also after the subcommand (whose own parsers do not know it).
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    args.debug = debug
    if args.command not in ("train", "evaluate", "bench", "demo", "plan") and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.options = rest
    try:
        status = args.run(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"dpo-jax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading or compiling (training itself stops at a step boundary)
        if args.debug:
            raise
        print(f"dpo-jax {args.command}: interrupted", file=sys.stderr)
        return 130  # as a shell reports a process killed by SIGINT
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
