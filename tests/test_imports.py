"""The package's imports point one way (STYLE.md): each module imports only modules above it in `ORDER`.

Read from the source (every `import`, also those inside functions), so a lazy import that would close a
cycle counts too. A new module gets its place in ORDER; a test failing here names the import that points up.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "dpo_jax"

# Top to bottom. sharding sits above the models: they declare their logical axes and constrain activations
# with it, and it imports nothing but errors.
ORDER = [
    "errors", "config", "options", "sharding",
    "formats", "data", "preprocess", "pairs", "batching", "prefetch", "audit",
    "models.kernels", "models.attention", "models.cache", "models.rope", "models.layers", "models.blocks",
    "models.llama", "models.gemma", "models.gpt2", "models", "models.quant",
    "namemap", "gguf", "assets", "checkpoint", "hf", "lora", "hf_export",
    "logps", "losses", "step", "reference", "memory", "hlo", "plan",
    "report", "rundir", "distributed", "trainer", "runs", "generate",
    "", "demo", "bench_trl", "bench", "cli", "__main__",
]


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module (relative to dpo_jax, "" for the package) -> the package's modules it imports."""
    paths = {_module(p): p for p in PACKAGE.rglob("*.py")}
    out = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".") if package else []
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import step`: a module; `from . import load_tokenizer`: a name of the package
                names = [f"{target}.{a.name}".lstrip(".") for a in node.names] if node.module is None else [target]
                found |= {n if n in paths else n.rpartition(".")[0] for n in names}
            elif isinstance(node, ast.Import):
                found |= {a.name.removeprefix("dpo_jax").lstrip(".") for a in node.names
                          if a.name.split(".")[0] == "dpo_jax"}
        out[name] = found - {name}
    return out


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for n in graph[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def test_every_module_has_its_place():
    assert sorted(imports()) == sorted(ORDER), "add the new module to ORDER, below everything it imports"


def test_imports_point_down_only():
    rank = {name: i for i, name in enumerate(ORDER)}
    upward = [f"{name or 'dpo_jax'} imports {dep or 'dpo_jax'}" for name, deps in imports().items()
              for dep in deps if rank[dep] >= rank[name]]
    assert not upward, upward


def test_configuration_and_readers_stand_alone():
    graph = imports()
    assert graph["config"] == {"errors"}  # the option tree imports no compute module
    assert graph["options"] <= {"config", "errors"}
    for reader in ("checkpoint", "hf", "gguf"):  # reading weights needs no LoRA
        assert "lora" not in reachable(graph, reader), reader
