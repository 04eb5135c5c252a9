"""A tiny model learns the bundled preferences: train rewards/accuracies reach 0.95 within a few hundred steps."""

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from dpo_jax import from_pretrained
from dpo_jax import step as S
from dpo_jax.batching import BatchIterator
from dpo_jax.pairs import load_pairs
from dpo_jax.config import DataConfig
from dpo_jax.data import SAMPLE_DIR
from dpo_jax.losses import LossConfig


def sample_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of 1024 tokens trained on the sample data, so the tiny model's head stays small."""
    import json

    texts = [v for line in open(SAMPLE_DIR / "train.jsonl") for k, v in json.loads(line).items() if k != "category"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.mark.slow
def test_tiny_model_learns_the_sample_preferences(tmp_path):
    tokenizer = sample_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    pairs, _ = load_pairs(DataConfig(dataset_name="builtin:sample", max_length=256), "train", tokenizer)
    batches = BatchIterator(pairs, global_batch_size=8, pad_token_id=tokenizer.pad_token_id, seed=0)

    cfg = S.StepConfig(loss=LossConfig(beta=0.1))
    graphdef, params = S.split_policy(from_pretrained(str(tmp_path / "model")), cfg.gradient_checkpointing)
    ref_graphdef, ref_params = S.split_reference(from_pretrained(str(tmp_path / "model")))
    tx = S.make_optimizer(S.OptimConfig(learning_rate=1e-3, lr_scheduler_type="constant"), 300)
    state = S.init_state(params, tx)
    train_step = S.compile_train_step(graphdef, ref_graphdef, cfg, tx, None, state, ref_params)
    accuracies, losses = [], []
    for _ in range(240):
        state, metrics = train_step(state, ref_params, next(batches))
        accuracies.append(float(metrics["rewards/accuracies"]))
        losses.append(float(metrics["loss"]))
    assert abs(losses[0] - np.log(2)) < 1e-6
    assert np.mean(accuracies[-40:]) >= 0.95, accuracies[-40:]
    assert np.mean(losses[-40:]) < 0.3
