"""Tiny random transformers models of every supported architecture, saved as real checkpoints.

The reference for every parity test is transformers' own PyTorch model on the same weights.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
_COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2)

# name -> transformers config. Each exercises what its family adds: GQA, biases, RoPE scaling, tied and
# untied heads, sliding windows shorter than the test sequences, q/k norms, soft-capping.
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**_COMMON, attention_bias=True, mlp_bias=True,
                                              rope_parameters=LLAMA3_ROPE),
    "llama_tied_linear_rope": lambda: transformers.LlamaConfig(
        **_COMMON, tie_word_embeddings=True,
        rope_parameters={"rope_type": "linear", "rope_theta": 100000.0, "factor": 2.0}),
    "mistral": lambda: transformers.MistralConfig(**_COMMON, head_dim=24, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**_COMMON, tie_word_embeddings=True),
    "qwen2_sliding": lambda: transformers.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=5,
                                                      max_window_layers=1),
    # Realistic head size for RoPE precision at far positions (tests/test_parity.py).
    "llama_head128": lambda: transformers.LlamaConfig(**{**_COMMON, "num_hidden_layers": 1}, head_dim=128,
                                                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "qwen3": lambda: transformers.Qwen3Config(**_COMMON, head_dim=24),
    # Gemma 1 reads hidden_act; a different hidden_activation beside it must not be used.
    "gemma": lambda: transformers.GemmaConfig(**_COMMON, head_dim=16, hidden_act="gelu_pytorch_tanh",
                                              hidden_activation="relu"),
    "gemma_untied": lambda: transformers.GemmaConfig(**_COMMON, head_dim=16, tie_word_embeddings=False),
    "gemma2": lambda: transformers.Gemma2Config(**_COMMON, head_dim=24, query_pre_attn_scalar=20,
                                                sliding_window=5, attn_logit_softcapping=2.0,
                                                final_logit_softcapping=3.0),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **_COMMON, head_dim=16, query_pre_attn_scalar=20, sliding_window=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 4.0}}),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=3, n_head=4),
    # A score scale per layer: data scanned with the stacked blocks.
    "gpt2_inverse_layer_scale": lambda: transformers.GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=3,
                                                                n_head=4, scale_attn_by_inverse_layer_idx=True),
}


def make_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A float32 transformers model whose every parameter (norms and biases too) is random."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[name](), attn_implementation="eager",
                                                          dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def batch(vocab: int = 128, seed: int = 0):
    """Token ids [3, 14] and a padding mask: row 0 full, row 1 right-padded, row 2 left-padded."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(0, vocab, size=(3, 14))
    mask = np.ones((3, 14), np.int32)
    mask[1, 10:] = 0
    mask[2, :4] = 0
    return ids, mask


def positions(mask: np.ndarray) -> np.ndarray:
    """What dpo_jax uses by default: real tokens counted from 0, padding does not move them."""
    return np.maximum(mask.cumsum(-1) - 1, 0)


def torch_logits(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions(mask)))
    return out.logits.float().numpy()


def relative_error(got: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """max |got - ref| / max |ref| over real (non-padding) positions."""
    valid = mask.astype(bool)
    return float(np.abs(got - ref)[valid].max() / np.abs(ref[valid]).max())


def with_custom_code(directory, marker, model_type: str | None = None) -> str:
    """`directory` (a saved model and tokenizer) made to ask for code of its own, as hub repos with custom
    architectures do: config.json and tokenizer_config.json name classes (`auto_map`) in Python files of the
    directory whose import appends the module's name (custom_config, custom_tokenizer) to the file `marker`.
    `model_type` replaces config.json's (an unknown one leaves transformers no built-in class to fall back on)."""
    import json
    from pathlib import Path

    directory = Path(directory)
    # transformers imports a copy from its modules cache: the marker's path is written in, not derived
    write_marker = f"with open({str(marker)!r}, 'a') as f:\n    f.write(__name__.rpartition('.')[2] + '\\n')\n"
    (directory / "custom_config.py").write_text(
        write_marker + "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n"
        f"    model_type = {model_type or 'llama'!r}\n")
    (directory / "custom_tokenizer.py").write_text(
        write_marker + "from transformers import PreTrainedTokenizerFast\n\n\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom_config.CustomConfig"}
    if model_type:
        config["model_type"] = model_type
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer["auto_map"] = {"AutoTokenizer": [None, "custom_tokenizer.CustomTokenizer"]}
    if model_type:
        tokenizer["tokenizer_class"] = "CustomTokenizer"  # no built-in class of that name either
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2))
    return str(directory)
