"""GGUF files (llama.cpp): config, weights and tokenizer from the file alone, with numpy, no torch.

Weights are dequantised with the `gguf` package, one tensor at a time. llama.cpp stores the rows of the
Llama q and k projections permuted (pairs interleaved for its RoPE); we undo that so the tensors are in
transformers' layout. The tokenizer is rebuilt from the vocabulary, merges, special tokens and chat
template in the metadata by transformers' own GGUF tokenizer converter (which needs no torch).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from .errors import CheckpointError, lfs_pointer_hint
from .namemap import NameMap

SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor names -> transformers' names (llama architecture).
_LLAMA_NAMES = NameMap((
    ("token_embd.weight", "model.embed_tokens.weight", False),
    ("output_norm.weight", "model.norm.weight", False),
    ("output.weight", "lm_head.weight", False),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", False),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", False),
    ("blk.{i}.attn_q.weight", "model.layers.{i}.self_attn.q_proj.weight", False),
    ("blk.{i}.attn_k.weight", "model.layers.{i}.self_attn.k_proj.weight", False),
    ("blk.{i}.attn_v.weight", "model.layers.{i}.self_attn.v_proj.weight", False),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight", False),
    ("blk.{i}.ffn_{p}.weight", "model.layers.{i}.mlp.{p}_proj.weight", False),
))


def _reader(path: str):
    """The parsed file. Parsing the metadata (tens of thousands of vocabulary strings) takes seconds in
    Python, so the model and the tokenizer of one file share one parse (keyed by path and mtime)."""
    return _cached_reader(os.path.abspath(path), os.path.getmtime(path))


def release() -> None:
    """Drop the cached parses: their vocabulary strings and memory-mapped tensors (0.15 GB of a training
    process's memory for SmolLM2's file). Called once a run's models and tokenizer are loaded; a later read
    parses the file again."""
    _cached_reader.cache_clear()


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, mtime: float):
    try:
        return _reader_class()(path)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})." + (
            lfs_pointer_hint(path) or " The file is probably truncated or damaged (an interrupted download or "
                                      "copy): download or copy it again.")) from e


@functools.cache
def _reader_class():
    """The `gguf` package's reader, reading its ~250k small pieces of metadata (SmolLM2: 98k vocabulary
    strings and merges) as slices of a plain numpy view of the memory-mapped file instead of the memmap itself:
    each `np.memmap` slice runs numpy's Python-level `memmap.__getitem__` / `__array_finalize__`, which made the
    parse 4-8 s of a run's start; this way it takes about 1 s. The fields and tensors are the package's own
    (tests/test_gguf.py compares them with the plain reader's); the tensors' data are plain arrays over the same
    mapping."""
    import gguf

    class Reader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain")
            if plain is None:  # the first read, right after __init__ maps the file
                plain = self._plain = self.data.view(np.ndarray)
            dtype, count = np.dtype(dtype), int(count)
            arr = plain[offset:offset + dtype.itemsize * count].view(dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return Reader


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _architecture(reader, path: str) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(f"{path}: GGUF architecture {arch!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return arch


def _require(reader, path: str, keys: list[str]) -> None:
    missing = [k for k in keys if k not in reader.fields]
    if missing:
        raise CheckpointError(f"{path}: this GGUF file lacks the metadata {', '.join(missing)}, which a model "
                              f"needs; it was not written by llama.cpp's converter, or is damaged. Convert the "
                              f"model again, or use its Hugging Face directory.")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of q_proj / k_proj (rows of each head: halves <- interleaved pairs)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(path: str):
    """A transformers LlamaConfig built from the GGUF metadata."""
    import transformers

    reader = _reader(path)
    arch = _architecture(reader, path)

    def md(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    required = [f"{arch}.{k}" for k in ("attention.head_count", "embedding_length", "feed_forward_length",
                                         "block_count")]
    if md("vocab_size") is None:
        required.append("tokenizer.ggml.tokens")  # its length is the vocabulary size then
    _require(reader, path, required)
    heads = md("attention.head_count")
    hidden = md("embedding_length")
    names = {t.name for t in reader.tensors}
    token_ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    return transformers.LlamaConfig(
        vocab_size=md("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data),
        hidden_size=hidden, intermediate_size=md("feed_forward_length"), num_hidden_layers=md("block_count"),
        num_attention_heads=heads, num_key_value_heads=md("attention.head_count_kv", heads),
        head_dim=md("attention.key_length", hidden // heads), max_position_embeddings=md("context_length", 2048),
        rms_norm_eps=float(md("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_parameters={"rope_type": "default", "rope_theta": float(md("rope.freq_base", 10000.0))},
        tie_word_embeddings="output.weight" not in names, bos_token_id=token_ids["bos"],
        eos_token_id=token_ids["eos"], pad_token_id=token_ids["padding"], architectures=["LlamaForCausalLM"])


def read_checkpoint(path: str):
    """(transformers config, tensors) where tensors maps transformers' names to (shape, read)."""
    import gguf

    config = read_config(path)
    reader = _reader(path)  # the same parse (cached)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    tensors = {}
    for tensor in reader.tensors:
        mapped = _LLAMA_NAMES.to_ours(tensor.name)
        name = mapped[0] if mapped else tensor.name  # unknown names stay as they are: reported as unused
        shape = tuple(int(d) for d in reversed(tensor.shape))
        n_head = next((n for proj, n in heads.items() if f".{proj}." in name), None)

        tensors[name] = (shape, GGUFTensor(path, tensor, shape, n_head))
    return config, tensors


# GGUF block types that are held as they are stored (models/quant.py's kinds): 32 weights per block, in
# llama.cpp's layout. Q8_0: f16 d, 32 int8 q (w = d q); Q4_0: f16 d, 16 bytes of nibbles (w = d (q - 8));
# Q4_1: f16 d, f16 m, 16 bytes of nibbles (w = d q + m); a byte's low nibble is weight i, its high one i + 16.
NATIVE = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}


