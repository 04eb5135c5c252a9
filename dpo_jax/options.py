"""The `dpo-jax train` options: one flat namespace of TRL's option names over the nested config dataclasses.

Every field of `Options`' sections is an option (`--beta 0.1` on the command line, `beta: 0.1` in a
`--config run.yaml`); the command line overrides the YAML file. A name used by several sections (`seed`)
sets all of them. Unknown names and values outside a field's choices are errors that suggest the closest
valid one. `option_table()` renders the table of the README from these dataclasses, so it cannot drift.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .config import DataConfig, check_range, check_seed
from .errors import UserError
from .losses import LOSSES, LossConfig
from .models.attention import IMPLEMENTATIONS
from .models.quant import KINDS as QUANTIZATION_KINDS
from .step import SCHEDULES, OptimConfig


@dataclass(frozen=True)
class LoraConfig:
    """LoRA adapters (TRL's ModelConfig names)."""

    use_peft: bool = False  # train LoRA adapters instead of all weights; the reference is the base model
    lora_r: int = 16  # adapter rank
    lora_alpha: int = 32  # adapter scale alpha / r
    lora_dropout: float = 0.05  # dropout on the adapters' input in training
    lora_target_modules: tuple[str, ...] | None = None  # layer names; default q_proj,v_proj (GPT-2: c_attn); or all-linear
    load_in_4bit: bool = False  # QLoRA: the frozen base (and so the reference) held in 4 bits (bnb_4bit_quant_type)
    load_in_8bit: bool = False  # the frozen base (and so the reference) held in int8, one scale per column
    bnb_4bit_quant_type: str = "nf4"  # load_in_4bit's format: nf4 (QLoRA's NormalFloat), fp4 (e2m1), gguf (a .gguf's own)
    use_bnb_nested_quant: bool = False  # not supported (scales stay float32); kept so that TRL's option is explained

    def __post_init__(self):
        check_range("lora_r", self.lora_r, 1)
        check_range("lora_alpha", self.lora_alpha, 0, above=True)
        check_range("lora_dropout", self.lora_dropout, 0, 1, below=True)


@dataclass(frozen=True)
class RunConfig:
    """The model, the run's length and bookkeeping, and what TRL lacks (mesh, pack_pairs, ...)."""

    model_name_or_path: str | None = None  # the policy's starting point: HF directory, hub id or .gguf
    trust_remote_code: bool = False  # let transformers run a model directory's own config / tokenizer code (auto_map)
    ref_model_name_or_path: str | None = None  # default: the policy's starting weights
    output_dir: str | None = None  # metrics, TensorBoard events, checkpoints and plots go here
    per_device_train_batch_size: int = 8  # pairs per device per micro-batch (global: x data x fsdp x accumulation)
    per_device_eval_batch_size: int = 8  # pairs per device in evaluation and the reference precompute
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (inside the jitted step)
    num_train_epochs: float = 3.0  # passes over the training pairs (may be fractional)
    max_steps: int = -1  # > 0 overrides num_train_epochs
    logging_steps: int = 10  # write train metrics every this many steps
    eval_steps: int | None = None  # default: logging_steps
    eval_on_start: bool = False  # evaluate before the first step too, logged at step 0 (as TRL)
    save_steps: int = 500  # checkpoint every this many steps (and at the end)
    save_total_limit: int | None = None  # keep only the newest this many checkpoints; None: all
    save_strategy: str = "steps"  # steps (every save_steps and at the end) or no (no checkpoints; as TRL)
    seed: int = 42  # data order, LoRA initialisation and dropout
    bf16: bool | None = None  # bfloat16 compute; default: on accelerators yes, on the CPU no
    ref_dtype: str = "auto"  # frozen reference (and LoRA base) matrices: auto (the compute dtype), float32, bfloat16
    ref_quantization: str = "none"  # a full fine-tune's reference held quantised: none, int8, nf4, fp4, gguf (LoRA: load_in_4bit)
    gradient_checkpointing: bool | None = None  # recompute blocks in the backward pass; None: when memory needs it
    precompute_ref_log_probs: bool = False  # one reference pass before training, cached; no reference in memory
    resume_from_checkpoint: str | None = None  # a checkpoint directory, or "true" for the latest in output_dir
    mesh: str = "fsdp=-1"  # data=2,fsdp=-1,tensor=1 style; -1 takes the remaining devices
    pack_pairs: str = "packed"  # packed (pairs share rows, each prompt once), shared_prefix (a row per pair) or pairs
    attn_implementation: str = "auto"  # auto (by backend), eager, blockwise (flash-style, pure JAX), splash (TPU; interpreted elsewhere), cudnn (GPU; XLA elsewhere): see README
    max_nonfinite_steps: int = 10  # stop after this many steps in a row with a non-finite loss or gradient
    report_to: tuple[str, ...] = ("tensorboard",)  # tensorboard, wandb, all or none; metrics.jsonl always
    memory_limit_gb: float | None = None  # per-device memory to plan for; default: what the device reports
    compilation_cache_dir: str | None = "default"  # XLA's persistent cache: default ~/.cache/dpo_jax/xla; none: off
    distributed: str = "auto"  # multi-process runs: auto (SLURM, Open MPI, TPU pods, coordinator_address), true, false
    coordinator_address: str | None = None  # host:port of process 0, for launches JAX cannot detect
    num_processes: int | None = None  # with coordinator_address: how many processes in all
    process_id: int | None = None  # with coordinator_address: this process's number, 0 .. num_processes-1

    def __post_init__(self):
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps", "eval_steps", "save_total_limit", "max_nonfinite_steps",
                     "num_processes"):
            check_range(name, getattr(self, name), 1)
        check_range("max_steps", self.max_steps, 1, allow=(-1,))  # 0 would be read as "no limit": refused
        check_range("num_train_epochs", self.num_train_epochs, 0)
        if self.max_steps == -1 and not self.num_train_epochs > 0:
            raise UserError(f"option num_train_epochs must be above 0 (or give max_steps), not {self.num_train_epochs}")
        check_range("memory_limit_gb", self.memory_limit_gb, 0, above=True)
        check_seed("seed", self.seed)
        check_range("process_id", self.process_id, 0, None if self.num_processes is None else self.num_processes - 1)


