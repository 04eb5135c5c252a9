"""The data audit: what was read, dropped, truncated or suspicious, and how much padding the buckets cost.

`dpo-jax audit` prints it as a table; `dpo-jax train` prints a line per split (the table when rows were
skipped or pairs dropped) and writes it to `output_dir/data_audit.json` before loading the model. The bucket
and padding figures are those of the run's layout (`pack_pairs`). Any count named in `audit_fail_on` that is
above zero stops either command with exit status 2: `audit` before writing anything, `train` after writing
data_audit.json and before loading the model.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from .batching import BatchIterator
from .data import MAX_LISTED, Split
from .errors import UserError
from .pairs import Pairs

AUDIT_FILE = "data_audit.json"


def audit(pairs: Pairs, split: Split, batches: BatchIterator | None, tokenizer) -> dict:
    """Counts and first row numbers of everything worth knowing about one split before training on it; the
    bucket figures come from `batches` (None: no pair left to batch)."""
    p = pairs
    seqs = [(i, *p.sequence(i, w)) for i in range(len(p)) for w in ("chosen", "rejected")]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    # BOS tokens in the prompt part only: with bos == eos (GPT-2) a completion's EOS is not a BOS.
    bos_counts = np.array([int((ids[m == 0] == bos).sum()) for _, ids, m in seqs]) if bos is not None else None
    no_eos = np.zeros(len(p), bool)
    if eos is not None:
        for i, ids, m in seqs:
            no_eos[i] |= not (ids[m == 1] == eos).any()
    _, first = np.unique(p.pair_key, return_index=True)
    duplicate = np.ones(len(p), bool)
    duplicate[first] = False
    truncated = (p.prompt_length < p.raw_lengths["prompt"]) | p.truncated_at_max_length["chosen"] \
        | p.truncated_at_max_length["rejected"]
    for w in ("chosen", "rejected"):
        truncated |= p.completion_length[w] < p.raw_lengths[w]
    dropped = np.setdiff1d(np.arange(len(p.all_rows)), p.keep)

    def labels(mask) -> list:
        return [split.label(f, r) for f, r in zip(p.files[mask], p.rows[mask])]

    checks = {
        "skipped": [split.label(f, r) for f, r, _ in split.skipped],
        "dropped": [split.label(f, r) for f, r in zip(p.all_files[dropped], p.all_rows[dropped])],
        "truncated": labels(truncated),
        "identical": labels(p.flags["identical"]),
        "duplicates": labels(duplicate),
        "boundary_merges": labels(p.flags["boundary_merged"]),
        "doubled_bos": labels(p.flags["bos_fixed"] > 0),
        "missing_eos": labels(no_eos),
    }
    lengths = np.array([len(ids) for _, ids, _ in seqs], np.int64)
    edges = np.unique(np.linspace(0, max(int(lengths.max(initial=0)), 1), 9).round().astype(int))
    hist, _ = np.histogram(lengths, bins=edges)
    return {
        "source": split.title, "format": split.fmt, "implicit_prompt": split.implicit_prompt,
        "records_read": split.read, "pairs_kept": len(p),
        "counts": {k: len(v) for k, v in checks.items()},
        "first_rows": {k: v[:MAX_LISTED] for k, v in checks.items() if v},
        "skipped_reasons": [f"{split.where(f, r)}: {why}" for f, r, why in split.skipped[:MAX_LISTED]],
        "truncation": {"prompt": int((p.prompt_length < p.raw_lengths["prompt"]).sum()),
                       "completion": int(sum((p.completion_length[w] < p.raw_lengths[w]).sum()
                                             for w in ("chosen", "rejected"))),
                       "max_length": int(sum(v.sum() for v in p.truncated_at_max_length.values()))},
        "bos_in_prompt": {str(k): int((bos_counts == k).sum()) for k in np.unique(bos_counts)}
        if bos_counts is not None else None,
        "length_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        "layout": batches.layout if batches is not None else None,
        "buckets": _bucket_padding(batches) if batches is not None else [],
    }


def _bucket_padding(batches: BatchIterator) -> list[dict]:
    """Per row length: batches in the first epoch and the fraction of their token slots that are padding, in
    the batches' layout (pairs: two rows per pair; shared_prefix: one; packed: several pairs per row)."""
    p = batches.pairs
    per_pair = p.length["chosen"] + p.length["rejected"]  # the tokens a pair puts in the batch
    if batches.layout != "pairs":
        per_pair = p.shared_length
    order = batches.order(0).reshape(batches.steps_per_epoch, batches.batch_size)
    real = np.where(order >= 0, per_pair[np.maximum(order, 0)], 0).sum(axis=1)
    shapes = np.array([batches.rows_and_length(0, s) for s in range(batches.steps_per_epoch)]).reshape(-1, 2)
    slots = shapes[:, 0] * shapes[:, 1]
    out = []
    for b in sorted(set(batches.buckets) | set(shapes[:, 1].tolist())):  # packed: row_cap when a batch needs it
        sel = shapes[:, 1] == b
        total = int(slots[sel].sum())
        out.append({"length": int(b), "batches": int(sel.sum()),
                    "padding": round(1 - int(real[sel].sum()) / total, 4) if total else 0.0})
    return out


