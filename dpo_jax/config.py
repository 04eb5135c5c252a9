"""Every option of a run, in one tree of frozen dataclasses: `Options` and its five sections.

Field names are TRL's (DPOConfig, ModelConfig, ScriptArguments) where the concept is the same, and each field's
comment is its meaning in the README's option table (generated from this file by `options.option_table`).
Every value is checked here, as the dataclass is built: ranges in each section's `__post_init__`, closed sets
of values against `CHOICES`, combinations across sections in `Options.__post_init__`; so an `Options` that
exists is valid, however it was made (command line, YAML, a checkpoint's saved options, Python).
`options.py` parses the command line and YAML into this tree. This module imports no compute module: the
modules that use a closed set (losses, schedules, attention kernels, quantisation kinds) import it from here.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields

from .errors import UserError

SEED_RANGE = (0, 2**32 - 1)  # what numpy's RandomState and default_rng accept as an integer seed

AUDIT_CHECKS = ("skipped", "dropped", "truncated", "identical", "duplicates", "boundary_merges", "doubled_bos",
                "missing_eos")

# The closed sets of values, each listed once.
LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "simpo")  # losses.py
SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")  # step.make_schedule
TRUNCATION_MODES = ("keep_start", "keep_end")
DATA_FORMATS = ("auto", "standard", "conversational")  # formats.py
ON_BAD_ROW = ("error", "skip")  # data.py
LAYOUTS = ("pairs", "shared_prefix", "packed")  # batching.py
ATTN_IMPLEMENTATIONS = ("auto", "eager", "blockwise", "splash", "cudnn")  # models/attention.py, models/kernels.py
QUANTIZATION_KINDS = ("int8", "nf4", "fp4")  # models/quant.py: quantised from float weights
GGUF = "gguf"  # models/quant.py: a .gguf file's own blocks, kept

CHOICES = {
    "lr_scheduler_type": SCHEDULES, "loss_type": LOSS_TYPES, "truncation_mode": TRUNCATION_MODES,
    "data_format": DATA_FORMATS, "on_bad_row": ON_BAD_ROW,
    "pack_pairs": LAYOUTS, "report_to": ("tensorboard", "wandb", "all", "none"),
    "distributed": ("auto", "true", "false"), "save_strategy": ("steps", "no"),
    "ref_dtype": ("auto", "float32", "bfloat16"), "attn_implementation": ATTN_IMPLEMENTATIONS,
    "ref_quantization": ("none", *QUANTIZATION_KINDS, GGUF), "bnb_4bit_quant_type": ("nf4", "fp4", GGUF),
}


def check_range(name: str, value, low=None, high=None, *, above: bool = False, below: bool = False,
                allow: tuple = ()) -> None:
    """Refuse option `name`'s `value` outside [low, high] (open at low with `above`, at high with `below`; no
    bound where None) with a UserError that names the option, the range and the value. Floats must also be
    finite; None (an option left unset) passes, and so do the special values in `allow` (-1 for max_steps)."""
    if value is None or value in allow:
        return
    inside = (isinstance(value, int) or math.isfinite(value)) \
        and (low is None or (value > low if above else value >= low)) \
        and (high is None or (value < high if below else value <= high))
    if not inside:
        raise UserError(f"option {name} must be {describe_range(low, high, above, below, isinstance(value, float))}"
                        f"{''.join(f' or {a}' for a in allow)}, not {_shown(value)}")


def _shown(value) -> str:
    """-1 rather than -1.0: the value as the user probably wrote it."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def describe_range(low, high, above: bool = False, below: bool = False, real: bool = False) -> str:
    """"at least 1", "above 0 (a finite number)", "in [0, 0.5)": the words for a range in messages."""
    if low is not None and high is not None:
        return f"in {'(' if above else '['}{low}, {high}{')' if below else ']'}"
    finite = " (a finite number)" if real else ""
    if low is not None:
        return f"{'above' if above else 'at least'} {low}{finite}"
    if high is not None:
        return f"{'below' if below else 'at most'} {high}{finite}"
    return "a finite number"


def check_seed(name: str, value) -> None:
    check_range(name, value, *SEED_RANGE)


