"""Preference datasets: read a split through `datasets`, numbering every record in its own file.

A split is a `datasets.Dataset` plus two columns: `__file__` (index into `Split.sources`) and `__row__` (the
record's 1-based number in that file; blank lines of JSON Lines and CSV files are not records). Every message
about a bad row names the file, the row and the field. Local files are read one by one (each with the
`datasets` builder for its type, cached), so a bad file is diagnosed, and with `on_bad_row="skip"` read
leniently, on its own. Hub datasets go through `datasets.load_dataset` and are numbered per split.
`validate` checks every row of a split against formats.py's rules.
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

from .config import DATA_FORMATS, ON_BAD_ROW
from .errors import UserError
from .formats import FIELDS, check_field, check_implicit, detect_format, guess_format

SAMPLE_DIR = Path(__file__).parent / "sample_data"
BUILTIN_DATASETS = {"builtin:sample": SAMPLE_DIR}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}

PASSED_THROUGH = ("tools", "chat_template_kwargs")  # per-row chat template arguments, as TRL
ROW, FILE = "__row__", "__file__"
MAX_LISTED = 5  # row numbers listed in a message


class MissingSplit(UserError):
    """The split asked for is not in the dataset (or the slice is malformed); `splits` are the dataset's own
    (empty when not known), so that a caller can fall back to a dataset's only split."""

    def __init__(self, message: str, splits=()):
        super().__init__(message)
        self.splits = tuple(splits)


@dataclass
class Split:
    """The rows of one split, where they came from, and the rows skipped while reading them."""

    dataset: datasets.Dataset  # the original columns plus FILE and ROW
    sources: list[str]  # file paths (or "name [split]" for hub datasets), indexed by FILE
    title: str  # the dataset and split, for tables
    fmt: str = "standard"  # standard | conversational, set by validate
    implicit_prompt: bool = False
    read: int = 0  # records in the split as selected, bad ones included
    skipped: list[tuple[int, int, str]] = field(default_factory=list)  # (file, row, reason) of rows left out

    def where(self, file: int, row: int) -> str:
        """"path, row N" (and the line of a JSON Lines file when blank lines make it differ)."""
        line = _jsonl_line(self.sources[file], row)
        return f"{self.sources[file]}, row {row}" + (f" (line {line})" if line and line != row else "")

    def label(self, file: int, row: int) -> int | str:
        """A row's short name in lists: its number, prefixed by its file's name when the split has several."""
        return int(row) if len(self.sources) == 1 else f"{Path(self.sources[file]).name}:{row}"


def load_split(name: str, split: str, *, config_name: str | None = None, on_bad_row: str = "error") -> Split:
    """Read `split` (a name, a slice such as "train[:90%]", or "train+test") of a local file, a directory of data
    files, a `save_to_disk` directory, `builtin:sample`, or a hub dataset."""
    if on_bad_row not in ON_BAD_ROW:
        raise UserError(f"on_bad_row must be one of {', '.join(ON_BAD_ROW)}, not {on_bad_row!r}")
    path = Path(BUILTIN_DATASETS.get(name, name)).expanduser()
    if path.exists() and not os.access(path, os.R_OK):
        raise UserError(f"cannot read {path}: permission denied. Check the file's permissions.")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        saved = _load_from_disk(path)
        return _whole_splits(dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved},
                             split, str(path))
    if path.is_file():
        files = {"train": [str(path)]}
    elif path.is_dir():
        try:
            builder = datasets.load_dataset_builder(str(path))
        except Exception as e:
            raise UserError(f"{path}: no data files found ({_first_line(e)}). A dataset directory holds files "
                            f"such as train.jsonl and test.jsonl.") from e
        files = {str(s): [str(f) for f in fs] for s, fs in (builder.config.data_files or {}).items()}
    elif name.startswith((os.sep, ".", "~")) or path.suffix.lower() in FILE_BUILDERS:
        raise UserError(f"dataset {name!r} does not exist: no such file or directory.")
    else:
        return _hub(name, config_name, split)
    return _local(files, split, str(path), on_bad_row)


