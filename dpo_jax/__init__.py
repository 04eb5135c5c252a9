"""dpo-jax: Direct Preference Optimization of language models in JAX / Flax NNX."""

from .errors import CheckpointError, UserError
from .hf import from_pretrained, load_tokenizer
from .hf_export import export_pretrained
from .models import SUPPORTED_MODEL_TYPES

__all__ = ["CheckpointError", "SUPPORTED_MODEL_TYPES", "UserError", "export_pretrained", "from_pretrained",
           "load_tokenizer"]
__version__ = "0.1.0"
