"""Turn a split into `Pairs`: load, validate and tokenize it, and truncate the pairs as TRL does.

`Pairs` holds a split's tokenized pairs in host memory and their lengths after truncation (`Truncation`); the
batches are built from it by batching.py.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import datasets
import numpy as np

from .config import TRUNCATION_MODES, DataConfig
from .errors import UserError
from .data import load_split, validate
from .preprocess import tokenize



@dataclass(frozen=True)
class Truncation:
    max_length: int | None = 1024
    max_prompt_length: int | None = None
    max_completion_length: int | None = None
    truncation_mode: str = "keep_start"

    def __post_init__(self):
        if self.truncation_mode not in TRUNCATION_MODES:
            raise UserError(f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, "
                            f"not {self.truncation_mode!r}")
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be a positive number of tokens, not {value}")


class Pairs:
    """Tokenized pairs in host memory (ragged: flat token arrays plus offsets) and their lengths after truncation.

    Pairs whose prompt alone reaches max_length are dropped under keep_start, as TRL: nothing of their
    completions would be left to learn from."""

    def __init__(self, tokenized: datasets.Dataset, truncation: Truncation, bos_token_id: int | None,
                 sources: list[str] | None = None):
        self.truncation, self.bos, self.sources = truncation, bos_token_id, sources
        table = tokenized.with_format("arrow")[:]
        self.tokens = {k: _ragged(table.column(f"{k}_ids")) for k in ("prompt", "chosen", "rejected")}
        raw = {k: np.diff(offsets) for k, (_, offsets) in self.tokens.items()}
        t = truncation
        prompt = np.minimum(raw["prompt"], t.max_prompt_length or np.iinfo(np.int64).max)
        keep = np.ones(len(prompt), bool)
        if t.max_length is not None and t.truncation_mode == "keep_start":
            keep = prompt < t.max_length
        self.dropped_prompt_too_long = int((~keep).sum())
        self.keep = np.flatnonzero(keep)  # indices into the tokenized dataset
        self.all_rows, self.all_files = table.column("__row__").to_numpy(), table.column("__file__").to_numpy()
        self.rows, self.files = self.all_rows[self.keep], self.all_files[self.keep]  # where the kept pairs came from
        self.flags = {c: table.column(c).to_numpy(zero_copy_only=False)[self.keep]
                      for c in ("boundary_merged", "bos_fixed", "identical")}
        self.pair_key = np.asarray(table.column("pair_key").to_pylist(), dtype=object)[self.keep]
        self.raw_lengths = {k: v[self.keep] for k, v in raw.items()}
        self.prompt_length = prompt[self.keep]
        cap = t.max_completion_length or np.iinfo(np.int64).max
        self.completion_length = {k: np.minimum(self.raw_lengths[k], cap) for k in ("chosen", "rejected")}
        full = {k: self.prompt_length + v for k, v in self.completion_length.items()}
        self.length = {k: np.minimum(v, t.max_length or np.iinfo(np.int64).max) for k, v in full.items()}
        self.truncated_at_max_length = {k: full[k] > self.length[k] for k in full}

    def __len__(self) -> int:
        return len(self.keep)

    @property
    def pair_length(self) -> np.ndarray:
        """The longer of chosen and rejected, per pair: the length the pair needs in a batch."""
        return np.maximum(self.length["chosen"], self.length["rejected"])

    @property
    def shared_length(self) -> np.ndarray:
        """Length of the prompt-sharing row of each pair: prompt + chosen + rejected, as truncated."""
        return self.length["chosen"] + self.length["rejected"] - np.minimum(self.prompt_length, self.length["chosen"])

    def shared_row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pair i as one row, prompt + chosen + rejected: its ids, each token's branch (0 prompt, 1 chosen,
        2 rejected) and positions (the rejected restart after the prompt). The tokens are exactly those of
        `sequence(i, ...)` (keep_start truncation only)."""
        chosen, chosen_mask = self.sequence(i, "chosen")
        rejected, rejected_mask = self.sequence(i, "rejected")
        prompt = int((chosen_mask == 0).sum())
        ids = np.concatenate([chosen, rejected[prompt:]])
        branch = np.concatenate([np.where(chosen_mask == 1, 1, 0), np.full(len(rejected) - prompt, 2)])
        positions = np.concatenate([np.arange(len(chosen)), prompt + np.arange(len(rejected) - prompt)])
        return ids, branch.astype(np.int32), positions.astype(np.int32)

    def sequence(self, i: int, which: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and completion mask of pair i's chosen or rejected sequence, truncated."""
        t, j = self.truncation, self.keep[i]
        prompt = _span(self.tokens["prompt"], j)
        if len(prompt) > self.prompt_length[i]:  # max_prompt_length: keep the end, and BOS if there was one
            k = int(self.prompt_length[i])
            keep_bos = self.bos is not None and prompt[0] == self.bos and k > 1
            prompt = np.concatenate([prompt[:1], prompt[len(prompt) - k + 1:]]) if keep_bos else prompt[-k:]
        completion = _span(self.tokens[which], j)[:self.completion_length[which][i]]
        ids = np.concatenate([prompt, completion])
        mask = np.concatenate([np.zeros(len(prompt), np.int32), np.ones(len(completion), np.int32)])
        if t.max_length is not None and len(ids) > t.max_length:
            cut = slice(None, t.max_length) if t.truncation_mode == "keep_start" else slice(-t.max_length, None)
            ids, mask = ids[cut], mask[cut]
        return ids, mask

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse token ids the model has no embedding for (a jitted model would silently clip them)."""
        for name, (values, offsets) in self.tokens.items():
            bad = np.flatnonzero(values >= vocab_size)
            if len(bad):
                pair = np.searchsorted(offsets, bad[0], side="right") - 1
                where = f"row {self.all_rows[pair]}"
                if self.sources:
                    where = f"{self.sources[self.all_files[pair]]}, {where}"
                raise UserError(f"{where}: the {name} has token id {values[bad[0]]}, but the model's vocabulary "
                                f"has {vocab_size} entries. The tokenizer does not belong to this model (or "
                                f"added tokens the model was not resized for); use the model's own tokenizer.")

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash of the pairs' tokens and truncation: a data position only makes sense for the same data."""
        h = hashlib.blake2b(digest_size=8)
        for values, offsets in self.tokens.values():
            h.update(values.tobytes())
            h.update(offsets.tobytes())
        h.update(self.keep.tobytes())
        h.update(repr(self.truncation).encode())
        return h.hexdigest()


def _ragged(column) -> tuple[np.ndarray, np.ndarray]:
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy().astype(np.int64)
    return array.values.to_numpy().astype(np.int32), offsets


def _span(ragged, i: int) -> np.ndarray:
    values, offsets = ragged
    return values[offsets[i]:offsets[i + 1]]


def load_pairs(cfg: DataConfig, split: str, tokenizer):
    """Load, validate and tokenize one split: (Pairs, data.Split)."""
    truncation = Truncation(cfg.max_length, cfg.max_prompt_length, cfg.max_completion_length, cfg.truncation_mode)
    rows = load_split(cfg.dataset_name, split, config_name=cfg.dataset_config, on_bad_row=cfg.on_bad_row)
    rows = validate(rows, fmt=cfg.data_format, on_bad_row=cfg.on_bad_row)
    tokenized = tokenize(rows, tokenizer, num_proc=cfg.dataset_num_proc)
    return Pairs(tokenized, truncation, tokenizer.bos_token_id, rows.sources), rows
