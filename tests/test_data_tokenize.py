"""Tokenized pairs equal what TRL's DPOTrainer (1.16) produces for the same rows, tokenizer and max_length.

The oracle is TRL itself: a DPOTrainer is built around a tiny torch model, and its prepared train_dataset is
run through its own DataCollatorForPreference one pair at a time. Our side goes through the whole pipeline:
a JSONL file, `load_pairs`, and the padded batches of `BatchIterator`, unpadded with the attention mask.
"""

import json

import numpy as np
import pytest

from dpo_jax.batching import BatchIterator
from dpo_jax.pairs import load_pairs
from dpo_jax.config import DataConfig
from tiny_tokenizers import gpt2_style, llama3_style

STANDARD = [
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " Lyon."},
    {"prompt": "Say hi.", "chosen": " Hi!<EOS>", "rejected": " No."},  # chosen already ends with EOS
    {"prompt": "Hello wor", "chosen": "ld!", "rejected": "ld?"},  # tokens merge across the boundary
    {"prompt": "The capital of France is ", "chosen": "Paris.", "rejected": "Lyon."},  # trailing space merges
    {"prompt": "Qu'est-ce que c'est ? ☕ " * 3, "chosen": "Un café.", "rejected": "Un thé, merci beaucoup."},
    {"prompt": "The quick brown fox jumps over the lazy dog. " * 4, "chosen": " Yes.", "rejected": " No."},
    {"prompt": "Count.", "chosen": " one two three four five six seven eight nine ten eleven twelve",
     "rejected": " one"},
    {"prompt": "<EOS><EOS>Hi", "chosen": " there", "rejected": " you"},  # special tokens written in the text
]
IMPLICIT = [
    {"chosen": "Q: What is 2+2? A: Four.", "rejected": "Q: What is 2+2? A: Nine."},
    {"chosen": "Q: Capital of France? A: Paris.", "rejected": "Q: Capital of France? A: Lyon, I think."},
    {"chosen": "The sky is blue.", "rejected": "The sky is green, obviously, and always has been."},
    {"chosen": "Q: Is it? A: Yes", "rejected": "Q: Is it? A: Yes, it is."},  # chosen is a prefix of rejected
]
# Chosen and rejected differ at the first character: every prompt of the batch is empty (no ids at all for
# a tokenizer that adds no BOS).
IMPLICIT_EMPTY = [{"chosen": "Yes it is.", "rejected": "No way."}, {"chosen": "Sure.", "rejected": "Never."}]


def _msg(role, content):
    return {"role": role, "content": content}


CONVERSATIONAL = [
    {"prompt": [_msg("system", "Be brief."), _msg("user", "Capital of France?")],
     "chosen": [_msg("assistant", "Paris.")], "rejected": [_msg("assistant", "Lyon, I believe.")]},
    {"prompt": [_msg("user", "Hi"), _msg("assistant", "Hello! How can I help?"), _msg("user", "Say a number.")],
     "chosen": [_msg("assistant", "Four.")], "rejected": [_msg("assistant", "I'd rather not say.")]},
    {"prompt": [_msg("user", "The quick brown fox jumps over the lazy dog. " * 4)],
     "chosen": [_msg("assistant", "Yes.")], "rejected": [_msg("assistant", "No.")]},
]
CONVERSATIONAL_IMPLICIT = [
    {"chosen": [_msg("user", "What is 2+2?"), _msg("assistant", "Four.")],
     "rejected": [_msg("user", "What is 2+2?"), _msg("assistant", "Five, probably.")]},
    {"chosen": [_msg("system", "Be kind."), _msg("user", "Hello"), _msg("assistant", "Hi there!")],
     "rejected": [_msg("system", "Be kind."), _msg("user", "Hello"), _msg("assistant", "Go away.")]},
]
CASES = {"standard": STANDARD, "implicit": IMPLICIT, "implicit_empty": IMPLICIT_EMPTY, "conversational": CONVERSATIONAL,
         "conversational_implicit": CONVERSATIONAL_IMPLICIT}


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from dpo_jax import load_tokenizer
    from dpo_jax.cli import smollm2_path

    return load_tokenizer(smollm2_path())


TOKENIZERS = {"gpt2_style": gpt2_style, "llama3_style": llama3_style}


def _tokenizer(name, request):
    return request.getfixturevalue("smollm2_tokenizer") if name == "smollm2" else TOKENIZERS[name]()


def _rows(case, tokenizer):
    return [{k: (v.replace("<EOS>", tokenizer.eos_token) if isinstance(v, str) else v) for k, v in r.items()}
            for r in CASES[case]]


