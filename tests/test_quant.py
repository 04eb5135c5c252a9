"""Quantised frozen weights (models/quant.py): codes and scales against numpy formulas, the loader quantising
tensor by tensor into the sharding, QLoRA and a quantised reference in the step, the export of a QLoRA run
through transformers, and SmolLM2's reference log-probs within 1% (int8) and 5% (nf4) of float32."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import tiny_models
from dpo_jax import from_pretrained, lora, memory
from dpo_jax import step as S
from dpo_jax.cli import main
from dpo_jax.models import quant
from dpo_jax.sharding import make_mesh
from test_step import make_batch, put

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float32)


def numpy_quantized(w: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(dequantised weights, scales) by the documented formulas, for w [in, out]."""
    d_in, d_out = w.shape
    if kind == "int8":
        scale = np.abs(w).max(axis=0, keepdims=True) / 127
        return np.clip(np.round(w / scale), -127, 127) * scale, scale
    block = 64 if d_in % 64 == 0 else d_in
    blocks = w.reshape(d_in // block, block, d_out)
    absmax = np.abs(blocks).max(axis=1)  # [in / block, out]
    if kind == "nf4":
        normed = blocks / absmax[:, None, :]
        values = quant.NF4_VALUES[np.abs(normed[..., None] - quant.NF4_VALUES).argmin(-1)]
        return (values * absmax[:, None, :]).reshape(w.shape), absmax
    scale = absmax / 6  # fp4: e2m1's largest value is 6
    normed = blocks / scale[:, None, :]
    values = np.sign(normed) * E2M1[np.abs(np.abs(normed)[..., None] - E2M1).argmin(-1)]
    return (values * scale[:, None, :]).reshape(w.shape), scale


@pytest.mark.parametrize("kind", quant.KINDS)
@pytest.mark.parametrize("d_in", [256, 96])  # 96: not a multiple of 64, one 4-bit block per column
def test_codes_and_scales_match_numpy_formulas(kind, d_in):
    w = np.random.RandomState(0).standard_t(4, (d_in, 48)).astype(np.float32)  # heavy tails, as real weights
    codes, scales = quant.quantize(jnp.asarray(w), kind)
    assert codes.dtype == {"int8": jnp.int8, "nf4": jnp.uint4, "fp4": jnp.float4_e2m1fn}[kind]
    expected, expected_scales = numpy_quantized(w, kind)
    np.testing.assert_allclose(np.asarray(scales), expected_scales, rtol=1e-6)
    got = np.asarray(quant.dequantize(codes, scales, kind, jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    # a stack's layers are quantised each on its own; quantising the dequantised weights gives them back
    stack_codes, stack_scales = quant.quantize(jnp.asarray(np.stack([w, 3 * w])), kind)
    np.testing.assert_allclose(np.asarray(quant.dequantize(stack_codes, stack_scales, kind, jnp.float32))[1],
                               3 * got, rtol=1e-6, atol=1e-6)
    again = quant.dequantize(*quant.quantize(jnp.asarray(got), kind), kind, jnp.float32)
    np.testing.assert_allclose(np.asarray(again), got, rtol=1e-6, atol=1e-7)


def test_bfloat16_dequantises_in_bfloat16():
    w = jnp.asarray(np.random.RandomState(1).randn(128, 32), jnp.float32)
    for kind in quant.KINDS:
        codes, scales = quant.quantize(w, kind)
        assert quant.dequantize(codes, scales, kind, jnp.bfloat16).dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_models.make_model("llama", seed=3).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", quant.KINDS)
def test_the_loader_quantises_each_tensor_into_its_sharding(llama, kind):
    """Quantised as loaded == loaded, then quantised; on a 4 x 2 mesh the codes are split as their kernel and the
    logits are one device's. The head and the embedding stay float."""
    ids, mask = tiny_models.batch()
    loaded = from_pretrained(llama, quantization=kind)
    afterwards = quant.quantize_linears(from_pretrained(llama), kind)
    logits = np.asarray(loaded(jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_array_equal(logits, np.asarray(afterwards(jnp.asarray(ids), jnp.asarray(mask))))
    kinds = {str(path[-1]): type(m).__name__ for path, m in nnx.iter_graph(loaded) if isinstance(m, quant.Linear)}
    assert kinds.pop("lm_head") == "Linear" and set(kinds.values()) == {"QuantizedLinear"} and len(kinds) == 7
    mesh = make_mesh(fsdp=4, tensor=2)
    sharded = from_pretrained(llama, quantization=kind, mesh=mesh)
    up = sharded.layers.mlp.up_proj  # [L, embed, mlp]: embed over fsdp, mlp over tensor
    assert up.codes.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert up.scales.get_value().sharding.spec[-1] == "tensor"
    assert up.codes.get_value().dtype == loaded.layers.mlp.up_proj.codes.get_value().dtype
    np.testing.assert_allclose(np.asarray(sharded(jnp.asarray(ids), jnp.asarray(mask))), logits, rtol=1e-5,
                               atol=1e-5)
    float_logits = np.asarray(from_pretrained(llama)(jnp.asarray(ids), jnp.asarray(mask)))
    assert 0 < np.abs(logits - float_logits).max() < (0.5 if kind == "int8" else 3.0)


def test_qlora_starts_at_ln2_and_trains_only_the_adapters(llama):
    model = quant.quantize_linears(from_pretrained(llama), "nf4")
    model = lora.apply_lora(model, rank=4, alpha=8, targets="all-linear")
    graphdef, adapters, base = lora.split_lora(model, True)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(adapters))
    tx = S.make_optimizer(S.OptimConfig(learning_rate=1e-2, lr_scheduler_type="constant"), 10)
    state = S.init_state(adapters, tx)
    cfg = S.StepConfig(lora=True)
    fn = S.compile_train_step(graphdef, None, cfg, tx, None, state, base)
    before = jax.tree.map(np.array, base)
    state, metrics = fn(state, base, make_batch())
    np.testing.assert_allclose(float(metrics["loss"]), np.log(2), rtol=1e-6)  # B = 0: the policy is its base
    for seed in range(1, 3):
        state, metrics = fn(state, base, make_batch(seed=seed))
    assert float(metrics["rewards/margins"]) != 0.0
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(base)))


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_policy_equal_to_its_dequantised_reference_starts_at_ln2(llama, kind):
    """The reference held quantised; the policy is its dequantised weights in float32: the same numbers, so the
    first loss is ln 2 and every reward 0, on a mesh."""
    mesh = make_mesh(data=2, fsdp=4)
    reference = quant.quantize_linears(from_pretrained(llama, mesh=mesh), kind)
    ref_graphdef, ref = S.split_reference(reference, True)
    policy = quant.dequantize_linears(nnx.merge(ref_graphdef, jax.tree.map(jnp.copy, ref)))
    graphdef, params = S.split_policy(policy, True)
    tx = S.make_optimizer(S.OptimConfig(learning_rate=1e-3, lr_scheduler_type="constant"), 10)
    state = S.init_state(params, tx)
    fn = S.compile_train_step(graphdef, ref_graphdef, S.StepConfig(), tx, mesh, state, ref)
    _, metrics = fn(state, ref, put(make_batch(), mesh))
    assert float(metrics["loss"]) == pytest.approx(np.log(2), rel=1e-7)
    assert float(metrics["rewards/chosen"]) == 0.0 and float(metrics["rewards/rejected"]) == 0.0


def test_quantised_weights_count_at_their_size(llama):
    """The plan's per-device bytes of a quantised reference are its codes and float32 scales (int8: a byte a
    weight; 4-bit codes half a byte on an accelerator, a byte on the CPU)."""
    mesh = make_mesh(fsdp=8)
    model = from_pretrained(llama, mesh=mesh, quantization="int8")
    codes = [m.codes.get_value() for _, m in nnx.iter_graph(model) if isinstance(m, quant.QuantizedLinear)]
    kernels = [m.kernel.get_value() for path, m in nnx.iter_graph(from_pretrained(llama, mesh=mesh))
               if type(m) is quant.Linear and path[-1] != "lm_head"]
    assert memory.per_device_bytes(codes) * 4 == memory.per_device_bytes(kernels)
    nf4 = quant.quantize_linears(from_pretrained(llama, mesh=mesh), "nf4")
    nf4_codes = [m.codes.get_value() for _, m in nnx.iter_graph(nf4) if isinstance(m, quant.QuantizedLinear)]
    assert memory.per_device_bytes(nf4_codes) == memory.per_device_bytes(codes)  # on the CPU, a byte a code


def test_qlora_run_exports_a_plain_model_that_transformers_loads(tmp_path):
    """train --use_peft --load_in_4bit, then export: transformers' logits on the export equal dpo-jax's QLoRA
    model (the nf4 base dequantised, the adapters folded in)."""
    from dpo_jax import checkpoint
    from test_trainer import tiny_model

    model = tiny_model(tmp_path / "m")
    args = ["train", "--model_name_or_path", model, "--output_dir", str(tmp_path / "run"), "--max_steps", "3",
            "--per_device_train_batch_size", "1", "--mesh", "data=2,fsdp=-1", "--learning_rate", "1e-2",
            "--max_length", "128", "--dataset_test_split", "test[:8]", "--eval_steps", "100", "--use_peft", "true",
            "--load_in_4bit", "true", "--lora_target_modules", "all-linear", "--lora_dropout", "0"]
    assert main(args) == 0
    assert main(["export", "--checkpoint", str(tmp_path / "run"), "--output_dir", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    # dpo-jax's QLoRA model of the checkpoint: the nf4 base, the trained adapters
    qlora = quant.quantize_linears(from_pretrained(model), "nf4")
    lora.apply_lora(qlora, 16, 32, "all-linear")
    with checkpoint.Checkpoints(str(tmp_path / "run" / "checkpoints"), create=False) as checkpoints:
        _, adapters = checkpoints.restore_params(checkpoint.abstract(nnx.state(qlora, nnx.LoRAParam)))
    nnx.update(qlora, adapters)
    ids, mask = tiny_models.batch(vocab=exported.config.vocab_size)
    ours = np.asarray(qlora(jnp.asarray(ids), jnp.asarray(mask)))
    theirs = tiny_models.torch_logits(exported, ids, mask)
    assert tiny_models.relative_error(theirs, ours, mask) <= 1e-5
    plain = np.asarray(from_pretrained(model)(jnp.asarray(ids), jnp.asarray(mask)))
    assert tiny_models.relative_error(plain, ours, mask) > 1e-3  # trained and quantised: not the base model


def test_quantisation_options_that_do_not_go_together_exit_2(llama, tmp_path, capsys):
    base = ["train", "--model_name_or_path", llama, "--output_dir", str(tmp_path / "o")]
    for extra, said in ((["--load_in_4bit", "true"], "--ref_quantization nf4"),
                        (["--use_peft", "true", "--load_in_4bit", "true", "--load_in_8bit", "true"], "give one"),
                        (["--use_peft", "true", "--ref_quantization", "int8"], "--load_in_4bit true"),
                        (["--use_peft", "true", "--load_in_4bit", "true", "--use_bnb_nested_quant", "true"],
                         "not supported"),
                        (["--ref_quantization", "int4"], "The values are none, int8, nf4, fp4")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert said in err and "Traceback" not in err, err
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


@pytest.fixture(scope="module")
def smollm2_reference_logps():
    """SmolLM2's (chosen, rejected) log-probs of the sample test pairs with the reference in float32, int8 and
    nf4 (the GGUF's weights dequantised to float32, then quantised as a reference would be)."""
    from dpo_jax import reference
    from dpo_jax.assets import smollm2_path
    from dpo_jax.pairs import load_pairs
    from dpo_jax.config import DataConfig
    from dpo_jax.hf import load_tokenizer

    path = smollm2_path()
    tokenizer = load_tokenizer(path)
    pairs, _ = load_pairs(DataConfig(dataset_name="builtin:sample", max_length=256), "test", tokenizer)
    out = {}
    for kind in (None, "int8", "nf4"):
        graphdef, params = S.split_reference(from_pretrained(path, quantization=kind))
        out[kind] = reference.precompute(graphdef, params, pairs, batch_size=8,
                                         pad_token_id=tokenizer.pad_token_id or 0)
    out["pairs"] = pairs
    return out


@pytest.mark.slow
def test_smollm2_int8_reference_logps_are_within_1_percent(smollm2_reference_logps):
    """On average over the 120 log-probs (a pair's worst: 3.4%; bitsandbytes' LLM.int8 on the same weights,
    through transformers: 2.2% on average, 7.7% at worst)."""
    exact, got = smollm2_reference_logps[None], smollm2_reference_logps["int8"]
    relative = np.abs(got - exact) / np.abs(exact)
    assert exact.shape == (60, 2) and relative.mean() <= 0.01 and relative.max() <= 0.05, relative.max()


def test_nf4_codes_are_bitsandbytes(tmp_path):
    """Our nf4 is bitsandbytes' (QLoRA's) to the bit: the same blocks of 64, absmax scales and code values."""
    import bitsandbytes.functional as bnb

    w_OxI = np.random.RandomState(0).standard_t(4, (48, 256)).astype(np.float32)  # PyTorch's [out, in]
    codes, state = bnb.quantize_4bit(torch.tensor(w_OxI), blocksize=64, quant_type="nf4")
    theirs = bnb.dequantize_4bit(codes, state).numpy()
    ours = np.asarray(quant.dequantize(*quant.quantize(jnp.asarray(w_OxI.T), "nf4"), "nf4", jnp.float32)).T
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.slow
def test_smollm2_nf4_reference_logps_are_transformers_with_bitsandbytes_weights(smollm2_reference_logps, tmp_path):
    """The nf4 reference's log-probs of the sample test pairs are transformers' float32 model's with every linear
    weight replaced by bitsandbytes' nf4 of it (what TRL's load_in_4bit holds), to float32 rounding. Both are
    10.1% from float32 on average (40% at worst): a 135M model loses that much at 4 bits, whoever quantises it.
    (bitsandbytes' own forward on the CPU computes through bfloat16: 1.8% of the largest logit away from its
    weights' float32 product, so it is not the oracle here.)"""
    import bitsandbytes.functional as bnb

    from dpo_jax import export_pretrained
    from dpo_jax.assets import smollm2_path

    export_pretrained(from_pretrained(smollm2_path()), str(tmp_path / "hf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, module in model.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(bnb.dequantize_4bit(*bnb.quantize_4bit(module.weight, blocksize=64,
                                                                           quant_type="nf4")))
    pairs, shown = smollm2_reference_logps["pairs"], 24  # the first 24 pairs: an oracle of the same numbers
    theirs = np.zeros((shown, 2))
    with torch.no_grad():
        for i, index in enumerate(pairs.keep[:shown]):
            prompt = _row(pairs, "prompt", index)
            for j, kind in enumerate(("chosen", "rejected")):
                ids = np.concatenate([prompt, _row(pairs, kind, index)])[:256]
                logps = torch.log_softmax(model(torch.tensor(ids[None], dtype=torch.long)).logits[0], -1)
                targets = torch.tensor(ids[len(prompt):], dtype=torch.long)[:, None]
                theirs[i, j] = logps[len(prompt) - 1:len(ids) - 1].gather(-1, targets).sum().item()
    np.testing.assert_allclose(smollm2_reference_logps["nf4"][:shown], theirs, rtol=1e-4)
    exact, nf4 = smollm2_reference_logps[None], smollm2_reference_logps["nf4"]
    assert 0.05 < (np.abs(nf4 - exact) / np.abs(exact)).mean() < 0.15  # all 60 pairs


def _row(pairs, kind: str, index: int) -> np.ndarray:
    flat, offsets = pairs.tokens[kind]
    return flat[offsets[index]:offsets[index + 1]]


@pytest.mark.parametrize("name, kind", [("Q8_0", "q8_0"), ("Q4_0", "q4_0"), ("Q4_1", "q4_1")])
def test_gguf_blocks_held_as_stored_dequantise_as_the_gguf_package_does(name, kind):
    """A tensor quantised by the gguf package (llama.cpp's reference quantisers), read as blocks and held in
    quant.py's layout: it dequantises to exactly what gguf.quants.dequantize gives."""
    import types

    import gguf

    from dpo_jax.gguf import GGUFTensor

    w_OxI = np.random.RandomState(2).randn(48, 128).astype(np.float32)
    qtype = gguf.GGMLQuantizationType[name]
    stored = types.SimpleNamespace(data=gguf.quants.quantize(w_OxI, qtype), tensor_type=qtype, name="t")
    tensor = GGUFTensor("t.gguf", stored, (48, 128), None)
    expected = gguf.quants.dequantize(stored.data, qtype).reshape(48, 128)
    assert tensor.kind == kind and np.array_equal(tensor(), expected)
    codes, scales, offsets = (None if p is None else jnp.asarray(np.ascontiguousarray(p.T)) for p in tensor.blocks())
    codes = codes.astype({"q8_0": jnp.int8, "q4_0": jnp.int4, "q4_1": jnp.uint4}[kind])
    ours = np.asarray(quant.dequantize(codes, scales, kind, jnp.float32, offsets)).T
    np.testing.assert_array_equal(ours, expected)
    # quant.py's own quantiser of the kind (the memory plan's shapes) gives the same layout
    parts = quant.quantize(jnp.asarray(w_OxI.T), kind)
    assert [p.shape for p in parts] == [(128, 48)] + [(4, 48)] * (len(parts) - 1) and parts[0].dtype == codes.dtype


@pytest.mark.slow
def test_smollm2_gguf_blocks_kept_compute_the_float_model():
    """SmolLM2's Q4_1 linears held as stored: the logits of the float32 model it dequantises to, to the bit (one
    device), and on a 4 x 2 mesh to float rounding."""
    from dpo_jax.assets import smollm2_path

    ids = jnp.asarray(np.random.RandomState(0).randint(3, 40000, (2, 24)))
    exact = np.asarray(from_pretrained(smollm2_path())(ids))
    kept = from_pretrained(smollm2_path(), quantization="gguf")
    kinds = {m.kind for _, m in nnx.iter_graph(kept) if isinstance(m, quant.QuantizedLinear)}
    assert kinds == {"q4_1"} and kept.layers.mlp.up_proj.codes.get_value().dtype == jnp.uint4
    np.testing.assert_array_equal(np.asarray(kept(ids)), exact)
    sharded = from_pretrained(smollm2_path(), quantization="gguf", mesh=make_mesh(fsdp=4, tensor=2))
    np.testing.assert_allclose(np.asarray(sharded(ids)), exact, rtol=1e-5, atol=1e-4)
