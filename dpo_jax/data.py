"""Preference datasets: load through `datasets`, detect the format, validate every row.

A split is read as a `datasets.Dataset` plus a `__row__` column holding each record's 1-based number in its
source, so that every message about a bad row can name the file, the row and the field. Formats are TRL's:

    standard        prompt, chosen, rejected are strings
    conversational  prompt, chosen, rejected are lists of {"role", "content"} messages
    implicit prompt only chosen and rejected; the prompt is their longest shared prefix (see preprocess.py)
"""

from __future__ import annotations

import bisect
import contextlib
import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from .errors import UserError

SAMPLE_DIR = Path(__file__).parent / "sample_data"
BUILTIN_DATASETS = {"builtin:sample": SAMPLE_DIR}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
FORMATS = ("auto", "standard", "conversational")
ON_BAD_ROW = ("error", "skip")
ROLES = ("system", "developer", "user", "assistant", "tool")
FIELDS = ("prompt", "chosen", "rejected")
ROW = "__row__"
MAX_LISTED = 5  # row numbers listed in a message


class MissingSplit(UserError):
    """The split asked for is not in the dataset (or the slice is malformed)."""


@dataclass
class Split:
    """The rows of one split, with where they came from and the rows skipped while reading them."""

    dataset: datasets.Dataset  # original columns plus ROW
    source: str  # the file or dataset name, as it appears in messages
    fmt: str = "standard"  # standard | conversational, set by `validate`
    implicit_prompt: bool = False
    read: int = 0  # records in the split as selected, bad ones included
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (row, reason) of rows left out

    def where(self, row: int) -> str:
        line = _jsonl_line(self.source, row)
        return f"{self.source}, row {row}" + (f" (line {line})" if line and line != row else "")


def load_split(name: str, split: str, *, config_name: str | None = None, on_bad_row: str = "error") -> Split:
    """Read `split` (a name or a slice such as "train[:90%]") of a local file, directory or hub dataset."""
    if on_bad_row not in ON_BAD_ROW:
        raise UserError(f"on_bad_row must be one of {', '.join(ON_BAD_ROW)}, not {on_bad_row!r}")
    path = Path(BUILTIN_DATASETS.get(name, name)).expanduser()
    if path.exists() and not os.access(path, os.R_OK):
        raise UserError(f"cannot read {path}: permission denied. Check the file's permissions.")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        saved = datasets.load_from_disk(str(path))
        splits = dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}
        return _select(splits, split, str(path), files={})
    if path.is_file():
        builder_name = FILE_BUILDERS.get(path.suffix.lower())
        if builder_name is None:
            raise UserError(f"{path}: unsupported file type {path.suffix!r}; use one of "
                            f"{', '.join(FILE_BUILDERS)} or a directory written by Dataset.save_to_disk")
        if path.stat().st_size == 0:
            raise UserError(f"{path} is empty: it holds no preference records.")
        files = {"train": [str(path)]}
        builder_args = dict(path=builder_name, data_files=files)
    elif path.is_dir():
        builder_args, files = dict(path=str(path)), None
    elif name.startswith((os.sep, ".", "~")) or path.suffix.lower() in FILE_BUILDERS:
        raise UserError(f"dataset {name!r} does not exist: no such file or directory.")
    else:
        builder_args, files = dict(path=name), None
    return _read_with_builder(builder_args, config_name, split, name, files, on_bad_row)


def _read_with_builder(builder_args, config_name, split, name, files, on_bad_row) -> Split:
    try:
        builder = datasets.load_dataset_builder(**builder_args, name=config_name)
    except Exception as e:  # offline hub, unknown name, bad config: datasets raises many kinds
        raise UserError(f"dataset {name!r} is neither a local file or directory nor loadable from the Hugging "
                        f"Face hub ({type(e).__name__}: {_first_line(e)}). Give a path to a JSON/JSONL/CSV/"
                        f"Parquet/Arrow file or a directory, or check the dataset name and your connection.") from e
    files = files or {str(k): [str(f) for f in v] for k, v in (builder.config.data_files or {}).items()}
    local = [f for fs in files.values() for f in fs if Path(f).is_file()]
    try:
        for f in local:  # pyarrow accepts some invalid UTF-8 and fails later, on first access: check up front
            if Path(f).suffix.lower() in (".json", ".jsonl", ".csv"):
                Path(f).read_bytes().decode("utf-8")
        with _quiet("datasets"):
            builder.download_and_prepare()
        splits = {s: builder.as_dataset(split=s) for s in builder.info.splits or files}
    except Exception as e:
        problems = {f: _diagnose(f) for f in local}
        bad = {f: p for f, p in problems.items() if p[1] or p[2]}
        only = next(iter(bad)) if len(bad) == 1 and all(len(v) == 1 for v in files.values()) else None
        if only and on_bad_row == "skip" and problems[only][0] is not None:
            return _lenient(only, split, files, problems[only])
        for f, (records, bad_rows, fatal) in bad.items():
            raise UserError(_bad_rows_message(f, bad_rows, fatal, lenient_ok=records is not None)) from e
        raise UserError(f"could not read dataset {name!r}: {type(e).__name__}: {_first_line(e)}") from e
    return _select(splits, split, name, files)