@dataclass(frozen=True)
class Options:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        frozen_quantization(self)  # the quantisation options across sections: refused before any work


# Values a field may take, where they are a closed set.
CHOICES = {
    "lr_scheduler_type": SCHEDULES, "loss_type": tuple(LOSSES), "truncation_mode": ("keep_start", "keep_end"),
    "data_format": ("auto", "standard", "conversational"), "on_bad_row": ("error", "skip"),
    "pack_pairs": ("pairs", "shared_prefix", "packed"), "report_to": ("tensorboard", "wandb", "all", "none"),
    "distributed": ("auto", "true", "false"), "save_strategy": ("steps", "no"),
    "ref_dtype": ("auto", "float32", "bfloat16"), "attn_implementation": IMPLEMENTATIONS,
    "ref_quantization": ("none", *QUANTIZATION_KINDS, "gguf"), "bnb_4bit_quant_type": ("nf4", "fp4", "gguf"),
}


def frozen_quantization(o: Options) -> str | None:
    """How the frozen weights are held (models/quant.py): a LoRA run's base (which is its reference) by TRL's
    load_in_4bit / load_in_8bit, a full fine-tune's reference by ref_quantization; None: unquantised. Combinations
    that TRL would refuse or read differently are errors that say what to give instead."""
    lo = o.lora
    if lo.use_bnb_nested_quant:
        raise UserError("use_bnb_nested_quant: not supported; the 4-bit scales stay float32 (one per 64 weights, "
                        "0.5 bits a weight). Drop the option.")
    if lo.load_in_4bit and lo.load_in_8bit:
        raise UserError("load_in_4bit and load_in_8bit are both true: give one (as TRL)")
    if (lo.load_in_4bit or lo.load_in_8bit) and not lo.use_peft:
        raise UserError(f"load_in_{'4' if lo.load_in_4bit else '8'}bit quantises the frozen base of a LoRA run (QLoRA: "
                        f"add --use_peft true); a full fine-tune trains every weight in full precision. To hold a full "
                        f"fine-tune's reference quantised, give --ref_quantization "
                        f"{lo.bnb_4bit_quant_type if lo.load_in_4bit else 'int8'} instead.")
    if lo.use_peft and o.run.ref_quantization != "none":
        raise UserError(f"ref_quantization {o.run.ref_quantization} with use_peft: a LoRA run's reference is its base "
                        f"model, so quantise the base: --load_in_4bit true (bnb_4bit_quant_type nf4 or fp4) or "
                        f"--load_in_8bit true")
    if lo.load_in_4bit:
        return lo.bnb_4bit_quant_type
    if lo.load_in_8bit:
        return "int8"
    return None if o.run.ref_quantization == "none" else o.run.ref_quantization


def _fields() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """Option name -> the (section, field) pairs it sets."""
    out: dict[str, list] = {}
    for section in dataclasses.fields(Options):
        for f in dataclasses.fields(section.default_factory()):
            out.setdefault(f.name, []).append((section.name, f))
    return out


FIELDS = _fields()


def _type(section: str, f: dataclasses.Field):
    cls = type(getattr(Options(), section))
    return typing.get_type_hints(cls)[f.name]


