"""Text generation with a KV cache: `dpo-jax generate`, and the demo's answers before and after training.

`generate` runs one jitted function per (number of prompts, prompt-length bucket, max_new_tokens, sampling
settings): the prompts, left-padded to a multiple of PROMPT_MULTIPLE tokens, go through the model once and
fill a `KVCache`; a `lax.while_loop` then feeds one token per step until every row has produced an
end-of-sequence token or `max_new_tokens`. Temperature 0 is greedy decoding (argmax; on a tie the lowest id,
as torch); otherwise tokens are sampled from softmax(logits / temperature), optionally restricted to the
smallest set of tokens whose probability reaches `top_p`. The model computes in its own dtype; logits are
compared in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .errors import UserError
from .models.cache import KVCache, default_positions

PROMPT_MULTIPLE = 32  # prompts are left-padded to a multiple of this: fewer compiled shapes
_COMPILED: dict = {}


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             eos_token_ids: Sequence[int] = (), pad_token_id: int | None = 0, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0) -> list[list[int]]:
    """The new token ids of each prompt's continuation, up to and including its first end-of-sequence id."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("generate needs at least one prompt, and no empty prompt")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise UserError(f"temperature must be >= 0 and top_p in (0, 1], not {temperature} and {top_p}")
    limit = getattr(model.config, "n_positions", None)  # GPT-2's learned position table
    if limit and max(len(p) for p in prompts) + max_new_tokens - 1 > limit:  # the last token is not fed back
        raise UserError(f"the longest prompt ({max(len(p) for p in prompts)} tokens) plus max_new_tokens "
                        f"({max_new_tokens}) exceeds the model's {limit} positions; shorten one of them")
    if pad_token_id is None:
        pad_token_id = eos_token_ids[0] if eos_token_ids else 0
    length = -(-max(len(p) for p in prompts) // PROMPT_MULTIPLE) * PROMPT_MULTIPLE
    ids = np.full((len(prompts), length), pad_token_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = prompt
        valid[row, length - len(prompt):] = True
    graphdef, state = nnx.split(model)
    # one jitted function per model and settings (it compiles once per batch shape itself)
    key = (graphdef, max_new_tokens, tuple(eos_token_ids), pad_token_id, float(temperature), float(top_p))
    if key not in _COMPILED:
        _COMPILED.clear()  # one model at a time: do not keep old graphs alive
        _COMPILED[key] = _compile(*key)
    tokens = np.asarray(_COMPILED[key](state, jnp.asarray(ids), jnp.asarray(valid), jax.random.key(seed)))
    out = []
    for row in tokens:
        ends = np.flatnonzero(np.isin(row, eos_token_ids)) if eos_token_ids else []
        out.append(row[: ends[0] + 1 if len(ends) else max_new_tokens].tolist())
    return out


def _compile(graphdef, max_new_tokens: int, eos_token_ids: tuple[int, ...], pad_token_id: int,
             temperature: float, top_p: float):
    eos = jnp.asarray(eos_token_ids or (-1,), jnp.int32)

    def pick(logits_BxV, key):
        logits_BxV = logits_BxV.astype(jnp.float32)
        if temperature == 0:
            return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
        logits_BxV = logits_BxV / temperature
        if top_p < 1:
            # Keep the most likely tokens until their probability reaches top_p (at least one).
            sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
            probs = jax.nn.softmax(sorted_BxV, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs
            cutoff = jnp.min(jnp.where(before < top_p, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
            logits_BxV = jnp.where(logits_BxV < cutoff, -jnp.inf, logits_BxV)
        return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)

    @jax.jit
    def run(state, ids_BxP, valid_BxP, key):
        model = nnx.merge(graphdef, state)
        b, p = ids_BxP.shape
        cache = KVCache.empty(b, p + max_new_tokens)
        positions = default_positions(valid_BxP, b, p)
        hidden = model.hidden_states(ids_BxP, valid_BxP, positions, cache)
        key, sub = jax.random.split(key)
        token = pick(model.logits(hidden[:, -1:])[:, 0], sub)
        tokens = jnp.full((b, max_new_tokens), pad_token_id, jnp.int32).at[:, 0].set(token)
        start = positions[:, -1] + 1  # the first new token's position (the prompts end in the last column)

        def more(carry):
            i, _, _, done, _, _ = carry
            return (i < max_new_tokens) & ~jnp.all(done)

        def step(carry):
            i, cache, token, done, tokens, key = carry
            hidden = model.hidden_states(token[:, None], None, (start + i - 1)[:, None], cache)
            key, sub = jax.random.split(key)
            new = jnp.where(done, pad_token_id, pick(model.logits(hidden)[:, 0], sub))
            tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, i))
            return i + 1, cache, new, done | jnp.isin(new, eos), tokens, key

        carry = (jnp.ones((), jnp.int32), cache, token, jnp.isin(token, eos), tokens, key)
        return jax.lax.while_loop(more, step, carry)[4]

    return run


def encode_prompts(tokenizer, texts: Sequence[str], chat: bool) -> list[list[int]]:
    """Token ids of each prompt: as a user turn of the tokenizer's chat template with the assistant's turn
    opened (`chat`), or the text as it is."""
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat: this tokenizer has no chat template; leave out --chat to continue plain text")
    out = []
    for text in texts:
        if chat:
            try:
                ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                    tokenize=True)
            except Exception as e:  # jinja2's TemplateSyntaxError, a template's raise_exception, ...
                raise UserError(f"--chat: the tokenizer's chat template fails on the prompt {text[:60]!r} "
                                f"({type(e).__name__}: {e}). Fix the template, or leave out --chat.") from e
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(text)["input_ids"]
        out.append(list(ids))
    return out


def generate_text(model: nnx.Module, tokenizer, texts: Sequence[str], *, chat: bool | None = None,
                  max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                  eos_token_ids: Sequence[int] | None = None) -> list[str]:
    """Each prompt's continuation as text (special tokens dropped). `chat` None: through the chat template
    when the tokenizer has one. `eos_token_ids` default: the tokenizer's end-of-sequence token."""
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if eos_token_ids is None:
        eos_token_ids = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else None
    new = generate(model, encode_prompts(tokenizer, texts, chat), max_new_tokens, eos_token_ids=tuple(eos_token_ids),
                   pad_token_id=pad, temperature=temperature, top_p=top_p, seed=seed)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]