def _lenient(path: str, split: str, files: dict, problem) -> Split:
    """A JSON Lines file with bad lines, read line by line, keeping the valid records (on_bad_row=skip)."""
    records, bad_rows, _ = problem
    keep = [{k: r[k] for k in FIELDS if k in r} | {ROW: row} for row, r in records]
    split_name = next(s for s, fs in files.items() if path in fs)
    result = _select({split_name: datasets.Dataset.from_list(keep)}, split, path, {split_name: [path]})
    # A slice applies to the valid records; a bad row belongs to the selection of the valid row that follows it.
    valid = [row for row, _ in records]
    selected = set(result.dataset[ROW])

    def owner(row: int) -> int | None:
        return valid[min(bisect.bisect(valid, row), len(valid) - 1)] if valid else None

    result.skipped = [(row, why) for row, why in bad_rows if owner(row) in selected]
    result.read += len(result.skipped)
    return result


def _select(splits: dict, spec: str, name: str, files: dict) -> Split:
    """Apply a split spec ("train", "train[:90%]", "train+test") and number the rows."""
    sizes = {s: len(d) for s, d in splits.items()}
    try:
        parts = datasets.ReadInstruction.from_spec(spec).to_absolute(sizes)
    except (ValueError, AssertionError, KeyError) as e:
        raise MissingSplit(f"split {spec!r} is not available in {name}: the splits are {', '.join(sizes) or 'none'} "
                        f"({_first_line(e)}). Slices look like train[:90%] or train[100:200].") from e
    pieces = []
    for p in parts:
        d = splits[p.splitname]
        if ROW not in d.column_names:
            d = d.add_column(ROW, np.arange(1, len(d) + 1, dtype=np.int64))
        pieces.append(d.select(range(p.from_, p.to)))
    dataset = pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
    split_files = [f for p in parts for f in files.get(p.splitname, [])]
    source = split_files[0] if len(split_files) == 1 else f"{name} [{spec}]"
    if len(dataset) == 0:
        raise UserError(f"{source}: split {spec!r} has no rows.")
    return Split(dataset=dataset, source=source, read=len(dataset))