def parse_value(name: str, value, annotation):
    """A YAML or command-line value converted to the field's type; strings are parsed ("0.1", "a,b", "none")."""
    args = typing.get_args(annotation)
    optional = type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        annotation = next(a for a in args if a is not type(None))
    origin = typing.get_origin(annotation)
    try:
        if origin is tuple:
            item = typing.get_args(annotation)[0]
            items = value.split(",") if isinstance(value, str) else list(value if isinstance(value, (list, tuple))
                                                                          else [value])
            return tuple(parse_value(name, v.strip() if isinstance(v, str) else v, item) for v in items)
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if annotation is int:
            if isinstance(value, float) and not value.is_integer():  # also inf and nan (from YAML's .inf, .nan)
                raise ValueError
            return int(value)
        if annotation is float:
            return float(value)
        return str(value)
    except (ValueError, TypeError):
        kind = getattr(annotation, "__name__", str(annotation))
        raise UserError(f"option {name}: {value!r} is not a valid {kind}") from None


def _check_choice(name: str, value) -> None:
    choices = CHOICES.get(name)
    for v in (value if isinstance(value, tuple) else (value,)):
        if choices and v is not None and v not in choices:
            close = difflib.get_close_matches(str(v), choices, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(f"option {name}: unknown value {v!r}{hint} The values are {', '.join(choices)}.")


def from_dict(values: dict, source: str = "the command line") -> Options:
    """Options from flat {name: value}; unknown names are errors with the closest known name."""
    sections: dict[str, dict] = {s.name: {} for s in dataclasses.fields(Options)}
    for name, value in values.items():
        for section, parsed in _parsed(name, value, source):
            sections[section][name] = parsed
    defaults = Options()
    return Options(**{s: dataclasses.replace(getattr(defaults, s), **v) for s, v in sections.items()})


def _parsed(name: str, value, source: str) -> list[tuple[str, object]]:
    """(section, typed value) for each section that option `name` sets; the name and value checked alone."""
    if name not in FIELDS:
        close = difflib.get_close_matches(name, FIELDS, n=1)
        hint = f" Did you mean {close[0]}?" if close else ""
        raise UserError(f"unknown option {name!r} in {source}.{hint} `dpo-jax train --help` lists the options.")
    out = []
    for section, f in FIELDS[name]:
        parsed = parse_value(name, value, _type(section, f))
        _check_choice(name, parsed)
        out.append((section, parsed))
    return out


def load_yaml(path: str) -> dict:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {path}: " + ("a directory: give the YAML file in it" if p.is_dir() else
                                                 "no such file"))
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"--config {path} is not valid YAML: {e}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"--config {path} is not UTF-8 text ({e}); save it as UTF-8") from e
    if not isinstance(data, dict):
        raise UserError(f"--config {path}: expected a mapping of option names to values, not a {type(data).__name__}")
    return data


def parse(argv: list[str]) -> Options:
    """`--name value` pairs (and `--config file.yaml`) to Options: YAML first, then the command line."""
    return from_dict(parse_values(argv))


def parse_values(argv: list[str]) -> dict:
    """The flat {name: value} that `argv` gives (YAML file first, command line over it), names checked."""
    values: dict = {}
    flags: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument {arg!r}; options look like --beta 0.1")
        name, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError(f"option --{name} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if name == "config":
            loaded = load_yaml(value)
            for key, item in loaded.items():  # names and values checked against the file; combinations later
                _parsed(key, item, f"--config {value}")
            values.update(loaded)
        else:
            flags[name] = value
    for key, item in flags.items():
        _parsed(key, item, "the command line")
    return {**values, **flags}


def option_table() -> str:
    """The README's option table: name, section, default and the comment on the field's line."""
    import inspect
    import re

    lines = ["| option | section | default | meaning |", "|---|---|---|---|"]
    seen = set()
    for section in dataclasses.fields(Options):
        cls = type(getattr(Options(), section.name))
        source = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else str(default)
            match = re.search(rf"^\s+{f.name}:.*?#\s*(.*)$", source, re.MULTILINE)
            meaning = match.group(1) if match else ""
            if f.name in CHOICES and f.name != "loss_type" and not all(c in meaning for c in CHOICES[f.name]):
                meaning += f" ({', '.join(CHOICES[f.name])})"
            where = "+".join(s for s, _ in FIELDS[f.name])
            lines.append(f"| `{f.name}` | {where} | `{shown or '()'}` | {meaning.replace('|', '/')} |")
    return "\n".join(lines)


def to_dict(o: Options) -> dict:
    """{section: {name: value}} in JSON types: what a checkpoint stores as the run's config."""
    return {s.name: {f.name: (list(v) if isinstance(v := getattr(getattr(o, s.name), f.name), tuple) else v)
                     for f in dataclasses.fields(getattr(o, s.name))} for s in dataclasses.fields(Options)}


def from_saved(saved: dict, source: str) -> Options:
    """The Options that `to_dict` stored (in a checkpoint). Options this version does not know (a checkpoint
    from another version) are left out, with a warning."""
    import logging

    flat = {name: value for section in saved.values() for name, value in section.items()}
    unknown = sorted(set(flat) - set(FIELDS))
    if unknown:
        logging.getLogger(__name__).warning("%s: options unknown to this version left out: %s", source,
                                            ", ".join(unknown))
    return from_dict({k: v for k, v in flat.items() if k in FIELDS}, source=source)
