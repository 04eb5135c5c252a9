"""Tokenize preference pairs the way TRL's DPOTrainer (v1.x) does, batched and cached by `datasets`.

For each pair, as TRL:
1. implicit prompt: with no prompt column, the prompt is the longest shared prefix of chosen and rejected;
2. standard (string) format: EOS is appended to chosen and rejected unless the text already ends with it;
3. the prompt and prompt+completion are tokenized separately, with the chat template for conversations
   (`add_generation_prompt=True` for the prompt alone; a row's `tools` and `chat_template_kwargs` columns are
   passed to the template) and with the tokenizer's special tokens for strings;
4. the completion is what follows the longest common prefix of the tokenized prompt and the tokenized
   prompt+chosen / prompt+rejected; when that is shorter than the prompt, tokens merged across the boundary
   (or the template renders the prompt differently) and the pair is counted as a boundary merge.

One deliberate difference: when the tokenizer (or chat template) itself adds a BOS and the text already began
with the BOS string, the sequence would start with BOS twice; the extra one is removed and the pair counted in
the data audit. TRL keeps both.
"""

from __future__ import annotations

import hashlib
import json

import datasets

from .data import FILE, PASSED_THROUGH, ROW, Split
from .errors import UserError
from .formats import clean_messages, extract_prompt

FEATURES = datasets.Features({
    ROW: datasets.Value("int64"), FILE: datasets.Value("int32"),
    "prompt_ids": datasets.List(datasets.Value("int32")), "chosen_ids": datasets.List(datasets.Value("int32")),
    "rejected_ids": datasets.List(datasets.Value("int32")), "boundary_merged": datasets.Value("bool"),
    "bos_fixed": datasets.Value("int8"), "identical": datasets.Value("bool"), "pair_key": datasets.Value("string"),
})


def tokenize(split: Split, tokenizer, *, num_proc: int | None = None) -> datasets.Dataset:
    """The tokenized pairs of a validated split: FILE, ROW, prompt_ids, chosen_ids, rejected_ids, audit flags."""
    conversational = split.fmt == "conversational"
    if tokenizer.eos_token is None and not conversational:
        raise UserError("the tokenizer has no EOS token, which the standard format appends to each completion; "
                        "use a tokenizer with an eos_token.")
    if conversational and not tokenizer.chat_template:
        raise UserError(f"{split.title} is conversational, but the tokenizer has no chat template. Set one "
                        f"(tokenizer.chat_template) or give the data as plain strings (the standard format).")
    columns = [c for c in split.dataset.column_names if c not in (ROW, FILE)]
    return split.dataset.map(
        _tokenize_batch, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=columns,
        features=FEATURES, desc=f"Tokenizing {split.title}",
        fn_kwargs=dict(tokenizer=tokenizer, conversational=conversational, implicit=split.implicit_prompt,
                       adds_bos=_adds_bos(tokenizer, conversational), sources=split.sources))


def _adds_bos(tokenizer, conversational: bool) -> bool:
    """Whether tokenizing (or rendering the chat template) puts a BOS in front by itself."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    if conversational:
        try:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=True, return_dict=True)
        except Exception as e:  # jinja2's TemplateSyntaxError, a template's raise_exception, ...
            raise UserError(f"the chat template of {tokenizer.name_or_path or 'the tokenizer'} fails on a single "
                            f"user message ({type(e).__name__}: {e}). Fix the template (chat_template.jinja or "
                            f"tokenizer_config.json), or give the data as plain strings (the standard format).") from e
        return ids["input_ids"][:1] == [bos]
    return tokenizer("x")["input_ids"][:1] == [bos]


def _tokenize_batch(batch: dict, tokenizer, conversational: bool, implicit: bool, adds_bos: bool,
                    sources: list[str]) -> dict:
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
        template_args = _template_args(batch, sources)
        try:
            prompt_ids = _render(tokenizer, prompts, template_args, add_generation_prompt=True)
            full_chosen = _render(tokenizer, [p + c for p, c in zip(prompts, chosens)], template_args)
            full_rejected = _render(tokenizer, [p + r for p, r in zip(prompts, rejecteds)], template_args)
        except Exception as e:  # a template's raise_exception, or a render error: find the row
            _raise_template_error(tokenizer, batch, prompts, chosens, rejecteds, template_args, sources, e)
    else:
        prompt_ids = tokenizer(text=prompts)["input_ids"]
        full_chosen = tokenizer(text=[p + c for p, c in zip(prompts, chosens)])["input_ids"]
        full_rejected = tokenizer(text=[p + r for p, r in zip(prompts, rejecteds)])["input_ids"]

    out = {k: [] for k in ("prompt_ids", "chosen_ids", "rejected_ids", "boundary_merged", "bos_fixed",
                           "identical", "pair_key")}
    bos = tokenizer.bos_token_id
    for i in range(len(prompts)):
        fixed = 0
        p, pc, pr = prompt_ids[i], full_chosen[i], full_rejected[i]
        if adds_bos and len(p) > 1 and p[0] == p[1] == bos:
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


def _template_args(batch: dict, sources: list[str]) -> list[dict] | None:
    """Per-row keyword arguments of the chat template (TRL's `tools` and `chat_template_kwargs` columns)."""
    if not any(c in batch for c in PASSED_THROUGH):
        return None
    args = []
    for i in range(len(batch[ROW])):
        where = f"{sources[batch[FILE][i]]}, row {batch[ROW][i]}"
        tools = batch.get("tools", [None] * (i + 1))[i]
        try:
            tools = json.loads(tools) if isinstance(tools, str) else tools
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: field 'tools' is a string but not valid JSON ({e}). Give the tools as a list "
                            f"of JSON schemas, or as that list written as a JSON string.") from e
        kwargs = batch.get("chat_template_kwargs", [None] * (i + 1))[i] or {}
        if not isinstance(kwargs, dict):
            raise UserError(f"{where}: field 'chat_template_kwargs' is a {type(kwargs).__name__}, expected an object "
                            f"of keyword arguments for the chat template (e.g. {{\"enable_thinking\": false}}).")
        args.append({"tools": tools, **kwargs})
    return args


def _render(tokenizer, conversations: list, template_args: list[dict] | None, **kwargs) -> list[list[int]]:
    if template_args is None:  # one batched call
        return tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True, **kwargs)["input_ids"]
    return [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True, **a, **kwargs)["input_ids"]
            for c, a in zip(conversations, template_args)]


def _raise_template_error(tokenizer, batch, prompts, chosens, rejecteds, template_args, sources, error):
    for i in range(len(prompts)):
        args = [template_args[i]] if template_args else None
        for conv, extra in ((prompts[i], {"add_generation_prompt": True}), (prompts[i] + chosens[i], {}),
                            (prompts[i] + rejecteds[i], {})):
            try:
                _render(tokenizer, [conv], args, **extra)
            except Exception as e:
                raise UserError(f"{sources[batch[FILE][i]]}, row {batch[ROW][i]}: the tokenizer's chat template "
                                f"failed on this conversation ({type(e).__name__}: {e}). Change the row (for "
                                f"instance a role the template does not support) or the chat template.") from e
    raise error


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
