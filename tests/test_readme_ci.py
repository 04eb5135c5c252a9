"""CI runs the README's own commands: the Quickstart install with the demo's smoke run in one fresh environment
(no test extras, so a missing run-time dependency fails it), then the test command in another."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _indented_commands(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if re.match(r"^    \S", line)]


def test_ci_runs_the_readme_commands_verbatim():
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = _indented_commands(quickstart)
    install = next(c for c in commands if "pip install -e ." in c and "torch" not in c)
    tests = next(c for c in commands if "python -m pytest" in c)
    assert "torch" not in install and "[test]" not in install
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci and tests in ci
    assert "dpo-jax demo --smoke" in ci and "dpo-jax demo --smoke" in quickstart
    assert ci.index(install) < ci.index("dpo-jax demo --smoke") < ci.index(tests)
    # the test environment is a second fresh one: the first is removed in between
    assert "rm -rf .venv" in ci[ci.index("dpo-jax demo --smoke"):ci.index(tests)]


def test_runtime_dependencies_are_declared():
    """Packages the library imports at run time (not only the tests' torch and TRL) are in `dependencies`."""
    import tomllib

    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=\[ ]", d, maxsplit=1)[0].lower() for d in declared}
    assert "jinja2" in names  # apply_chat_template needs it; transformers does not depend on it