def validate(split: Split, *, fmt: str = "auto", on_bad_row: str = "error") -> Split:
    """Check every row's fields; drop bad rows (on_bad_row=skip) or stop at them with their row numbers."""
    if fmt not in DATA_FORMATS:
        raise UserError(f"data_format must be one of {', '.join(DATA_FORMATS)}, not {fmt!r}")
    ds = split.dataset
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise UserError(f"{split.title}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}. A "
                        f"preference dataset needs 'chosen' and 'rejected' (and usually 'prompt'); the columns found "
                        f"are {', '.join(c for c in ds.column_names if c not in (ROW, FILE))}. Rename the columns "
                        f"in the file, or with datasets' rename_column.")
    split.fmt = detect_format(ds, "chosen") if fmt == "auto" else fmt
    has_prompt = "prompt" in ds.column_names
    if has_prompt and fmt == "auto" and detect_format(ds, "prompt") != split.fmt:
        # A string prompt beside conversational completions: extracted from them, as TRL's maybe_extract_prompt
        # does (its DPOTrainer would fail on such data).
        has_prompt = False
    split.implicit_prompt = not has_prompt
    fields = FIELDS if has_prompt else FIELDS[1:]
    bad: list[tuple[int, int, str]] = []
    good: list[int] = []
    for start in range(0, len(ds), 1000):
        batch = ds[start:start + 1000]
        for i, (file, row) in enumerate(zip(batch[FILE], batch[ROW])):
            problem = next((p for f in fields if (p := check_field(f, batch[f][i], split.fmt))), None)
            if not problem and split.implicit_prompt:
                problem = check_implicit(batch["chosen"][i], batch["rejected"][i], split.fmt)
            if problem:
                bad.append((file, row, problem))
            else:
                good.append(start + i)
    if bad and on_bad_row == "error":
        file, row, problem = bad[0]
        more = f" {len(bad) - 1} more bad rows: {row_list([split.label(f, r) for f, r, _ in bad[1:]])}." \
            if len(bad) > 1 else ""
        raise UserError(f"{split.where(file, row)}: {problem}.{more} Fix the data, or pass --on_bad_row skip to "
                        f"leave such rows out (they are counted in the data audit).")
    if bad:
        split.skipped += bad
        split.dataset = ds.select(good)
    if len(split.dataset) == 0:
        raise UserError(f"{split.title}: no valid rows left ({len(split.skipped)} skipped: "
                        f"{row_list([split.label(f, r) for f, r, _ in split.skipped])}).")
    return split


def _load_from_disk(path: Path):
    """A `save_to_disk` folder; one whose files are missing or damaged is a UserError naming it."""
    try:
        with _quiet("datasets"):
            return datasets.load_from_disk(str(path))
    except Exception as e:  # FileNotFoundError (data files gone), JSONDecodeError / KeyError (state.json), ArrowInvalid
        raise UserError(f"{path}: a Dataset.save_to_disk folder whose files are missing or damaged "
                        f"({type(e).__name__}: {_first_line(e)}). Save the dataset again with "
                        f"Dataset.save_to_disk (or DatasetDict.save_to_disk) into an empty folder, or give the data "
                        f"files themselves (JSON Lines, Parquet, ...).") from e


def _local(files: dict[str, list[str]], spec: str, name: str, on_bad_row: str) -> Split:
    sources: list[str] = []
    splits, skipped = {}, []
    for s in _split_names(spec):
        if s not in files:
            raise MissingSplit(f"split {s!r} is not in {name}: the splits are {', '.join(files) or 'none'}. Slices "
                               f"look like train[:90%] or train[100:200].", splits=files)
        if s in splits:
            continue
        parts = []
        for f in files[s]:
            sources.append(f)
            ds, bad = _read_file(f, on_bad_row)
            parts.append(ds.add_column(FILE, np.full(len(ds), len(sources) - 1, np.int32)))
            skipped += [(len(sources) - 1, row, why) for row, why in bad]
        splits[s] = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    result = _select(splits, spec, name, sources)
    result.skipped = _skipped_in_selection(skipped, splits, result.dataset)
    result.read += len(result.skipped)
    return result


def _read_file(path: str, on_bad_row: str) -> tuple[datasets.Dataset, list[tuple[int, str]]]:
    """One data file with its records numbered, and the (row, reason) of records skipped while reading it."""
    suffix = Path(path).suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise UserError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(FILE_BUILDERS)} or a "
                        f"directory written by Dataset.save_to_disk")
    if Path(path).stat().st_size == 0:
        raise UserError(f"{path} is empty: it holds no preference records.")
    try:
        if suffix in (".json", ".jsonl", ".csv"):  # pyarrow lets some invalid UTF-8 through until first access
            Path(path).read_bytes().decode("utf-8")
        with _quiet("datasets"):
            ds = datasets.load_dataset(FILE_BUILDERS[suffix], data_files=path, split="train")
    except Exception as e:
        records, bad, fatal = _diagnose(path)
        if fatal or not bad:
            raise UserError(f"{path}: {fatal or f'could not be read ({type(e).__name__}: {_first_line(e)})'}.") from e
        if on_bad_row == "error" or records is None:
            raise UserError(_bad_rows_message(path, bad, lenient_ok=records is not None)) from e
        return _from_records(records), bad
    if len(ds) == 0:
        raise UserError(f"{path} is empty: it holds no preference records.")
    return ds.add_column(ROW, np.arange(1, len(ds) + 1, dtype=np.int64)), []


def _from_records(records: list[tuple[int, dict]]) -> datasets.Dataset:
    """The readable records of a JSON Lines file (on_bad_row=skip); a column missing from some is null there."""
    keys = [k for k in FIELDS + PASSED_THROUGH if any(k in r for _, r in records)]
    columns = {k: [r.get(k) for _, r in records] for k in keys}
    return datasets.Dataset.from_dict({**columns, ROW: [row for row, _ in records]})


