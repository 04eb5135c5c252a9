"""Print the README's option table from the config dataclasses, or (--write) put it into README.md between
the `options:begin` / `options:end` markers."""

import argparse
import re
from pathlib import Path

from dpo_jax.options import option_table

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"(<!-- options:begin -->\n).*?(<!-- options:end -->)", re.DOTALL)


def with_table(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + option_table() + "\n" + m.group(2), text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", action="store_true", help="update README.md in place")
    if parser.parse_args().write:
        README.write_text(with_table(README.read_text()))
    else:
        print(option_table())