# ----------------------------------------------------------------------------------------------- validation
def validate(split: Split, *, fmt: str = "auto", on_bad_row: str = "error") -> Split:
    """Check every row's fields; drop bad rows (on_bad_row=skip) or stop at them with their row numbers."""
    if fmt not in FORMATS:
        raise UserError(f"data format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    ds = split.dataset
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise UserError(f"{split.source}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}. A "
                        f"preference dataset needs 'chosen' and 'rejected' (and usually 'prompt'); the columns found "
                        f"are {', '.join(c for c in ds.column_names if c != ROW)}. Rename the columns in the file, "
                        f"or with datasets' rename_column.")
    split.fmt = _detect_format(ds) if fmt == "auto" else fmt
    has_prompt = "prompt" in ds.column_names
    if has_prompt and fmt == "auto" and _detect_format(ds, "prompt") != _detect_format(ds, "chosen"):
        has_prompt = False  # as TRL: a string prompt beside conversational chosen/rejected is extracted from them
    split.implicit_prompt = not has_prompt
    fields = FIELDS if has_prompt else FIELDS[1:]
    bad: list[tuple[int, str]] = []
    good_idx: list[int] = []
    for start in range(0, len(ds), 1000):
        batch = ds[start:start + 1000]
        for i, row in enumerate(batch[ROW]):
            problem = next((p for f in fields if (p := _check(f, batch[f][i], split.fmt))), None)
            if not problem and split.implicit_prompt and split.fmt == "conversational":
                problem = _check_shared_start(batch["chosen"][i], batch["rejected"][i])
            if problem:
                bad.append((row, problem))
            else:
                good_idx.append(start + i)
    if bad and on_bad_row == "error":
        raise UserError(_row_error(split, bad))
    if bad:
        split.skipped += bad
        split.dataset = ds.select(good_idx)
    if len(split.dataset) == 0:
        raise UserError(f"{split.source}: no valid rows left ({len(split.skipped)} skipped, first: "
                        f"{_row_list(split.skipped)}).")
    return split


def _detect_format(ds: datasets.Dataset, column: str = "chosen") -> str:
    """From the column's type; for a column of mixed types (datasets' Json), from its first value, as TRL."""
    feature = ds.features[column]
    if isinstance(feature, datasets.Value):
        return "standard"
    if isinstance(feature, (datasets.List, datasets.LargeList)) or isinstance(feature, list):
        return "conversational"
    first = next((v for v in ds.select(range(min(len(ds), 1000)))[column] if v is not None), None)
    return "conversational" if isinstance(first, list) else "standard"


def _check(name: str, value, fmt: str) -> str | None:
    """What is wrong with one field, or None."""
    if value is None:
        return f"field '{name}' is null; give it a value or remove the row"
    if fmt == "standard":
        if not isinstance(value, str):
            return (f"field '{name}' is a {type(value).__name__}, expected a string"
                    + (" (this looks like a conversation; use the conversational format)"
                       if isinstance(value, list) else ""))
        return f"field '{name}' is empty" if not value.strip() else None
    if not isinstance(value, list):
        return f"field '{name}' is a {type(value).__name__}, expected a list of {{role, content}} messages"
    if not value:
        return f"field '{name}' is an empty list of messages"
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            return f"field '{name}', message {j + 1} is a {type(m).__name__}, expected {{role, content}}"
        role, content = m.get("role"), m.get("content")
        if role is None:
            return f"field '{name}', message {j + 1} has no 'role'"
        if role not in ROLES:
            return f"field '{name}', message {j + 1} has unknown role {role!r}; roles are {', '.join(ROLES)}"
        if content is None:
            return f"field '{name}', message {j + 1} has no 'content'"
        if not isinstance(content, str):
            return f"field '{name}', message {j + 1}: 'content' is a {type(content).__name__}, expected a string"
        if not content.strip():
            return f"field '{name}', message {j + 1} has empty 'content'"
    return None


def _check_shared_start(chosen: list, rejected: list) -> str | None:
    if clean_messages(chosen[:1]) != clean_messages(rejected[:1]):
        return ("fields 'chosen' and 'rejected' start with different messages, so there is no implicit prompt; "
                "add a 'prompt' column")
    return None


def clean_messages(messages: list[dict]) -> list[dict]:
    """Messages without the keys Arrow filled with None because other rows have them."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def _row_error(split: Split, bad: list[tuple[int, str]]) -> str:
    row, problem = bad[0]
    more = f" {len(bad) - 1} more bad rows: {_row_list(bad[1:])}." if len(bad) > 1 else ""
    return (f"{split.where(row)}: {problem}.{more} Fix the data, or pass --on_bad_row skip to leave such rows out "
            f"(they are counted in the data audit).")


def _row_list(bad) -> str:
    rows = [str(r) for r, _ in bad[:MAX_LISTED]]
    return "rows " + ", ".join(rows) + (", ..." if len(bad) > MAX_LISTED else "")


# --------------------------------------------------------------------------------- diagnosing unreadable files
def _diagnose(path: str):
    """Why datasets could not read a file: (records or None, [(row, reason)], fatal reason or None).

    records is the list of (row, object) of a JSON Lines file that can be read leniently; None when the file
    cannot be split into rows (a JSON array, CSV)."""
    data = Path(path).read_bytes()
    if not data.strip():
        return None, [], "the file is empty"
    suffix = Path(path).suffix.lower()
    if suffix in (".parquet", ".arrow"):
        return None, [], f"not a valid {suffix[1:]} file"
    if suffix == ".csv" or data.lstrip()[:1] == b"[":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            return None, [], f"line {line} is not valid UTF-8; re-save the file as UTF-8"
        if suffix == ".csv":
            return None, *_csv_problem(text)
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return None, [], f"not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        return None, [], None
    records, bad = [], []
    row = 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        row += 1
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append((row, "not valid UTF-8; re-save the file as UTF-8"))
            continue
        except json.JSONDecodeError as e:
            bad.append((row, f"not valid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            bad.append((row, f"a JSON {type(obj).__name__}, expected an object with prompt/chosen/rejected"))
            continue
        records.append((row, obj))
    # Field problems too, so that one message (or one skip) covers every bad row of the file.
    fmt = "conversational" if records and isinstance(records[0][1].get("chosen"), list) else "standard"
    checked = [(row, r, next((p for f in FIELDS if f in r and (p := _check(f, r[f], fmt))), None))
               for row, r in records]
    bad = sorted(bad + [(row, p) for row, _, p in checked if p is not None])
    return [(row, r) for row, r, p in checked if p is None], bad, None


def _csv_problem(text: str):
    rows = list(csv.reader(io.StringIO(text)))
    width = len(rows[0]) if rows else 0
    for i, r in enumerate(rows[1:], start=1):
        if r and len(r) != width:
            return [], f"row {i} has {len(r)} fields, the header has {width}; quote fields that contain commas"
    return [], None


def _bad_rows_message(path, bad_rows, fatal, lenient_ok) -> str:
    if fatal:
        return f"{path}: {fatal}."
    row, why = bad_rows[0]
    line = _jsonl_line(path, row)
    more = f" {len(bad_rows) - 1} more bad rows: {_row_list(bad_rows[1:])}." if len(bad_rows) > 1 else ""
    hint = " Fix the file, or pass --on_bad_row skip to leave such rows out." if lenient_ok else " Fix the file."
    return f"{path}, row {row}" + (f" (line {line})" if line and line != row else "") + f": {why}.{more}{hint}"


def _jsonl_line(path: str, row: int) -> int | None:
    """The line of a JSON Lines file that holds record `row` (blank lines are not records)."""
    if Path(path).suffix.lower() != ".jsonl" or not Path(path).is_file():
        return None
    seen = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            seen += bool(raw.strip())
            if seen == row:
                return number
    return None


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence a library's own error log while we turn its exception into a clear message."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:300] if text else type(e).__name__
