"""The one parser of options, for the command line and YAML: one flat namespace of TRL's names over the
tree of `config.Options`.

Every field of `Options`' sections is an option (`--beta 0.1` on the command line, `beta: 0.1` in a
`--config run.yaml`); the command line overrides the YAML file. A name used by several sections (`seed`)
sets all of them. Unknown names and values outside a field's choices are errors that suggest the closest
valid one. `option_table()` renders the table of the README from these dataclasses, so it cannot drift.
`parse_values` is also what `evaluate`, `plan`, `bench` and `audit` read their run options with.

Why not a library's parser: transformers' HfArgumentParser puts every section's fields in one argparse
parser, so a name two sections share (`seed`) is a "conflicting option string" error, and its YAML is read
instead of the command line, not under it; TRL's TrlParser layers the two but needs trl (and so torch) at run
time; tyro and draccus name nested fields by their path (`--optim.learning_rate`), not by TRL's flat names.
None says which YAML key or value is wrong and what the closest valid one is. What is left to write here is
small: a value's conversion to its field's annotated type, and the merge of the file under the flags.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path

from .config import CHOICES, Options, check_choice
from .errors import UserError


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
        check_choice(name, parsed)
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


def split_flags(argv: list[str], names: tuple[str, ...]) -> tuple[dict[str, str | None], list[str]]:
    """A command's own flags (`plan --topology`, `evaluate --output_json`), not run options, taken out of `argv`:
    ({name: value or None}, the run options left for `parse_values`)."""
    found: dict[str, str | None] = dict.fromkeys(names)
    rest, i = [], 0
    while i < len(argv):
        name, eq, value = argv[i][2:].partition("=") if argv[i].startswith("--") else ("", "", "")
        if name in found:
            if not eq:
                if i + 1 >= len(argv):
                    raise UserError(f"option --{name} needs a value")
                value, i = argv[i + 1], i + 1
            found[name] = value
        else:
            rest.append(argv[i])
        i += 1
    return found, rest


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
