"""The KV-cache sampler against transformers' `generate` on the same weights, for every architecture."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dpo_jax
from dpo_jax.errors import UserError
from dpo_jax.generate import PROMPT_MULTIPLE, generate, generate_text
from dpo_jax.models import SUPPORTED_MODEL_TYPES
from dpo_jax.models.cache import KVCache
from tiny_models import CONFIGS, make_model

NEW = 12


def _prompts(lengths, seed=1):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, 128, size=n).tolist() for n in lengths]


def _transformers_greedy(model, prompt, new=NEW):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


# One tiny model per supported model_type (the other tiny models vary what the forward parity tests cover).
ONE_PER_MODEL_TYPE = ("llama", "mistral", "qwen2_sliding", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2")


def test_every_model_type_is_covered():
    assert {CONFIGS[n]().model_type for n in ONE_PER_MODEL_TYPE} == set(SUPPORTED_MODEL_TYPES)


@pytest.mark.parametrize("name", ONE_PER_MODEL_TYPE)
def test_greedy_matches_transformers(name, tmp_path):
    """Prompts of different lengths in one batch (left padding), generating past the sliding windows (5
    tokens): token for token transformers' greedy output. A prompt longer than a length bucket: every token
    is the argmax of transformers' forward over the prompt and the tokens before it. (transformers' own
    `generate` departs from its forward there for the sliding-window models, Mistral and Gemma 3.)"""
    ref = make_model(name)
    ref.save_pretrained(tmp_path)
    model = dpo_jax.from_pretrained(str(tmp_path))
    prompts = _prompts((5, 9, 3))
    assert generate(model, prompts, NEW) == [_transformers_greedy(ref, p) for p in prompts]
    if name != "gpt2":  # its table has 32 positions
        long = _prompts((PROMPT_MULTIPLE + 1,))[0]
        new = generate(model, [long], NEW)[0]
        with torch.no_grad():
            logits = ref(torch.tensor([long + new])).logits[0].numpy()
        assert new == logits[len(long) - 1:-1].argmax(-1).tolist()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    ref = make_model("llama")
    ref.save_pretrained(path)
    return dpo_jax.from_pretrained(str(path)), ref


def test_stops_at_end_of_sequence_per_row(llama):
    model, _ = llama
    prompts = _prompts((5, 9))
    full = generate(model, prompts, NEW)
    eos = full[0][4]
    first = full[0].index(eos)
    got = generate(model, prompts, NEW, eos_token_ids=(eos,), pad_token_id=0)
    assert got[0] == full[0][: first + 1]
    cut = full[1].index(eos) + 1 if eos in full[1] else NEW
    assert got[1] == full[1][:cut]


def test_sampling_follows_the_tempered_distribution(llama):
    """First sampled tokens of one prompt repeated 4000 times, against softmax(logits / T) from transformers."""
    model, ref = llama
    prompt = _prompts((6,))[0]
    temperature = 1.5
    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0, -1].double().numpy()
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    n = 4000
    first = np.array([t[0] for t in generate(model, [prompt] * n, 1, temperature=temperature, seed=3)])
    counts = np.bincount(first, minlength=probs.size)
    # every token within 4 standard deviations of its expected count
    assert np.all(np.abs(counts - n * probs) <= 4 * np.sqrt(n * probs * (1 - probs)) + 1)
    again = np.array([t[0] for t in generate(model, [prompt] * n, 1, temperature=temperature, seed=3)])
    assert np.array_equal(first, again)  # a seed gives the same samples


def test_top_p_keeps_the_smallest_nucleus(llama):
    model, ref = llama
    prompt = _prompts((6,))[0]
    with torch.no_grad():
        logits = ref(torch.tensor([prompt])).logits[0, -1].double().numpy()
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = set(order[: np.searchsorted(np.cumsum(probs[order]), 0.5) + 1].tolist())
    first = {t[0] for t in generate(model, [prompt] * 2000, 1, temperature=1.0, top_p=0.5, seed=0)}
    assert first == nucleus  # (each of its tokens is expected at least ~10 times in 2000 draws)
    # a tiny nucleus is the most likely token alone: greedy
    assert generate(model, [prompt], NEW, temperature=1.0, top_p=1e-6) == generate(model, [prompt], NEW)


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0)])
def test_bad_settings_are_clear_errors(llama, kwargs):
    model, _ = llama
    with pytest.raises(UserError):
        generate(model, _prompts((4,)), **{"max_new_tokens": 4, **kwargs})


def test_past_gpt2_positions_is_a_clear_error(tmp_path):
    make_model("gpt2").save_pretrained(tmp_path)  # 32 positions
    model = dpo_jax.from_pretrained(str(tmp_path))
    assert len(generate(model, _prompts((20,)), 13)[0]) == 13  # the 13th token is never fed back: it fits
    with pytest.raises(UserError, match="32 positions"):
        generate(model, _prompts((20,)), 14)


def test_the_cache_is_stacked_with_the_blocks(llama):
    """The blocks are one module whose weights have a leading layer axis (models.blocks.stacked), and the cache
    is [L, B, S, K, E] arrays, made by the prompt's forward and then written in place, layer by layer, by the
    scan over the blocks: the new token's slot in every layer, nothing else."""
    model, _ = llama
    assert model.layers.self_attn.k_proj.kernel.shape == (3, 64, 32)  # 3 layers, 2 kv heads x 16
    prompt = jnp.asarray(_prompts((5, 5)))
    cache = KVCache.empty(2, 8)
    model.hidden_states(prompt, None, None, cache)
    assert cache.keys.shape == cache.values.shape == (3, 2, 8, 2, 16)
    assert not np.asarray(cache.keys[:, :, 5:]).any()
    before = np.asarray(cache.keys)
    model.hidden_states(prompt[:, :1], None, jnp.full((2, 1), 5), cache)
    after = np.asarray(cache.keys)
    np.testing.assert_array_equal(after[:, :, :5], before[:, :, :5])
    assert after[:, :, 5].any(axis=(1, 2, 3)).all() and not after[:, :, 6:].any()
    assert int(cache.index) == 6


def test_end_of_sequence_ids_include_the_generation_config(tmp_path):
    from dpo_jax.generate import end_of_sequence_ids
    from test_learning import sample_tokenizer

    tokenizer = sample_tokenizer()
    assert end_of_sequence_ids(str(tmp_path), tokenizer) == (tokenizer.eos_token_id,)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [7, %d, 9]}' % tokenizer.eos_token_id)
    assert end_of_sequence_ids(str(tmp_path), tokenizer) == (tokenizer.eos_token_id, 7, 9)


def test_generate_command(tmp_path, capsys):
    from dpo_jax import cli
    from test_trainer import tiny_model

    path = tiny_model(tmp_path / "tiny")
    prompts = ["Why is the sky blue?", "What is an atom?"]
    argv = ["generate", "--model_name_or_path", path, "--max_new_tokens", "5"]
    assert cli.main(argv + [a for p in prompts for a in ("--prompt", p)]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = dpo_jax.from_pretrained(path), dpo_jax.load_tokenizer(path)
    expected = generate_text(model, tokenizer, prompts, chat=False, max_new_tokens=5)
    assert printed == "".join(f"prompt: {p}\n{a}\n\n" for p, a in zip(prompts, expected))
    assert cli.main(argv + ["--prompt", prompts[0], "--chat"]) == 2  # this tokenizer has no chat template
    assert "no chat template" in capsys.readouterr().err
