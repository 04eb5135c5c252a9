"""The training step against independent references: transformers' log-softmax, finite differences, one device
against meshes of eight, one batch against accumulated micro-batches."""

import functools

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import torch
import transformers
from flax import nnx

import tiny_models
from dpo_jax import from_pretrained
from dpo_jax import step as S
from dpo_jax.batching import plain_rows
from dpo_jax.logps import batch_logps
from dpo_jax.losses import LossConfig
from dpo_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    torch_model = tiny_models.make_model("llama")
    torch_model.save_pretrained(path)
    return str(path), torch_model


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory):
    """Different weights of the same architecture: a reference the policy differs from, so rewards and
    accuracies are far from rounding noise from the first step on."""
    path = tmp_path_factory.mktemp("llama_ref")
    tiny_models.make_model("llama", seed=1).save_pretrained(path)
    return str(path)


def make_sequences(b=8, t=16, seed=0, vocab=128):
    """input_ids, attention_mask, completion_mask [B, 2, T] of pairs with different prompt and completion
    lengths, right padding, one filler pair (the last)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (b, 2, t)).astype(np.int32)
    attention = np.zeros((b, 2, t), np.int32)
    completion = np.zeros((b, 2, t), np.int32)
    for i in range(b):
        prompt = rng.integers(2, 7)
        for s in range(2):
            n = rng.integers(prompt + 1, t + 1)
            attention[i, s, :n] = 1
            completion[i, s, prompt:n] = 1
    completion[-1] = attention[-1] = 0
    return ids, attention, completion


def make_batch(b=8, t=16, seed=0, vocab=128, micro_batches=1):
    """make_sequences' pairs as a step's batch (batching.py's pairs layout)."""
    batch = plain_rows(*make_sequences(b, t, seed, vocab), micro_batches=micro_batches)
    batch["pair_mask"] = np.ones(b, np.int32)
    batch["pair_mask"][-1] = 0
    return batch


def sequence_logps(model, ids, attention, completion, chunk=None):
    """batch_logps of [B, 2, T] sequences: [B, 2] (chosen, rejected)."""
    rows = jax.tree.map(jnp.asarray, plain_rows(np.asarray(ids), np.asarray(attention), np.asarray(completion)))
    return batch_logps(model, rows, ids.shape[0], chunk=chunk)


def load(path, **kw):
    return from_pretrained(path, **kw)


@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_chunked_logps_equal_transformers_log_softmax(checkpoint, chunk):
    path, torch_model = checkpoint
    sequences = make_sequences()
    ours = {k: v.reshape(-1) for k, v in sequence_logps(load(path), *sequences, chunk=chunk).items()}
    rows = [x.reshape(-1, 16) for x in sequences]
    rows.append(np.maximum(np.cumsum(rows[1], -1) - 1, 0))
    ids, attention, completion, positions = (torch.tensor(r, dtype=torch.long) for r in rows)
    with torch.no_grad():
        logits = torch_model(input_ids=ids, attention_mask=attention, position_ids=positions).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = completion[:, 1:].double()
    np.testing.assert_allclose(np.asarray(ours["logps"]), (logp * mask).sum(-1).numpy(), rtol=2e-6, atol=2e-5)
    np.testing.assert_allclose(np.asarray(ours["tokens"]), mask.sum(-1).numpy())
    mean_logits = (logits[:, :-1].mean(-1) * mask).sum(-1).numpy()
    np.testing.assert_allclose(np.asarray(ours["logit_sum"]), mean_logits, rtol=2e-6, atol=2e-5)


@pytest.mark.parametrize("chunk", [4, None])
def test_long_prompts_short_completions_logps_equal_transformers(checkpoint, chunk):
    """Targets gathered to the front of each row and the head's chunks past them skipped: with prompts of 40 to
    56 tokens and completions of 1 to 6 in rows of 64, most chunks are skipped (None: the head's own MIN_CHUNKS
    chunks), and the log-probs are still transformers' log-softmax."""
    path, torch_model = checkpoint
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 128, (6, 64)).astype(np.int32)
    attention, completion = np.zeros((6, 64), np.int32), np.zeros((6, 64), np.int32)
    for i in range(6):
        prompt, n = rng.integers(40, 57), rng.integers(1, 7)
        attention[i, :prompt + n] = 1
        completion[i, prompt:prompt + n] = 1
    rows = [ids, attention, completion, np.maximum(np.cumsum(attention, -1) - 1, 0).astype(np.int32)]
    model = load(path)
    batch = jax.tree.map(jnp.asarray, plain_rows(*(x.reshape(3, 2, 64) for x in rows[:3])))
    ours = jax.jit(lambda m, b: batch_logps(m, b, 3, chunk=chunk))(model, batch)
    ours = {k: v.reshape(-1) for k, v in ours.items()}
    t_ids, t_attention, t_completion, t_positions = (torch.tensor(r, dtype=torch.long) for r in rows)
    with torch.no_grad():
        logits = torch_model(input_ids=t_ids, attention_mask=t_attention, position_ids=t_positions).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, t_ids[:, 1:, None])[..., 0]
    mask = t_completion[:, 1:].double()
    np.testing.assert_allclose(np.asarray(ours["logps"]), (logp * mask).sum(-1).numpy(), rtol=2e-6, atol=2e-5)
    mean_logits = (logits[:, :-1].mean(-1) * mask).sum(-1).numpy()
    np.testing.assert_allclose(np.asarray(ours["logit_sum"]), mean_logits, rtol=2e-6, atol=2e-5)


