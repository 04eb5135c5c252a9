"""Model families, chosen by the `model_type` of a transformers config.

Each family module defines `Config` (a frozen dataclass with `from_hf`), `Model` (the NNX causal LM),
`HF_RULES` (its checkpoint name map), `HF_IGNORED` and `HF_BASE_PREFIX`.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import CheckpointError
from . import gemma, gpt2, llama

_FAMILIES: dict[str, ModuleType] = {t: m for m in (llama, gemma, gpt2) for t in m.MODEL_TYPES}
SUPPORTED_MODEL_TYPES = tuple(sorted(_FAMILIES))


def family(model_type: str) -> ModuleType:
    """The family module for a transformers `model_type`."""
    if model_type not in _FAMILIES:
        raise CheckpointError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return _FAMILIES[model_type]


def config_from_hf(hf_config):
    """Our frozen model config from a transformers config."""
    return family(hf_config.model_type).Config.from_hf(hf_config)