def trl_sequences(rows, tokenizer, max_length, tmp_path, truncation_mode="keep_start"):
    """[(chosen ids, chosen completion mask, rejected ids, rejected mask)] from TRL's DPOTrainer and collator."""
    import transformers
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=16,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_length=max_length, report_to=[], bf16=False,
                     use_cpu=True, truncation_mode=truncation_mode)
    trainer = DPOTrainer(model=transformers.LlamaForCausalLM(config), ref_model=transformers.LlamaForCausalLM(config),
                         args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    out = []
    for example in trainer.train_dataset:
        batch = trainer.data_collator([example])
        seqs = []
        for r in range(2):
            real = batch["attention_mask"][r].bool()
            seqs += [batch["input_ids"][r][real].tolist(), batch["completion_mask"][r][real].tolist()]
        out.append(tuple(seqs))
    return out


def our_sequences(rows, tokenizer, max_length, tmp_path, truncation_mode="keep_start"):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(dataset_name=str(path), max_length=max_length, truncation_mode=truncation_mode)
    pairs, _ = load_pairs(cfg, "train", tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    batches = BatchIterator(pairs, global_batch_size=2, pad_token_id=pad, shuffle=False)
    out = []
    for _ in range(batches.steps_per_epoch):
        batch = next(batches)
        for b in np.flatnonzero(batch["pair_mask"]):
            seqs = []
            for s in range(2):  # pair b's chosen and rejected: rows 2b and 2b + 1
                real = batch["segment"][2 * b + s] >= 0
                assert real[:real.sum()].all(), "padding is on the right"
                completion = (batch["branch"][2 * b + s][real] > 0).astype(int)
                seqs += [batch["input_ids"][2 * b + s][real].tolist(), completion.tolist()]
            out.append(tuple(seqs))
    return out, pairs


# GPT-2 has no chat template, so only the string formats (its refusal of conversations: test_data_errors.py)
COMBINATIONS = [(t, c) for t in ("gpt2_style", "llama3_style", "smollm2") for c in CASES
                if not (t == "gpt2_style" and c.startswith("conversational"))]


@pytest.mark.parametrize("short", [False, True], ids=["max_length=1024", "short_max_length"])
@pytest.mark.parametrize("tokenizer_name,case", COMBINATIONS)
def test_tokens_and_masks_match_trl(tokenizer_name, case, short, request, tmp_path):
    tokenizer = _tokenizer(tokenizer_name, request)
    rows = _rows(case, tokenizer)
    max_length = 1024
    if short:  # two tokens past the second-longest prompt: the longest prompt is dropped, longer pairs truncated
        _, pairs = our_sequences(rows, tokenizer, max_length, tmp_path)
        max_length = int(np.sort(pairs.prompt_length)[-2]) + 2
    ours, pairs = our_sequences(rows, tokenizer, max_length, tmp_path)
    theirs = trl_sequences(rows, tokenizer, max_length, tmp_path)
    assert ours == theirs
    assert len(ours) == len(rows) - pairs.dropped_prompt_too_long
    if short:  # the short max_length must really truncate (and drop, unless the longest prompts tie)
        assert any(v.any() for v in pairs.truncated_at_max_length.values())


@pytest.mark.parametrize("max_length,truncation_mode", [(None, "keep_start"), (12, "keep_end")])
@pytest.mark.parametrize("tokenizer_name,case", [("gpt2_style", "standard"), ("llama3_style", "conversational")])
def test_no_truncation_and_keep_end_match_trl(tokenizer_name, case, max_length, truncation_mode, tmp_path):
    tokenizer = TOKENIZERS[tokenizer_name]()
    rows = _rows(case, tokenizer)
    ours, _ = our_sequences(rows, tokenizer, max_length, tmp_path, truncation_mode)
    assert ours == trl_sequences(rows, tokenizer, max_length, tmp_path, truncation_mode)
    assert len(ours) == len(rows)  # keep_end drops nothing


def pairs_from_rows(rows, tokenizer, tmp_path, **options):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_pairs(DataConfig(dataset_name=str(path), **options), "train", tokenizer)


def test_completion_mask_covers_completion_and_eos_exactly(tmp_path):
    """A case written out by hand from the tokenizer's pieces: BOS + prompt | completion + EOS."""
    tokenizer = llama3_style()
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt, chosen, rejected = "What is the capital of France?", " Paris.", " Lyon."
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    expected = {"chosen": [bos] + encode(prompt) + encode(chosen) + [eos],
                "rejected": [bos] + encode(prompt) + encode(rejected) + [eos]}
    n_prompt = 1 + len(encode(prompt))
    pairs, _ = pairs_from_rows([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tokenizer, tmp_path)
    for which in ("chosen", "rejected"):
        ids, mask = pairs.sequence(0, which)
        assert ids.tolist() == expected[which]
        assert mask.tolist() == [0] * n_prompt + [1] * (len(expected[which]) - n_prompt)


def test_bos_in_prompt_text_is_not_doubled(tmp_path):
    """Our one deliberate difference from TRL: a prompt that already starts with the BOS string, with a
    tokenizer that adds BOS itself."""
    tokenizer = llama3_style()
    pairs, _ = pairs_from_rows([{"prompt": "<|begin_of_text|>Hi", "chosen": " there", "rejected": " you"}],
                               tokenizer, tmp_path)
    ids, _ = pairs.sequence(0, "chosen")
    assert (ids == tokenizer.bos_token_id).sum() == 1 and ids[0] == tokenizer.bos_token_id
    assert pairs.flags["bos_fixed"].tolist() == [1]


def test_tools_and_chat_template_kwargs_columns_reach_the_template_as_trl(tmp_path):
    import copy

    tokenizer = copy.deepcopy(llama3_style())
    tokenizer.chat_template = ("{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}"
                               "{% if terse %}[terse]{% endif %}" + tokenizer.chat_template)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {}}}]
    rows = [{**CONVERSATIONAL[0], "tools": json.dumps(tools), "chat_template_kwargs": {"terse": True}},
            {**CONVERSATIONAL[1], "tools": None, "chat_template_kwargs": {"terse": False}}]
    ours, _ = our_sequences(rows, tokenizer, 1024, tmp_path)
    assert ours == trl_sequences(rows, tokenizer, 1024, tmp_path)
    assert "Tools:" in tokenizer.decode(ours[0][0]) and "[terse]" in tokenizer.decode(ours[0][0])