def setup(path, cfg=S.StepConfig(), mesh=None, lr=1e-3, ref_path=None):  # noqa: D103
    policy = load(path, mesh=mesh)
    graphdef, params = S.split_policy(policy, cfg.gradient_checkpointing)
    ref_graphdef, ref_params = S.split_reference(load(ref_path or path, mesh=mesh), cfg.gradient_checkpointing)
    tx = S.make_optimizer(S.OptimConfig(learning_rate=lr, lr_scheduler_type="constant"), 10)
    state = S.init_state(params, tx)
    fn = S.compile_train_step(graphdef, ref_graphdef, cfg, tx, mesh, state, ref_params)
    return fn, state, ref_params


def put(batch, mesh):
    return batch if mesh is None else jax.device_put(batch, S.batch_sharding(mesh))


def test_policy_equal_to_reference_gives_ln2_and_no_reward(checkpoint):
    fn, state, ref = setup(checkpoint[0])
    _, metrics = fn(state, ref, make_batch())
    np.testing.assert_allclose(float(metrics["loss"]), np.log(2), rtol=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert float(metrics[k]) == 0.0, k


def test_reference_is_unchanged_and_policy_changes(checkpoint):
    fn, state, ref = setup(checkpoint[0])
    before = jax.tree.map(np.array, ref)
    start = jax.tree.map(np.array, state.params)
    for seed in range(3):
        state, metrics = fn(state, ref, make_batch(seed=seed))
    assert int(state.step) == 3
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(ref)))
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(state.params))]
    assert all(changed)
    assert float(metrics["rewards/margins"]) != 0.0


def test_gradients_equal_central_finite_differences(checkpoint):
    """The whole step's loss (DPO + RPO NLL term, two micro-batches) in float64: jax.grad against central
    differences on a few coordinates of several parameters."""
    path, _ = checkpoint
    with jax.enable_x64(True):
        cfg = S.StepConfig(loss=LossConfig(loss_type=("sigmoid", "ipo"), beta=0.5, rpo_alpha=0.3),
                           gradient_accumulation_steps=1)
        policy = load(path, dtype=jnp.float64, param_dtype=jnp.float64)
        graphdef, params = S.split_policy(policy, True)
        ref_graphdef, ref_params = S.split_reference(load(path, dtype=jnp.float64, param_dtype=jnp.float64))
        params = jax.tree.map(lambda x: x + 0.05 * jnp.sin(jnp.arange(x.size).reshape(x.shape)), params)
        batch = jax.tree.map(jnp.asarray, make_batch(b=4))
        counts = S.batch_counts(batch)

        def loss(p):
            return S._micro_loss(p, graphdef, ref_graphdef, ref_params, batch, counts, cfg)[0]

        grads = jax.jit(jax.grad(loss))(params)
        loss_jit = jax.jit(loss)
        flat_p, tree = jax.tree.flatten(params)
        flat_g = jax.tree.leaves(grads)
        rng = np.random.default_rng(0)
        h = 1e-5
        for leaf in rng.choice(len(flat_p), 6, replace=False):
            for _ in range(2):
                idx = tuple(int(rng.integers(0, s)) for s in flat_p[leaf].shape)
                def shifted(delta):
                    leaves = list(flat_p)
                    leaves[leaf] = leaves[leaf].at[idx].add(delta)
                    return float(loss_jit(jax.tree.unflatten(tree, leaves)))
                numeric = (shifted(h) - shifted(-h)) / (2 * h)
                np.testing.assert_allclose(float(flat_g[leaf][idx]), numeric, rtol=1e-5, atol=1e-8)