def load_for_generation(path: str, trust_remote_code: bool = False):
    """(model, tokenizer, end-of-sequence ids) of a model (directory, repo id, .gguf, builtin:smollm2) or of a
    dpo-jax run or checkpoint (its newest readable checkpoint, adapters folded in), on all local devices.
    `trust_remote_code` lets transformers run the model directory's own config / tokenizer code."""
    from .hf import from_pretrained, load_tokenizer
    from .runs import load_trained, run_options
    from .sharding import make_mesh

    mesh = make_mesh(fsdp=-1)
    trained = run_options(path)
    if trained is None:
        model = from_pretrained(path, mesh=mesh, trust_remote_code=trust_remote_code)
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    else:
        model, o, _ = load_trained(path, mesh, jnp.float32, trust_remote_code)
        path = o.run.model_name_or_path
        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
    return model, tokenizer, end_of_sequence_ids(path, tokenizer)


def end_of_sequence_ids(path: str, tokenizer) -> tuple[int, ...]:
    """The tokenizer's end-of-sequence id and those of the model's `generation_config.json`, as transformers
    stops at (chat models often end a turn with another token than the tokenizer's eos: Llama 3's
    <|eot_id|>, Gemma's <end_of_turn>)."""
    import os

    ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    config = os.path.join(path, "generation_config.json")
    if os.path.isfile(config):
        import json

        try:
            value = json.loads(open(config, encoding="utf-8").read()).get("eos_token_id")
        except (ValueError, AttributeError) as e:  # not JSON, or not an object
            raise UserError(f"{config}: not a JSON object ({type(e).__name__}: {e}). Restore it from the original "
                            f"model, or delete it (it only adds end-of-sequence ids).") from e
        ids += [value] if isinstance(value, int) else list(value or [])
    return tuple(dict.fromkeys(ids))
