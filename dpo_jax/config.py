"""Run configuration: frozen dataclasses whose field names are TRL's where the concept is the same."""

from __future__ import annotations

from dataclasses import dataclass, field

AUDIT_CHECKS = ("skipped", "dropped", "truncated", "identical", "duplicates", "boundary_merges", "doubled_bos",
                "missing_eos")


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
