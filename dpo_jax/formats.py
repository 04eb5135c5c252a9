"""TRL's three preference formats: detect them, check a row's fields, extract an implicit prompt (the
checks of a whole split are data.validate's).

    standard        prompt, chosen, rejected are strings
    conversational  prompt, chosen, rejected are lists of {"role", "content"} messages
    implicit prompt only chosen and rejected; the prompt is their longest shared prefix
"""

from __future__ import annotations

import datasets


FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "developer", "user", "assistant", "tool")


def detect_format(ds: datasets.Dataset, column: str) -> str:
    """From the column's type; for a column of mixed types (datasets' Json), from its first values."""
    feature = ds.features[column]
    if isinstance(feature, datasets.Value):
        return "standard"
    if isinstance(feature, (datasets.List, datasets.LargeList, list)):
        return "conversational"
    return guess_format(ds.select(range(min(len(ds), 1000)))[column])


def guess_format(values: list) -> str:
    """The format of a column from its first non-null value (as TRL, which looks at the first example)."""
    first = next((v for v in values if v is not None), None)
    return "conversational" if isinstance(first, list) else "standard"


def check_field(name: str, value, fmt: str) -> str | None:
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


def check_implicit(chosen, rejected, fmt: str) -> str | None:
    if fmt == "conversational":
        prompt, _, _ = extract_prompt(clean_messages(chosen), clean_messages(rejected))
        if not prompt:
            return ("fields 'chosen' and 'rejected' share no leading messages before their last, so there is no "
                    "implicit prompt; add a 'prompt' column")
    return None


def clean_messages(messages: list[dict]) -> list[dict]:
    """Messages without the keys Arrow filled with None because other rows have them."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def extract_prompt(chosen, rejected):
    """Split the shared beginning of chosen and rejected off as the prompt: (prompt, chosen, rejected).

    As TRL's `extract_prompt`, on strings (characters) or message lists (whole messages): the prompt ends where
    the two first differ, a space just before that point goes with the completions, and when one is a prefix of
    the other the prompt stops one element before the shorter one ends. One difference: when they differ at the
    very first element, the prompt is empty (TRL's index -1 then takes all but the last element of chosen)."""
    n = min(len(chosen), len(rejected))
    i = next((k for k in range(n) if chosen[k] != rejected[k]), None)
    if i is None:
        i = n - 1
    elif isinstance(chosen, str) and i > 0 and chosen[i - 1] == " ":
        i -= 1
    return chosen[:i], chosen[i:], rejected[i:]