class GGUFTensor:
    """One tensor of a GGUF file: called, it is dequantised to float32 in transformers' layout (q / k rows
    unpermuted); `kind` names its block type where quant.py holds it as stored (NATIVE), and `blocks()` gives
    those blocks: (codes [out, in], scales [out, in / 32], offsets [out, in / 32] or None), unpermuted alike."""

    def __init__(self, path: str, tensor, shape: tuple[int, ...], n_head: int | None):
        self.path, self.tensor, self.shape, self.n_head = path, tensor, shape, n_head
        self.kind = NATIVE.get(tensor.tensor_type.name) if len(shape) == 2 else None

    def _rows(self, w: np.ndarray) -> np.ndarray:
        return _unpermute(w, self.n_head) if self.n_head else w

    def __call__(self) -> np.ndarray:
        import gguf

        try:
            w = gguf.quants.dequantize(self.tensor.data, self.tensor.tensor_type).reshape(self.shape)
        except Exception as e:  # a quantisation type the gguf package cannot dequantise, damaged data
            raise CheckpointError(f"{self.path}: tensor {self.tensor.name} ({self.tensor.tensor_type.name}) cannot "
                                  f"be read ({type(e).__name__}: {e}). Use a GGUF file of another quantisation "
                                  f"(F32, F16, Q8_0, Q4_K, ...) or the model's safetensors.") from e
        return self._rows(w)

    def blocks(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        out, d_in = self.shape
        raw = np.asarray(self.tensor.data, np.uint8).reshape(out, d_in // 32, -1)  # [out, blocks, bytes]
        scales = raw[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)
        if self.kind == "q8_0":
            codes = raw[..., 2:].copy().view(np.int8).reshape(out, d_in)
            return self._rows(codes), self._rows(scales), None
        start = 4 if self.kind == "q4_1" else 2
        nibbles = raw[..., start:]
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).reshape(out, d_in)  # 0 .. 15
        if self.kind == "q4_0":
            return self._rows((codes.astype(np.int8) - 8)), self._rows(scales), None
        offsets = raw[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        return self._rows(codes), self._rows(scales), self._rows(offsets)


def read_tokenizer(path: str):
    """A transformers fast tokenizer (vocabulary, merges, special tokens, chat template) from GGUF metadata."""
    import transformers
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    reader = _reader(path)
    arch = _architecture(reader, path)
    _require(reader, path, ["tokenizer.ggml.model", "tokenizer.ggml.tokens"])
    found = {group: {name: _field(reader, f"tokenizer.{key}") for key, name in keys.items()
                     if f"tokenizer.{key}" in reader.fields}
             for group, keys in GGUF_TOKENIZER_MAPPING.items()}
    tokenizer_dict, tokenizer_config = found["tokenizer"], found["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # A sentencepiece vocabulary that says nothing gets a BOS, as llama.cpp does.
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for special, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                         ("unk_token", "unk_token_id"), ("pad_token", "pad_token_id")):
        if tokenizer_dict.get(key) is not None:
            tokenizer_config[special] = tokens[tokenizer_dict[key]]
    try:
        backend, extra = convert_gguf_tokenizer(arch, tokenizer_dict)
    except Exception as e:  # a tokenizer model transformers cannot convert, inconsistent metadata
        raise CheckpointError(f"{path}: transformers cannot rebuild the tokenizer from this GGUF file's metadata "
                              f"({type(e).__name__}: {e}). Use the model's Hugging Face directory instead.") from e
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)