def batched(pairs: Pairs, split: Split, tokenizer, make_batches) -> tuple[BatchIterator, dict]:
    """(`make_batches(pairs)`, the split's audit); when no pair is left, a UserError that shows the audit table,
    which says what was dropped and why."""
    if len(pairs) == 0:
        report = audit(pairs, split, None, tokenizer)
        t = pairs.truncation
        why = (f"the prompts of all {pairs.dropped_prompt_too_long} pairs reach max_length ({t.max_length} tokens), "
               f"and keep_start drops such pairs (as TRL). Raise max_length, or cap the prompts with "
               f"max_prompt_length below it" if pairs.dropped_prompt_too_long else "see the audit")
        raise UserError(f"{split.title}: no preference pair is left to train or evaluate on: {why}.\n"
                        f"{format_table(report)}")
    batches = make_batches(pairs)
    return batches, audit(pairs, split, batches, tokenizer)


def summary(name: str, report: dict) -> str:
    """One line per split for `dpo-jax train`: what was kept, skipped, dropped and truncated."""
    c = report["counts"]
    return (f"data audit ({name}): {report['source']}: {report['pairs_kept']} pairs of {report['records_read']} "
            f"records; {c['skipped']} rows skipped, {c['dropped']} pairs dropped (prompt >= max_length), "
            f"{c['truncated']} truncated")


def conclude(reports: dict[str, dict], fail_on: tuple[str, ...], output_dir: str | None, say=print) -> None:
    """What `dpo-jax train` does with its audits before loading the model: a line per split (the whole table
    where rows were skipped or pairs dropped, or a check of `fail_on` fails), output_dir/data_audit.json, then
    the checks (after writing, so that a refused run's audit can be read). `say` None: a process other than the
    first, which only checks."""
    for name, report in reports.items():
        if say is not None:
            wrong = any(report["counts"][c] for c in ("skipped", "dropped", *fail_on) if c in report["counts"])
            say(format_table(report) if wrong else summary(name, report))
    if say is not None and output_dir:
        say(f"data audit written to {write(reports, output_dir)}")
    for report in reports.values():
        check(report, fail_on)


def check(report: dict, fail_on: tuple[str, ...]) -> None:
    """Stop when a count named in fail_on (checked names: config.DataConfig) is above zero."""
    failed = [c for c in fail_on if report["counts"][c]]
    if failed:
        details = "; ".join(f"{c}: {report['counts'][c]} (rows {', '.join(map(str, report['first_rows'][c]))}"
                            f"{', ...' if report['counts'][c] > MAX_LISTED else ''})" for c in failed)
        raise UserError(f"{report['source']}: the data audit found {details}, and audit_fail_on includes "
                        f"{', '.join(failed)}. Fix the data, or remove the check from audit_fail_on.")


def format_table(report: dict) -> str:
    """The audit as a short table for the terminal."""
    c = report["counts"]
    lines = [f"data audit: {report['source']} ({report['format']}"
             f"{', implicit prompt' if report['implicit_prompt'] else ''})",
             f"  {'records read':<32}{report['records_read']:>8}",
             f"  {'pairs kept':<32}{report['pairs_kept']:>8}"]
    names = {"skipped": "skipped (bad rows)", "dropped": "dropped (prompt >= max_length)",
             "truncated": "truncated pairs", "identical": "chosen == rejected", "duplicates": "duplicate pairs",
             "boundary_merges": "prompt/completion merges", "doubled_bos": "doubled BOS removed",
             "missing_eos": "completions without EOS"}
    for k, label in names.items():
        rows = report["first_rows"].get(k)
        lines.append(f"  {label:<32}{c[k]:>8}" + (f"   rows {', '.join(map(str, rows))}" if rows else ""))
    if report["bos_in_prompt"] is not None:
        lines.append(f"  {'BOS tokens per prompt':<32}" + ", ".join(
            f"{k}: {v} sequences" for k, v in report["bos_in_prompt"].items()))
    h = report["length_histogram"]
    lines.append(f"  {'sequence lengths (tokens)':<32}" + ", ".join(f"{a}-{b}: {n}" for a, b, n in
                                                       zip(h["edges"], h["edges"][1:], h["counts"])))
    if report["buckets"]:
        lines.append(f"  {'buckets (first epoch, ' + report['layout'] + ')':<31} " + ", ".join(
            f"{b['length']}: {b['batches']} batches, {b['padding']:.0%} padding" for b in report["buckets"]))
    if c["boundary_merges"]:
        lines.append(f"  warning: in {c['boundary_merges']} pairs the tokenized prompt is not a prefix of the tokenized "
                     f"prompt + completion (tokens merge across the boundary, or the chat template renders the prompt "
                     f"differently); as TRL, the completion starts where they diverge. End prompts on a token "
                     f"boundary, for instance with a newline, to train on the exact prompt.")
    if c["doubled_bos"]:
        lines.append(f"  warning: {c['doubled_bos']} prompts already began with the BOS token's text and the tokenizer "
                     f"added another; the extra BOS was removed (TRL would keep both).")
    return "\n".join(lines)


def write(reports: dict[str, dict], output_dir: str) -> str:
    """Write the audits of all splits to output_dir/data_audit.json atomically; returns the path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, AUDIT_FILE)
    fd, tmp = tempfile.mkstemp(dir=output_dir, prefix=".data_audit.")
    with os.fdopen(fd, "w") as f:
        json.dump(reports, f, indent=1)
    os.replace(tmp, path)
    return path
