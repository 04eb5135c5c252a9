"""Declarative maps between checkpoint tensor names and our parameter paths.

A rule is (their name template, our path template, transpose). `{i}` in a template stands for a layer
index, any other `{x}` for a short lowercase word, and the same placeholders fill the other side. One
table serves both directions: import (their name -> our path) and export (our path -> their name). A `{i}` on
their side only names a slice of a stacked parameter (our blocks hold each weight with a leading layer axis):
their `model.layers.3.mlp.up_proj.weight` is slice 3 of our `layers.mlp.up_proj.kernel`.
"""

from __future__ import annotations

import re
from typing import NamedTuple


class Target(NamedTuple):
    path: str
    transpose: bool
    layer: int | None = None  # the slice of a stacked parameter; None: the whole parameter


def _pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    regex = ""
    for k, part in enumerate(parts):
        if k % 2 == 0:
            regex += re.escape(part)
        else:
            regex += rf"(?P<{part}>\d+)" if part == "i" else rf"(?P<{part}>[a-z0-9]+)"
    return re.compile(regex)


class NameMap:
    def __init__(self, rules: tuple[tuple[str, str, bool], ...], ignored: tuple[str, ...] = (),
                 base_prefix: str = ""):
        self._forward = [(_pattern(theirs), ours, t) for theirs, ours, t in rules]
        self._backward = [(_pattern(ours), theirs, t) for theirs, ours, t in rules]
        self._ignored = [re.compile(p) for p in ignored]
        self._base_prefix = base_prefix

    def ignored(self, name: str) -> bool:
        return any(p.fullmatch(name) for p in self._ignored)

    def to_ours(self, name: str) -> Target | None:
        """Our path, whether to transpose and the layer slice, for one of their names; None if no rule matches.

        Names saved from a base model (no `model.` / `transformer.` prefix) are accepted too.
        """
        for candidate in (name, self._base_prefix + name):
            for pattern, ours, transpose in self._forward:
                m = pattern.fullmatch(candidate)
                if m:
                    fields = m.groupdict()
                    layer = int(fields["i"]) if "i" in fields and "{i}" not in ours else None
                    return Target(ours.format(**fields), transpose, layer)
        return None

    def to_theirs(self, path: str, layer: int | None = None) -> tuple[str, bool]:
        """Their name and whether to transpose, for our path (and the layer, for a slice of a stacked one)."""
        for pattern, theirs, transpose in self._backward:
            m = pattern.fullmatch(path)
            if m:
                return theirs.format(**m.groupdict(), **({} if layer is None else {"i": layer})), transpose
        raise KeyError(f"no checkpoint name for parameter {path!r}")