def check_choice(name: str, value) -> None:
    """Refuse a value (or any item of a tuple value) of option `name` outside CHOICES[name], suggesting the
    closest one."""
    choices = CHOICES.get(name)
    for v in (value if isinstance(value, tuple) else (value,)):
        if choices and v is not None and v not in choices:
            close = difflib.get_close_matches(str(v), choices, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise UserError(f"option {name}: unknown value {v!r}{hint} The values are {', '.join(choices)}.")


def _check_choices(section) -> None:
    for f in fields(section):
        check_choice(f.name, getattr(section, f.name))


@dataclass(frozen=True)
class DataConfig:
    """Where the preference data comes from and how it is tokenized and batched."""

    dataset_name: str = "builtin:sample"  # file, directory, save_to_disk directory, hub name or builtin:sample
    dataset_config: str | None = None  # the hub dataset's configuration name
    dataset_train_split: str = "train"  # a split or a slice: "train", "train[:90%]"
    dataset_test_split: str | None = "test"  # held-out split for evaluation; None for none
    data_format: str = "auto"  # auto | standard | conversational
    on_bad_row: str = "error"  # error | skip (skipped rows are counted and listed in the audit)
    max_length: int | None = 1024  # prompt + completion tokens; TRL's default
    max_prompt_length: int | None = None  # prompt truncated from the left, BOS kept (TRL v0 option)
    max_completion_length: int | None = None  # completion truncated from the right (TRL v0 option)
    truncation_mode: str = "keep_start"  # keep_start | keep_end, as TRL, at max_length
    pad_to_multiple_of: int = 16  # bucket lengths are multiples of this (or max_length)
    num_length_buckets: int = 4  # compiled sequence lengths for a run, chosen to minimise padding
    shuffle: bool = True  # a new order of the training pairs every epoch, from seed and epoch
    seed: int = 42  # data order, LoRA initialisation and dropout
    dataset_num_proc: int | None = None  # processes for tokenizing (datasets.map num_proc)
    audit_fail_on: tuple[str, ...] = field(default_factory=tuple)  # audit counts that stop the run when > 0

    def __post_init__(self):
        _check_choices(self)
        for name in ("max_length", "max_prompt_length", "max_completion_length", "pad_to_multiple_of",
                     "num_length_buckets", "dataset_num_proc"):
            check_range(name, getattr(self, name), 1)
        check_seed("seed", self.seed)
        unknown = [c for c in self.audit_fail_on if c not in AUDIT_CHECKS]
        if unknown:
            raise UserError(f"audit_fail_on: unknown check {', '.join(unknown)}; the checks are "
                            f"{', '.join(AUDIT_CHECKS)}")


@dataclass(frozen=True)
class LossConfig:
    """The options of the losses; names as TRL's DPOConfig."""

    loss_type: tuple[str, ...] = ("sigmoid",)  # one or more of TRL's loss types (comma-separated), or simpo; see "Losses"
    loss_weights: tuple[float, ...] | None = None  # one per loss_type; default 1.0 each
    beta: float = 0.1  # strength of the KL penalty; rewards are beta * (policy - reference) log-probs
    label_smoothing: float = 0.0  # cDPO: assumed probability that a preference label is flipped
    discopop_tau: float = 0.05  # temperature of the discopop loss's mixing
    simpo_gamma: float = 0.5  # SimPO's target margin gamma (the paper's, not gamma/beta)
    rpo_alpha: float | None = None  # weight of an NLL-on-chosen term added to the losses (RPO)
    reference_free: bool = False  # compare against a uniform reference (log-probs 0): no reference model

    def __post_init__(self):
        unknown = [name for name in self.loss_type if name not in LOSS_TYPES]
        if unknown:
            raise UserError(f"unknown loss_type {', '.join(unknown)}; the losses are {', '.join(LOSS_TYPES)}")
        _check_choices(self)
        if not self.loss_type:
            raise UserError("loss_type needs at least one loss")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise UserError(f"loss_weights has {len(self.loss_weights)} weights for {len(self.loss_type)} losses "
                            f"({', '.join(self.loss_type)}); give one weight per loss")
        if "robust" in self.loss_type and not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"the robust loss needs label_smoothing in [0, 0.5), not {self.label_smoothing}")
        if "exo_pair" in self.loss_type and not 0 < self.label_smoothing < 1:
            raise UserError(f"the exo_pair loss needs label_smoothing in (0, 1), e.g. 1e-3, not "
                            f"{self.label_smoothing}")
        if set(self.loss_type) - {"exo_pair"}:  # every other loss reads it as the probability of a flipped label
            check_range("label_smoothing", self.label_smoothing, 0, 0.5, below=True)
        check_range("beta", self.beta, 0, above=True)
        check_range("discopop_tau", self.discopop_tau, 0, above=True)
        check_range("simpo_gamma", self.simpo_gamma, 0)
        check_range("rpo_alpha", self.rpo_alpha, 0)  # a negative weight would push the chosen answers away
        for weight in self.loss_weights or ():
            check_range("loss_weights", weight, 0)
        if self.loss_weights is not None and not any(self.loss_weights) and not self.rpo_alpha:
            raise UserError(f"option loss_weights: all {len(self.loss_weights)} weights are 0, so nothing would "
                            f"be trained; give at least one weight above 0")

    def terms(self) -> list[tuple[str, float]]:
        """(loss name, weight) of every term, the RPO NLL term included."""
        weights = self.loss_weights or (1.0,) * len(self.loss_type)
        terms = list(zip(self.loss_type, weights))
        if self.rpo_alpha is not None:
            terms.append(("sft", self.rpo_alpha))
        return terms


@dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule; names and defaults as TRL's DPOConfig / transformers' TrainingArguments."""

    learning_rate: float = 1e-6  # peak learning rate (TRL's DPO default)
    lr_scheduler_type: str = "linear"  # constant, constant_with_warmup, linear, cosine
    warmup_steps: int = 0  # linear warm-up steps; overrides warmup_ratio when > 0
    warmup_ratio: float = 0.0  # warm-up as a fraction of the training steps
    weight_decay: float = 0.0  # on matrices only (transformers: not on biases and norms)
    adam_beta1: float = 0.9  # AdamW
    adam_beta2: float = 0.999  # AdamW
    adam_epsilon: float = 1e-8  # AdamW
    max_grad_norm: float | None = 1.0  # clip the global gradient norm to this; None or 0: no clipping

    def __post_init__(self):
        _check_choices(self)
        check_range("learning_rate", self.learning_rate, 0)
        check_range("warmup_steps", self.warmup_steps, 0)
        check_range("warmup_ratio", self.warmup_ratio, 0, 1)
        check_range("weight_decay", self.weight_decay, 0)
        check_range("adam_beta1", self.adam_beta1, 0, 1, below=True)
        check_range("adam_beta2", self.adam_beta2, 0, 1, below=True)
        check_range("adam_epsilon", self.adam_epsilon, 0, above=True)  # 0 divides 0 by 0 where a gradient is 0
        check_range("max_grad_norm", self.max_grad_norm, 0)  # 0: no clipping, as transformers


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
        _check_choices(self)
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
        _check_choices(self)
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
    """A run's options, by section; `options.py` gives them one flat namespace of names."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self):
        frozen_quantization(self)  # the quantisation options across sections: refused before any work


def frozen_quantization(options: Options) -> str | None:
    """How the frozen weights are held (models/quant.py): a LoRA run's base (which is its reference) by TRL's
    load_in_4bit / load_in_8bit, a full fine-tune's reference by ref_quantization; None: unquantised. Combinations
    that TRL would refuse or read differently are errors that say what to give instead."""
    lora = options.lora
    if lora.use_bnb_nested_quant:
        raise UserError("use_bnb_nested_quant: not supported; the 4-bit scales stay float32 (one per 64 weights, "
                        "0.5 bits a weight). Drop the option.")
    if lora.load_in_4bit and lora.load_in_8bit:
        raise UserError("load_in_4bit and load_in_8bit are both true: give one (as TRL)")
    if (lora.load_in_4bit or lora.load_in_8bit) and not lora.use_peft:
        raise UserError(f"load_in_{'4' if lora.load_in_4bit else '8'}bit quantises the frozen base of a LoRA run (QLoRA: "
                        f"add --use_peft true); a full fine-tune trains every weight in full precision. To hold a full "
                        f"fine-tune's reference quantised, give --ref_quantization "
                        f"{lora.bnb_4bit_quant_type if lora.load_in_4bit else 'int8'} instead.")
    if lora.use_peft and options.run.ref_quantization != "none":
        raise UserError(f"ref_quantization {options.run.ref_quantization} with use_peft: a LoRA run's reference is its base "
                        f"model, so quantise the base: --load_in_4bit true (bnb_4bit_quant_type nf4 or fp4) or "
                        f"--load_in_8bit true")
    if lora.load_in_4bit:
        return lora.bnb_4bit_quant_type
    if lora.load_in_8bit:
        return "int8"
    return None if options.run.ref_quantization == "none" else options.run.ref_quantization
