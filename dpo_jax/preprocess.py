"""Tokenize preference pairs the way TRL's DPOTrainer (v1.x) does, batched and cached by `datasets`.

For each pair, as TRL:
1. implicit prompt: with no prompt column, the prompt is the longest shared prefix of chosen and rejected;
2. standard (string) format: EOS is appended to chosen and rejected unless the text already ends with it;
3. the prompt and prompt+completion are tokenized separately, with the chat template for conversations
   (`add_generation_prompt=True` for the prompt alone) and with the tokenizer's special tokens for strings;
4. the completion is what follows the longest common prefix of the tokenized prompt and the tokenized
   prompt+chosen / prompt+rejected; when that is shorter than the prompt, tokens merged across the boundary
   (or the template renders the prompt differently) and the pair is counted as a boundary merge.

One deliberate difference: a sequence that starts with BOS twice (the prompt text already began with the BOS
string and the tokenizer added another) loses the extra one, and the pair is counted in the data audit. TRL
keeps both.
"""

from __future__ import annotations

import hashlib
import json

import datasets

from .data import ROW, Split, clean_messages
from .errors import UserError


def extract_prompt(chosen, rejected):
    """Split the shared beginning of chosen and rejected off as the prompt: (prompt, chosen, rejected).

    Works on strings (characters) and on message lists (whole messages). As TRL, a space just before the point
    where the two differ goes with the completions. Unlike TRL's edge cases, both completions are kept non-empty:
    when one is a prefix of the other, the prompt stops one element short."""
    n = min(len(chosen), len(rejected))
    i = next((k for k in range(n) if chosen[k] != rejected[k]), n)
    if isinstance(chosen, str) and 0 < i and chosen[i - 1] == " ":
        i -= 1
    i = min(i, n - 1)
    return chosen[:i], chosen[i:], rejected[i:]


def tokenize(split: Split, tokenizer, *, num_proc: int | None = None) -> datasets.Dataset:
    """The tokenized pairs of a validated split: ROW, prompt_ids, chosen_ids, rejected_ids and audit flags."""
    if tokenizer.eos_token is None and split.fmt == "standard":
        raise UserError("the tokenizer has no EOS token, which the standard format appends to each completion; "
                        "use a tokenizer with an eos_token.")
    if split.fmt == "conversational" and not tokenizer.chat_template:
        raise UserError(f"{split.source} is conversational, but the tokenizer has no chat template. Set one "
                        f"(tokenizer.chat_template) or give the data as plain strings (the standard format).")
    columns = [c for c in split.dataset.column_names if c != ROW]
    return split.dataset.map(
        _tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=columns,
        fn_kwargs=dict(tokenizer=tokenizer, conversational=split.fmt == "conversational",
                       implicit=split.implicit_prompt),
        desc=f"Tokenizing {split.source}")


def _tokenize_batch(batch: dict, tokenizer, conversational: bool, implicit: bool) -> dict:
    prompts, chosens, rejecteds = [], [], []
    for i in range(len(batch[ROW])):
        chosen, rejected = batch["chosen"][i], batch["rejected"][i]
        prompt = None if implicit else batch["prompt"][i]
        if conversational:
            chosen, rejected = clean_messages(chosen), clean_messages(rejected)
            prompt = prompt if implicit else clean_messages(prompt)
        if implicit:
            prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if not conversational:
            eos = tokenizer.eos_token
            chosen = chosen if chosen.endswith(eos) else chosen + eos
            rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompts.append(prompt)
        chosens.append(chosen)
        rejecteds.append(rejected)

    if conversational:
        def encode(convs, **kw):
            return tokenizer.apply_chat_template(convs, tokenize=True, return_dict=True, **kw)["input_ids"]
        prompt_ids = encode(prompts, add_generation_prompt=True)
    else:
        def encode(texts):
            return tokenizer(text=texts)["input_ids"]
        prompt_ids = encode(prompts)
    full_chosen = encode([p + c for p, c in zip(prompts, chosens)])
    full_rejected = encode([p + r for p, r in zip(prompts, rejecteds)])

    out = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "boundary_merged", "bos_fixed",
                           "identical", "pair_key")}
    bos = tokenizer.bos_token_id
    for i in range(len(prompts)):
        fixed = 0
        p, pc, pr = prompt_ids[i], full_chosen[i], full_rejected[i]
        if bos is not None and len(p) > 1 and p[0] == p[1] == bos:
            p, pc, pr, fixed = p[1:], pc[1:], pr[1:], 1
        n = min(_common_prefix(p, pc), _common_prefix(p, pr))
        out["prompt_ids"].append(p[:n])
        out["chosen_ids"].append(pc[n:])
        out["rejected_ids"].append(pr[n:])
        out["boundary_merged"].append(n < len(p))
        out["bos_fixed"].append(fixed)
        out["identical"].append(chosens[i] == rejecteds[i])
        key = json.dumps([prompts[i], chosens[i], rejecteds[i]], sort_keys=True, ensure_ascii=False)
        out["pair_key"].append(hashlib.blake2b(key.encode(), digest_size=12).hexdigest())
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
