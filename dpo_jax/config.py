"""Run configuration: frozen dataclasses whose field names are TRL's where the concept is the same."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import UserError

SEED_RANGE = (0, 2**32 - 1)  # what numpy's RandomState and default_rng accept as an integer seed

AUDIT_CHECKS = ("skipped", "dropped", "truncated", "identical", "duplicates", "boundary_merges", "doubled_bos",
                "missing_eos")


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
        for name in ("max_length", "max_prompt_length", "max_completion_length", "pad_to_multiple_of",
                     "num_length_buckets", "dataset_num_proc"):
            check_range(name, getattr(self, name), 1)
        check_seed("seed", self.seed)