def _hub(name: str, config_name: str | None, spec: str) -> Split:
    try:
        with _quiet("datasets"):
            loaded = datasets.load_dataset(name, config_name)
    except Exception as e:  # offline hub, unknown name, bad config: datasets raises many kinds
        raise UserError(f"dataset {name!r} is neither a local file or directory nor loadable from the Hugging "
                        f"Face hub ({type(e).__name__}: {_first_line(e)}). Give a path to a JSON/JSONL/CSV/"
                        f"Parquet/Arrow file or a directory, or check the dataset name and your connection.") from e
    return _whole_splits(dict(loaded), spec, name)


def _whole_splits(splits: dict, spec: str, name: str) -> Split:
    """Splits that are not files of ours (hub, save_to_disk): one source per split, rows numbered in the split."""
    sources, numbered = [], {}
    for s in _split_names(spec):
        if s in splits and s not in numbered:
            sources.append(f"{name} [{s}]")
            d = splits[s]
            numbered[s] = d.add_column(ROW, np.arange(1, len(d) + 1, dtype=np.int64)).add_column(
                FILE, np.full(len(d), len(sources) - 1, np.int32))
    missing = [s for s in _split_names(spec) if s not in splits]
    if missing:
        raise MissingSplit(f"split {missing[0]!r} is not in {name}: the splits are {', '.join(splits) or 'none'}.",
                           splits=splits)
    return _select(numbered, spec, name, sources)


def _select(splits: dict, spec: str, name: str, sources: list[str]) -> Split:
    """Apply a split spec ("train", "train[:90%]", "train+test") to whole, numbered splits."""
    try:
        parts = datasets.ReadInstruction.from_spec(spec).to_absolute({s: len(d) for s, d in splits.items()})
    except (ValueError, AssertionError, KeyError) as e:
        raise MissingSplit(f"split {spec!r} cannot be read from {name} ({_first_line(e)}). Slices look like "
                           f"train[:90%] or train[100:200].") from e
    pieces = [splits[p.splitname].select(range(p.from_, p.to)) for p in parts]
    dataset = pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)
    title = sources[0] if len(sources) == 1 and spec in ("train", *splits) else f"{name} [{spec}]"
    if len(dataset) == 0:
        raise UserError(f"{title}: split {spec!r} has no rows.")
    return Split(dataset=dataset, sources=sources, title=title, read=len(dataset))


def _skipped_in_selection(skipped, splits: dict, selected: datasets.Dataset) -> list[tuple[int, int, str]]:
    """The skipped rows that belong to the selection: a skipped row goes with the next readable row of its file
    (or the last one), so a slice is taken over the readable records and the bad ones fall in with them."""
    if not skipped:
        return []
    readable: dict[int, list[int]] = {}
    for d in splits.values():
        for f, r in zip(d[FILE], d[ROW]):
            readable.setdefault(f, []).append(r)
    chosen = set(zip(selected[FILE], selected[ROW]))
    out = []
    for f, row, why in skipped:
        rows = readable.get(f, [])
        owner = rows[min(bisect.bisect(rows, row), len(rows) - 1)] if rows else None
        if (f, owner) in chosen:
            out.append((f, row, why))
    return out


def _split_names(spec: str) -> list[str]:
    return [part.split("[")[0].strip() for part in spec.split("+")]


# --------------------------------------------------------------------------------- diagnosing unreadable files
def _diagnose(path: str):
    """Why datasets could not read a file: (records or None, [(row, reason)], fatal reason or None).

    records is the list of (row, object) of the readable records of a JSON Lines file, which can be read
    leniently; None for a file that cannot be split into records (a JSON array, CSV)."""

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
            return None, _csv_problems(text), None
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
    fmt = guess_format([r.get("chosen") for _, r in records])
    checked = [(row, r, next((p for f in FIELDS if f in r and (p := check_field(f, r[f], fmt))), None))
               for row, r in records]
    bad = sorted(bad + [(row, p) for row, _, p in checked if p is not None])
    return [(row, r) for row, r, p in checked if p is None], bad, None


def _csv_problems(text: str) -> list[tuple[int, str]]:
    rows = [r for r in csv.reader(io.StringIO(text)) if r]  # blank lines are not records
    width = len(rows[0]) if rows else 0
    return [(i, f"{len(r)} fields, the header has {width}; quote fields that contain commas")
            for i, r in enumerate(rows[1:], start=1) if len(r) != width][:1]


def _bad_rows_message(path: str, bad: list[tuple[int, str]], lenient_ok: bool) -> str:
    row, why = bad[0]
    line = _jsonl_line(path, row)
    more = f" {len(bad) - 1} more bad rows: {row_list([r for r, _ in bad[1:]])}." if len(bad) > 1 else ""
    hint = " Fix the file, or pass --on_bad_row skip to leave such rows out." if lenient_ok else " Fix the file."
    return f"{path}, row {row}" + (f" (line {line})" if line and line != row else "") + f": {why}.{more}{hint}"


def row_list(rows: list) -> str:
    return "rows " + ", ".join(map(str, rows[:MAX_LISTED])) + (", ..." if len(rows) > MAX_LISTED else "")


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