def _run(path, mesh, steps=2, cfg=S.StepConfig(), batches=None, ref_path=None):
    # TRL's default learning rate: Adam turns gradients of ~1e-7 relative noise into updates of up to lr
    # for coordinates whose gradient is near zero, so larger rates compare Adam's sign noise, not the step.
    fn, state, ref = setup(path, cfg, mesh=mesh, lr=1e-6, ref_path=ref_path)
    out = []
    for s in range(steps):
        state, metrics = fn(state, ref, put(batches[s] if batches else make_batch(seed=s), mesh))
        out.append({k: float(v) for k, v in metrics.items()})
    return out, jax.tree.map(np.asarray, state.params), state


@pytest.mark.parametrize("axes,chunk", [(dict(data=8, fsdp=1), None), (dict(data=1, fsdp=8), None),
                                        (dict(data=2, fsdp=2, tensor=2), None),
                                        (dict(data=1, fsdp=8), 5), (dict(data=2, fsdp=2, tensor=2), 5)])
def test_meshes_of_eight_equal_one_device(checkpoint, other_checkpoint, axes, chunk):
    """Also with the head in chunks of 5 positions (some skipped past the rows' targets), each device running
    the chunk loop over its own rows and the head's gradient reduce-scattered after it."""
    path, _ = checkpoint
    cfg = S.StepConfig(chunk=chunk)
    one_metrics, one_params, _ = _run(path, make_mesh(data=1, fsdp=1, devices=jax.devices()[:1]),
                                      ref_path=other_checkpoint, cfg=cfg)
    mesh = make_mesh(**axes)
    metrics, params, state = _run(path, mesh, ref_path=other_checkpoint, cfg=cfg)
    assert 0 < one_metrics[0]["rewards/accuracies"] < 1
    for a, b in zip(one_metrics, metrics):
        for k in a:
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(one_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    # the parameters really are laid out as the rules say: the stacked q_proj kernel is [layers -> not split,
    # embed -> fsdp, q_heads -> tensor]
    kernel = state.params["layers"]["self_attn"]["q_proj"]["kernel"]
    expected = (None,) + tuple(a if axes.get(a, 1) > 1 else None for a in ("fsdp", "tensor"))
    spec = tuple(kernel.sharding.spec)
    assert spec + (None,) * (3 - len(spec)) == expected
    if axes.get("fsdp", 1) > 1:
        assert kernel.addressable_shards[0].data.shape[:2] == (kernel.shape[0], kernel.shape[1] // axes["fsdp"])


def test_gradient_accumulation_equals_one_big_batch(checkpoint, other_checkpoint):
    """4 micro-batches of 2 pairs (one of them filler) against one batch of 8, with a token-averaged term."""
    path, _ = checkpoint
    batch = make_batch(b=8, seed=5)
    in_four = make_batch(b=8, seed=5, micro_batches=4)  # the same pairs, rows ordered for 4 micro-batches
    loss = LossConfig(loss_type=("sigmoid", "sft"))
    acc, acc_params, _ = _run(path, None, steps=1, batches=[in_four], ref_path=other_checkpoint,
                              cfg=S.StepConfig(gradient_accumulation_steps=4, loss=loss))
    big_sft, big_sft_params, _ = _run(path, None, steps=1, batches=[batch], ref_path=other_checkpoint,
                                      cfg=S.StepConfig(loss=loss))
    for k in big_sft[0]:
        np.testing.assert_allclose(acc[0][k], big_sft[0][k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(big_sft_params), jax.tree.leaves(acc_params)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_nonfinite_step_is_not_applied(checkpoint):
    fn, state, ref = setup(checkpoint[0])
    params = jax.tree.map(lambda x: x, state.params)
    kernel = params["layers"]["mlp"]["up_proj"]["kernel"]
    params["layers"]["mlp"]["up_proj"]["kernel"] = kernel.at[0, 0, 0].set(jnp.nan)
    state = S.init_state(params, S.make_optimizer(S.OptimConfig(learning_rate=1e-3, lr_scheduler_type="constant"), 10))
    before = jax.tree.map(np.array, (state.params, state.opt_state))
    for run in (1, 2):
        state, metrics = fn(state, ref, make_batch())
        assert not bool(metrics["applied"]) and int(metrics["nonfinite_run"]) == run
    assert int(state.step) == 0 and int(state.nonfinite_total) == 2
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_precomputed_reference_equals_live_reference(checkpoint, other_checkpoint, tmp_path):
    """Reference log-probs from the precompute pass (cached on disk) give the same step as the live reference."""
    from dpo_jax import reference
    from dpo_jax.batching import BatchIterator
    from test_batching import random_pairs

    pairs = random_pairs(12)  # token ids < 100 fit the tiny vocabulary of 128
    ref_graphdef, ref_params = S.split_reference(load(other_checkpoint))
    key = reference.cache_key(ref_params, "cfg", pairs, jnp.float32)
    table = reference.precompute(ref_graphdef, ref_params, pairs, batch_size=5, pad_token_id=0,
                                 cache_dirs=[tmp_path / "a", tmp_path / "b"], key=key)
    assert (tmp_path / "a" / f"{key}.npy").exists() and (tmp_path / "b" / f"{key}.npy").exists()
    again = reference.precompute(None, None, pairs, batch_size=5, pad_token_id=0, cache_dirs=[tmp_path / "b"],
                                 key=key)  # no model: must come from the cache
    np.testing.assert_array_equal(again, table)
    assert reference.cache_key(ref_params, "cfg", random_pairs(12, seed=1), jnp.float32) != key
    assert reference.cache_key(ref_params, "other cfg", pairs, jnp.float32) != key
    assert reference.cache_key(ref_params, "cfg", pairs, jnp.bfloat16) != key

    batches = BatchIterator(pairs, global_batch_size=4, pad_token_id=0, seed=1)
    batch = batches.batch(0, 2)
    live_fn, live_state, live_ref = setup(checkpoint[0], ref_path=other_checkpoint)
    _, live = live_fn(live_state, live_ref, batch)
    batches.ref_logps = table
    batch = batches.batch(0, 2)
    fn, state, _ = setup(checkpoint[0], ref_path=other_checkpoint)
    _, pre = fn(state, None, batch)
    for k in live:
        np.testing.assert_allclose(float(pre[k]), float(live[k]), rtol=1e-6, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_prefix_sharing_equals_separate_sequences(arch, tmp_path):
    """One row per pair (prompt once, rejected restarting its positions and masked from chosen): the same
    per-pair log-probs and the same gradients as chosen and rejected in rows of their own."""
    from dpo_jax.batching import BatchIterator
    from test_batching import random_pairs

    tiny_models.make_model(arch).save_pretrained(tmp_path)
    pairs = random_pairs(8, max_len=12)  # short completions: gpt2's 32 learned positions
    plain = BatchIterator(pairs, global_batch_size=8, pad_token_id=0, shuffle=False).batch(0, 0)
    shared = BatchIterator(pairs, global_batch_size=8, pad_token_id=0, shuffle=False,
                           layout="shared_prefix").batch(0, 0)
    assert shared["input_ids"].shape[1] < 2 * plain["input_ids"].shape[1]
    cfg = S.StepConfig(loss=LossConfig(loss_type=("sigmoid", "sft")))
    graphdef, params = S.split_policy(load(str(tmp_path)), True)
    ref_graphdef, ref_params = S.split_reference(load(str(tmp_path)))
    params = jax.tree.map(lambda x: x * 1.1, params)  # policy != reference

    def run(batch):
        batch = jax.tree.map(jnp.asarray, batch)
        p, logits = S.pair_logps(graphdef, params, ref_graphdef, ref_params, batch, cfg)
        grads = jax.grad(lambda q: S._micro_loss(q, graphdef, ref_graphdef, ref_params, batch,
                                                 S.batch_counts(batch), cfg)[0])(params)
        return p, logits, grads

    p1, l1, g1 = run(plain)
    p2, l2, g2 = run(shared)
    for field in ("chosen", "rejected", "ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens"):
        np.testing.assert_allclose(getattr(p2, field), getattr(p1, field), rtol=1e-5, atol=1e-5, err_msg=field)
    np.testing.assert_allclose(l2, l1, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_lora_trains_only_adapters_and_its_reference_is_the_base(checkpoint, tmp_path):
    from dpo_jax import lora

    path, _ = checkpoint
    cfg = S.StepConfig(lora=True)
    model = lora.apply_lora(load(path), rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
    graphdef, adapters, base = lora.split_lora(model, cfg.gradient_checkpointing)
    # A and B on 3 kinds of layer, each stacked over the 3 layers
    assert [x.shape[0] for x in jax.tree.leaves(adapters)] == [3] * 2 * 3
    tx = S.make_optimizer(S.OptimConfig(learning_rate=1e-2, lr_scheduler_type="constant"), 10)
    state = S.init_state(adapters, tx)
    assert {x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim} <= {a.shape for a in jax.tree.leaves(adapters)}
    fn = S.compile_train_step(graphdef, None, cfg, tx, None, state, base)
    before = jax.tree.map(np.array, base)
    state, metrics = fn(state, base, make_batch())
    np.testing.assert_allclose(float(metrics["loss"]), np.log(2), rtol=1e-6)  # B = 0: policy is the base
    assert float(metrics["rewards/accuracies"]) == 0.0
    for seed in range(1, 4):
        state, metrics = fn(state, base, make_batch(seed=seed))
    assert float(metrics["rewards/margins"]) != 0.0
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(base)))

    # the adapted model is the base model with kernel W + (alpha / r) A B, against transformers' numbers
    merged = load(path)
    _, merged_params = nnx.split(merged, nnx.Param)
    for module, name in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj")):
        ad = state.params["layers"][module][name]  # stacked: A [L, in, r] and B [L, r, out]
        kernel = merged_params["layers"][module][name]["kernel"]
        for layer in range(3):
            delta = 2.0 * ad["lora_a"].get_value()[layer] @ ad["lora_b"].get_value()[layer]
            kernel.set_value(kernel.get_value().at[layer].add(delta))
    nnx.update(merged, merged_params)
    sequences = make_sequences(seed=9)
    adapted = nnx.merge(graphdef, state.params, *base)
    np.testing.assert_allclose(sequence_logps(adapted, *sequences)["logps"],
                               sequence_logps(merged, *sequences)["logps"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["constant", "constant_with_warmup", "linear", "cosine"])
def test_learning_rate_schedules_equal_transformers(kind):
    """Our optax schedule against transformers' own scheduler (what TRL users get) on a torch optimizer."""
    total, warmup = 20, 4
    schedule = S.make_schedule(S.OptimConfig(learning_rate=0.5, lr_scheduler_type=kind,
                                             warmup_steps=0 if kind == "constant" else warmup), total)
    torch_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = transformers.get_scheduler(kind, torch_opt, num_warmup_steps=0 if kind == "constant" else warmup,
                                       num_training_steps=total)
    for step in range(total):
        # optax evaluates in float32, transformers in float64: agree to float32 resolution of the peak rate
        np.testing.assert_allclose(float(schedule(step)), sched.get_last_lr()[0], rtol=1e-6,
                                   atol=0.5 * np.finfo(np.float32).eps, err_msg=f"step {step}")
        torch_opt.step()
        sched.step()


def test_bfloat16_compute_with_float32_master_weights(checkpoint):
    """bf16 matmuls, float32 parameters and log-probs: the loss stays within bf16 rounding of float32's."""
    path, _ = checkpoint
    batch = make_batch()
    out = {}
    for name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        graphdef, params = S.split_policy(load(path, dtype=dtype, param_dtype=jnp.float32), True)
        ref_graphdef, ref = S.split_reference(load(path, dtype=dtype, param_dtype=jnp.float32))
        params = jax.tree.map(lambda x: x * 1.05, params)
        tx = S.make_optimizer(S.OptimConfig(), 10)
        state = S.init_state(params, tx)
        new_state, metrics = S.compile_train_step(graphdef, ref_graphdef, S.StepConfig(), tx, None, state, ref)(
            state, ref, batch)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.params))
        out[name] = metrics
    assert out["bf16"]["logps/chosen"].dtype == jnp.float32
    np.testing.assert_allclose(float(out["bf16"]["loss"]), float(out["f32"]["loss"]), rtol=2e-2)
    np.testing.assert_allclose(float(out["bf16"]["logps/chosen"]), float(out["f32"]["logps/chosen"]), rtol=2e-2)


def test_check_finite_stops_after_the_configured_run():
    S.check_finite(2, 3)
    with pytest.raises(Exception, match="not finite in the last 3 steps in a row"):
        S.check_finite(3, 3)


def test_completion_lengths_count_a_first_token_without_prompt(checkpoint):
    """An empty prompt: the first completion token has no log-prob (as TRL) but counts in ipo's length."""
    path, _ = checkpoint
    ids, attention, completion = make_sequences(b=3)
    completion[0] = attention[0]  # pair 0: everything is completion
    batch = plain_rows(ids, attention, completion)
    batch["pair_mask"] = np.ones(3, np.int32)
    graphdef, params = S.split_policy(load(path), True)
    p, _ = S.pair_logps(graphdef, params, graphdef, params, jax.tree.map(jnp.asarray, batch), S.StepConfig())
    np.testing.assert_array_equal(p.chosen_length, completion[:, 0].sum(-1))
    assert float(p.chosen_tokens[0]) == completion[0, 0].sum() - 1


def test_eval_sums_give_the_train_steps_metrics(checkpoint, other_checkpoint):
    path, _ = checkpoint
    cfg = S.StepConfig(loss=LossConfig(loss_type=("sigmoid", "sft")))
    fn, state, ref = setup(path, cfg, ref_path=other_checkpoint)
    params = jax.tree.map(jnp.copy, state.params)
    batch = make_batch(seed=2)
    _, metrics = fn(state, ref, batch)
    graphdef, _ = S.split_policy(load(path), True)
    ref_graphdef, _ = S.split_reference(load(other_checkpoint))
    evaluate = S.compile_eval_step(graphdef, ref_graphdef, cfg)
    in_two = make_batch(seed=2, micro_batches=2)  # the same pairs, each half's rows and pairs together
    halves = [jax.tree.map(lambda x: x[i::2], in_two) for i in range(2)]  # split differently: same totals
    sums = jax.tree.map(lambda a, b: a + b, *(evaluate(params, ref, h) for h in halves))
    out = S.finish_eval(jax.tree.map(float, sums), cfg)
    for k in ("loss", "rewards/chosen", "rewards/accuracies", "rewards/margins", "logps/rejected", "logits/chosen"):
        np.testing.assert_allclose(out[k], float(metrics[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def test_chunk_that_does_not_divide_the_length(checkpoint):
    path, _ = checkpoint
    sequences = make_sequences()
    model = load(path)
    np.testing.assert_allclose(sequence_logps(model, *sequences, chunk=5)["logps"],
                               sequence_logps(model, *sequences, chunk=16)["logps"], rtol=1e-6, atol=1e-6)


def test_lora_export_merges_adapters_and_transformers_loads_it(checkpoint, tmp_path):
    from dpo_jax import export_pretrained, lora

    path, _ = checkpoint
    mesh = make_mesh(data=2, fsdp=4)
    cfg = S.StepConfig(lora=True)
    model = lora.apply_lora(load(path, mesh=mesh), rank=2, alpha=4, targets="all-linear")
    graphdef, adapters, base = lora.split_lora(model, True)
    tx = S.make_optimizer(S.OptimConfig(learning_rate=1e-2, lr_scheduler_type="constant"), 10)
    state = S.init_state(adapters, tx)
    fn = S.compile_train_step(graphdef, None, cfg, tx, mesh, state, base)
    for seed in range(2):
        state, _ = fn(state, base, put(make_batch(seed=seed), mesh))
    trained = nnx.merge(graphdef, state.params, *base)
    export_pretrained(trained, str(tmp_path / "out"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    ids, mask, _ = make_sequences(seed=7)
    ids, mask = ids[:, 0], mask[:, 0]
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        theirs = exported(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    ours = np.asarray(trained(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(positions)))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], theirs[real], rtol=1e-4, atol=1e-4)
    assert not np.allclose(theirs, tiny_models.make_model("llama")(input_ids=torch.tensor(ids, dtype=torch.long))
                           .logits.detach().numpy())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packing_equals_separate_sequences(arch, tmp_path):
    """Several prompt-sharing pairs per row, in segments that do not see each other: the same per-pair
    log-probs and gradients as the plain path, with fewer rows than pairs."""
    from dpo_jax.batching import BatchIterator
    from test_batching import random_pairs

    tiny_models.make_model(arch).save_pretrained(tmp_path)
    pairs = random_pairs(8, max_len=12)
    plain = BatchIterator(pairs, global_batch_size=8, pad_token_id=0, shuffle=False).batch(0, 0)
    packed = BatchIterator(pairs, global_batch_size=8, pad_token_id=0, shuffle=False, layout="packed").batch(0, 0)
    assert packed["input_ids"].shape[0] < 8 and packed["segment"].max() >= 1
    cfg = S.StepConfig(loss=LossConfig(loss_type=("sigmoid", "sft", "ipo")))
    graphdef, params = S.split_policy(load(str(tmp_path)), True)
    ref_graphdef, ref_params = S.split_reference(load(str(tmp_path)))
    params = jax.tree.map(lambda x: x * 1.1, params)

    def run(batch):
        batch = jax.tree.map(jnp.asarray, batch)
        p, logits = S.pair_logps(graphdef, params, ref_graphdef, ref_params, batch, cfg)
        loss, grads = jax.value_and_grad(lambda q: S._micro_loss(q, graphdef, ref_graphdef, ref_params, batch,
                                                                 S.batch_counts(batch), cfg)[0])(params)
        return p, logits, loss, grads

    p1, l1, loss1, g1 = run(plain)
    p2, l2, loss2, g2 = run(packed)
    for field in ("chosen", "rejected", "ref_chosen", "ref_rejected", "chosen_tokens", "rejected_tokens",
                  "chosen_length", "rejected_length"):
        np.testing.assert_allclose(getattr(p2, field), getattr(p1, field), rtol=1e-5, atol=1e-5, err_msg=field)
    np.testing.assert_allclose(l2, l1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss2), float(loss1), rtol=1e-6)
    # Per leaf, relative to the gradient's norm: rows now hold several pairs, so float32 sums run in another
    # order, and an entry's rounding error scales with the magnitudes summed into it, not with the entry.
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        assert np.linalg.norm(np.asarray(b) - np.asarray(a)) <= 1e-5 * np.linalg.norm(np.asarray(a))


def test_precompute_for_lora_is_the_base_model(checkpoint, tmp_path):
    from dpo_jax import lora, reference
    from test_batching import random_pairs

    path, _ = checkpoint
    pairs = random_pairs(6)
    graphdef, adapters, base = lora.split_lora(lora.apply_lora(load(path), rank=2, alpha=2), True)
    zeros = jax.tree.map(jnp.zeros_like, adapters)
    table = reference.precompute(graphdef, (zeros, *base), pairs, batch_size=4, pad_token_id=0)
    plain_graphdef, plain = S.split_reference(load(path))
    np.testing.assert_allclose(table, reference.precompute(plain_graphdef, plain, pairs, batch_size=4, pad_token_id=0),
                               rtol=1e-6, atol=1e-5)


def test_packing_with_gradient_accumulation_equals_one_plain_batch(checkpoint, other_checkpoint):
    from dpo_jax.batching import BatchIterator
    from test_batching import random_pairs

    path, _ = checkpoint
    pairs = random_pairs(7, max_len=12)  # 7 pairs in a batch of 8: one filler
    plain = BatchIterator(pairs, global_batch_size=8, pad_token_id=0, shuffle=False).batch(0, 0)
    packed = BatchIterator(pairs, global_batch_size=8, pad_token_id=0, shuffle=False, layout="packed",
                           micro_batches=2).batch(0, 0)
    loss = LossConfig(loss_type=("sigmoid", "sft"))
    out = []
    for batch, k in ((plain, 1), (packed, 2)):
        fn, state, ref = setup(path, S.StepConfig(loss=loss, gradient_accumulation_steps=k), ref_path=other_checkpoint)
        out.append({key: float(v) for key, v in fn(state, ref, batch)[1].items()})
    for key in out[0]:
        np.testing.assert_allclose(out[1][key], out[0][key], rtol=1e-5, atol=1e-6, err_msg=key)


def test_lora_dropout_in_training_only(checkpoint):
    """lora_dropout drops the adapters' input in training steps (a new mask each step), never in evaluation or
    in the reference; with B = 0 the first step is still exactly ln 2."""
    from dpo_jax import lora

    path, _ = checkpoint
    cfg = S.StepConfig(lora=True)
    batch = jax.tree.map(jnp.asarray, make_batch())

    def adapters_and_base(dropout):
        model = lora.apply_lora(load(path), rank=4, alpha=8, dropout=dropout)
        return lora.split_lora(model, True)

    graphdef, adapters, base = adapters_and_base(0.5)
    tx = S.make_optimizer(S.OptimConfig(learning_rate=1e-2, lr_scheduler_type="constant"), 10)
    state = S.init_state(adapters, tx)
    fn = S.compile_train_step(graphdef, None, cfg, tx, None, state, base)
    state, metrics = fn(state, base, batch)
    np.testing.assert_allclose(float(metrics["loss"]), np.log(2), rtol=1e-6)
    state, _ = fn(state, base, batch)
    trained = state.params
    evaluate = functools.partial(S.pair_logps, graphdef, trained, None, base, batch, cfg)
    no_dropout = evaluate()[0].chosen
    with_dropout = [evaluate(salt=jnp.int32(s))[0].chosen for s in (1, 2)]
    assert not np.allclose(with_dropout[0], no_dropout) and not np.allclose(with_dropout[0], with_dropout[1])
    plain_graphdef, _, plain_base = adapters_and_base(0.0)  # the same adapters without dropout
    np.testing.assert_allclose(no_dropout, S.pair_logps(plain_graphdef, trained, None, plain_base, batch, cfg)[0].chosen,
                               rtol=1e-6, atol=1e-5)
    ref = evaluate(salt=jnp.int32(1))[0]
    np.testing.assert_allclose(ref.ref_chosen, evaluate()[0].ref_chosen, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_gradient_checkpointing_equals_plain_backward(arch, tmp_path):
    """The stacked blocks' scan with its body under jax.checkpoint (gemma2 alternates sliding and global layers:
    the window is scanned data) gives the plain backward pass's loss, metrics and gradients."""
    tiny_models.make_model(arch).save_pretrained(tmp_path)
    batch = jax.tree.map(jnp.asarray, make_batch(t=16))
    results = []
    for remat in (False, True):
        cfg = S.StepConfig(loss=LossConfig(loss_type=("sigmoid", "sft")), gradient_checkpointing=remat)
        graphdef, params = S.split_policy(load(str(tmp_path)), remat)
        ref_graphdef, ref_params = S.split_reference(load(str(tmp_path)), remat)
        params = jax.tree.map(lambda x: x * 1.1, params)  # policy != reference

        def loss(p):
            return S._micro_loss(p, graphdef, ref_graphdef, ref_params, batch, S.batch_counts(batch), cfg)
        (value, (sums, _)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        results.append((float(value), jax.tree.map(float, sums), jax.tree.map(np.asarray, grads)))
    (loss0, sums0, grads0), (loss1, sums1, grads1) = results
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    for k in sums0:
        np.testing.assert_allclose(sums1[k], sums0[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(jax.tree.leaves(grads0), jax.tree.leaves(grads1)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * np.abs(a).max())
