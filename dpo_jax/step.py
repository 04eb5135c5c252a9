"""The DPO training and evaluation steps: pure functions, jitted once each in `compile_train_step` /
`compile_eval_step` with explicit shardings, the training state donated (never the reference).

A batch is `batching.py`'s dict, one type for every layout ([R, L] token rows with per-token segment, branch
and loss-target sources; [B] per-pair arrays), optionally with `ref_logps` [B, 2] when the reference log-probs
were precomputed. The policy runs once over all rows. With gradient accumulation k, row i * k + j and pair
i * k + j of the global batch belong to micro-batch j, so every device holds part of every micro-batch; gradients are summed over micro-batches,
with every loss normalised by the counts of the whole global batch, so k micro-batches of b pairs give the
same update as one batch of k * b (except for `aot` / `aot_unpaired`, which sort within a micro-batch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from . import losses, sharding
from .config import SCHEDULES, LossConfig, OptimConfig
from .errors import UserError
from .logps import batch_logps
from .losses import PairLogps

BATCH_AXES = ("data", "fsdp")  # the global batch is split over both; tensor-parallel devices share rows


@dataclass(frozen=True)
class StepConfig:
    loss: LossConfig = LossConfig()
    gradient_accumulation_steps: int = 1
    chunk: int | None = None  # positions per head chunk in logps.py (None: from a memory budget)
    attn_implementation: str = "auto"  # see models/attention.py and models/kernels.py
    gradient_checkpointing: bool = True  # recompute each decoder block in the backward pass (TRL's default)
    lora: bool = False  # params are LoRA adapters and ref_params the frozen base (see lora.py)
    seed: int = 42  # for LoRA dropout


class TrainState(NamedTuple):
    step: jax.Array  # int32: optimizer updates applied
    params: nnx.State  # the policy's trainable parameters
    opt_state: optax.OptState
    nonfinite_run: jax.Array  # int32: consecutive steps not applied: loss, gradients or updated parameters not finite
    nonfinite_total: jax.Array


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The learning rate per step, as transformers' get_scheduler: linear warmup from 0, then constant, linear
    decay to 0 or a half-cosine to 0 at `total_steps`."""
    if cfg.lr_scheduler_type not in SCHEDULES:
        raise UserError(f"lr_scheduler_type must be one of {', '.join(SCHEDULES)}, not {cfg.lr_scheduler_type!r}")
    warmup = cfg.warmup_steps or int(-(-cfg.warmup_ratio * total_steps // 1))
    lr, decay_steps = cfg.learning_rate, max(total_steps - warmup, 1)
    after = {"constant": optax.constant_schedule(lr), "constant_with_warmup": optax.constant_schedule(lr),
             "linear": optax.linear_schedule(lr, 0.0, decay_steps),
             "cosine": optax.cosine_decay_schedule(lr, decay_steps)}[cfg.lr_scheduler_type]
    return after if cfg.lr_scheduler_type == "constant" or warmup == 0 else optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with the schedule; weight decay on parameters with 2+ dimensions."""
    adamw = optax.adamw(make_schedule(cfg, total_steps), b1=cfg.adam_beta1, b2=cfg.adam_beta2, eps=cfg.adam_epsilon,
                        weight_decay=cfg.weight_decay,
                        mask=lambda p: jax.tree.map(sharding.is_matrix, p, is_leaf=sharding.is_variable))
    clip = optax.clip_by_global_norm(cfg.max_grad_norm) if cfg.max_grad_norm else optax.identity()
    return optax.chain(clip, adamw)


def init_state(params: nnx.State, tx: optax.GradientTransformation, donate: bool = False) -> TrainState:
    """The initial state, built under jit with explicit output shardings (`train_state_shardings`): the optimizer's
    moments split like their parameters, scalars replicated, each with its own buffers (the state is donated to
    the step). With `donate` the state takes over `params`' buffers (no copy; `params` cannot be used afterwards)."""
    def init(p):
        zero = jnp.zeros((), jnp.int32)
        return TrainState(zero, p, tx.init(p), zero, zero)
    shardings = train_state_shardings(params, tx)
    if donate:
        return jax.jit(init, donate_argnums=0, out_shardings=shardings)(params)
    return jax.jit(init, out_shardings=shardings)(jax.tree.map(jnp.copy, params))


def train_state_shardings(params, tx: optax.GradientTransformation) -> TrainState | None:
    """The sharding of every leaf of the training state built from `params` (arrays placed on a mesh, or
    `jax.ShapeDtypeStruct`s with shardings): the parameters keep theirs, every optimizer-state array shaped like a
    parameter (AdamW's mu and nu, an accumulator) takes its parameter's, everything else (counts, the step) is
    replicated. None when the parameters are not on a mesh (one device). Without this, `tx.init` under jit gives
    replicated moments: an 8B model's AdamW state whole on every chip."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not flat or not isinstance(getattr(flat[0][1], "sharding", None), NamedSharding):
        return None
    replicated = NamedSharding(flat[0][1].sharding.mesh, PartitionSpec())
    by_path = {tuple(path): (leaf.shape, leaf.sharding) for path, leaf in flat}

    def place(path, leaf):  # an optimizer array is its parameter's when its path ends with the parameter's path
        for start in range(len(path)):
            shape, found = by_path.get(tuple(path[start:]), (None, None))
            if found is not None and shape == leaf.shape:
                return found
        return replicated

    abstract = jax.eval_shape(lambda p: tx.init(p), params)
    return TrainState(step=replicated, params=jax.tree.map(lambda x: x.sharding, params),
                      opt_state=jax.tree_util.tree_map_with_path(place, abstract),
                      nonfinite_run=replicated, nonfinite_total=replicated)


def split_policy(model, gradient_checkpointing: bool):
    """(graphdef, params) of the policy, with block rematerialisation on or off."""
    model.remat = gradient_checkpointing
    return nnx.split(model, nnx.Param)


def split_reference(model, like_policy_remat: bool = False):
    """(graphdef, params) of the frozen reference. It has no backward pass, so nothing to rematerialise, but with
    `like_policy_remat` its blocks run in the same scan as a rematerialised policy's: the same program rounds
    the same way, so a policy equal to its reference gets rewards of exactly 0, as TRL."""
    model.remat = like_policy_remat
    return nnx.split(model, nnx.Param)


def check_finite(nonfinite_run: int, max_nonfinite_steps: int, saved: Path | None = None) -> None:
    """Host side, after a step: stop when `max_nonfinite_steps` steps in a row were skipped as not finite;
    `saved` is the checkpoint of the last good state, named in the message."""
    if nonfinite_run >= max_nonfinite_steps:
        kept = (f"The last good state is saved in {saved}: continue from it with --resume_from_checkpoint true "
                f"and a change below." if saved else "No checkpoint was saved (save_strategy no).")
        raise UserError(f"the loss, gradients or updated parameters were not finite in the last {nonfinite_run} "
                        f"steps in a row, which were not applied; training stopped. {kept} Lower the learning rate, "
                        f"check the data (dpo-jax audit), train in float32 instead of bfloat16, or raise "
                        f"max_nonfinite_steps.")


# ------------------------------------------------------------------------------------------------ the maths
def pair_logps(graphdef, params, ref_graphdef, ref_params, batch: dict, cfg: StepConfig, salt=None):
    """PairLogps of a (micro-)batch and the per-pair logit sums (chosen, rejected). `salt` (training only)
    draws the LoRA dropout masks; without it there is no dropout."""
    b = batch["pair_mask"].shape[0]
    forward = functools.partial(batch_logps, batch=batch, pairs=b, chunk=cfg.chunk,
                                attn_implementation=cfg.attn_implementation)
    if cfg.lora:  # the policy is base + adapters; the reference the same base with the adapters zeroed
        from .lora import dropout_keys

        keys, base = jax.lax.stop_gradient(ref_params)
        policy_keys = keys if salt is None else dropout_keys(keys, salt, cfg.seed)
        policy_model = nnx.merge(graphdef, params, policy_keys, base)
        ref_model = nnx.merge(graphdef, jax.tree.map(jnp.zeros_like, params), keys, base)
    else:
        policy_model = nnx.merge(graphdef, params)
        ref_model = None if ref_params is None else nnx.merge(ref_graphdef, jax.lax.stop_gradient(ref_params))
    pol = forward(policy_model)
    if cfg.loss.reference_free or all(name in losses.REFERENCE_FREE for name, _ in cfg.loss.terms()):
        ref = jnp.zeros((b, 2), pol["logps"].dtype)
    elif "ref_logps" in batch:
        ref = batch["ref_logps"].astype(pol["logps"].dtype)
    elif ref_model is None:
        raise UserError("no reference: give reference parameters, precomputed ref_logps, or reference_free")
    else:
        ref = jax.lax.stop_gradient(forward(ref_model)["logps"])
    length = pol["length"].astype(ref.dtype)
    p = PairLogps(chosen=pol["logps"][:, 0], rejected=pol["logps"][:, 1], ref_chosen=ref[:, 0],
                  ref_rejected=ref[:, 1], chosen_tokens=pol["tokens"][:, 0], rejected_tokens=pol["tokens"][:, 1],
                  chosen_length=length[:, 0], rejected_length=length[:, 1],
                  mask=batch["pair_mask"].astype(ref.dtype))
    return p, pol["logit_sum"]


def batch_counts(batch: dict) -> dict[str, jax.Array]:
    """Denominators of the losses, from the whole global batch: real pairs and their chosen target tokens."""
    pair_mask = batch["pair_mask"].astype(jnp.float32)
    chosen_targets = ((batch["branch"] == 1) & (batch["source"] >= 0)).astype(jnp.float32)  # none in filler
    return {"pairs": pair_mask.sum(), "chosen_tokens": chosen_targets.sum()}


def _micro_loss(params, graphdef, ref_graphdef, ref_params, micro: dict, counts: dict, cfg: StepConfig,
                salt=None):
    p, logit_sum = pair_logps(graphdef, params, ref_graphdef, ref_params, micro, cfg, salt)
    mask = micro["pair_mask"].astype(p.chosen.dtype)
    loss, parts = jnp.zeros((), p.chosen.dtype), {}
    for name, weight in cfg.loss.terms():
        numerator = (losses.LOSSES[name](p, cfg.loss) * mask).sum()
        denominator = counts["chosen_tokens"] if name in losses.TOKEN_AVERAGED else counts["pairs"]
        parts[name] = numerator
        loss = loss + weight * numerator / jnp.maximum(denominator, 1)
    sums = losses.metric_sums(p, mask, (logit_sum[:, 0] * mask).sum(), (logit_sum[:, 1] * mask).sum(), cfg.loss)
    return loss, (sums, parts)


def _split_micro(batch: dict, k: int) -> dict:
    """[k * b, ...] -> [k, b, ...] with row i * k + j in micro-batch j."""
    def split(x):
        return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def train_step(state: TrainState, ref_params, batch: dict, *, graphdef, ref_graphdef, cfg: StepConfig,
               tx: optax.GradientTransformation, param_shardings=None) -> tuple[TrainState, dict]:
    """One optimizer update from one global batch; not applied when the loss or gradients are not finite.
    `param_shardings` (the parameters' NamedShardings, on a mesh): gradients and their running sum are laid out
    like the parameters, so each device reduces only its own shard (a reduce-scatter, not an all-reduce)."""
    counts = batch_counts(batch)
    k = cfg.gradient_accumulation_steps

    def laid_out(grads):
        return grads if param_shardings is None else jax.lax.with_sharding_constraint(grads, param_shardings)

    def grad_fn(*args):
        (loss, aux), grads = jax.value_and_grad(_micro_loss, has_aux=True)(*args)
        return (loss, aux), laid_out(grads)

    def micro_step(carry, xs):
        micro, j = xs
        loss, grads, sums, parts = carry
        salt = (state.step + state.nonfinite_total) * k + j  # a new LoRA dropout mask per micro-batch and step
        (l, (s, p)), g = grad_fn(state.params, graphdef, ref_graphdef, ref_params, micro, counts, cfg, salt)
        return (loss + l, jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s),
                jax.tree.map(jnp.add, parts, p)), None

    if k == 1:  # no running sum of gradients to keep
        (loss, (sums, parts)), grads = grad_fn(state.params, graphdef, ref_graphdef, ref_params, batch, counts, cfg,
                                               state.step + state.nonfinite_total)
    else:
        micro0 = jax.tree.map(lambda x: x[0], _split_micro(batch, k))
        shapes = jax.eval_shape(lambda: _micro_loss(state.params, graphdef, ref_graphdef, ref_params, micro0,
                                                    counts, cfg)[1])
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        loss_shape = jax.eval_shape(lambda: _micro_loss(state.params, graphdef, ref_graphdef, ref_params, micro0,
                                                        counts, cfg)[0])
        init = (jnp.zeros((), loss_shape.dtype), laid_out(jax.tree.map(jnp.zeros_like, state.params)), *zeros)
        (loss, grads, sums, parts), _ = jax.lax.scan(micro_step, init, (_split_micro(batch, k), jnp.arange(k)))

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def update(_):
        updates, new_opt = tx.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), new_opt

    def keep(_):
        return state.params, state.opt_state
    # Finite gradients can still make parameters that are not (a huge learning rate, adam_epsilon 0 over a zero
    # gradient), so those are checked first: XLA fuses that update into the reduction, so the check costs one
    # more pass over params, grads and the moments (memory-bound: about 16 bytes a parameter per device, a few
    # ms per step for an 8B model on 8 chips) and stores nothing; selecting a stored update instead would hold
    # a second copy of the state. Only the branch taken runs, so a skipped step costs no update.
    applied = jax.lax.cond(finite, lambda _: all_finite(update(None)[0]), lambda _: jnp.array(False), None)
    new_params, new_opt = jax.lax.cond(applied, update, keep, None)
    new_state = TrainState(step=state.step + applied.astype(jnp.int32), params=new_params, opt_state=new_opt,
                           nonfinite_run=jnp.where(applied, 0, state.nonfinite_run + 1),
                           nonfinite_total=state.nonfinite_total + (~applied).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, **losses.finish_metrics(sums),
               "nonfinite_run": new_state.nonfinite_run, "applied": applied,
               "skipped_steps": new_state.nonfinite_total}
    if "sft" in parts:
        metrics["nll_loss"] = parts["sft"] / jnp.maximum(counts["chosen_tokens"], 1)
    return new_state, metrics


def all_finite(tree) -> jax.Array:
    """Whether every element of every array in `tree` is finite (one reduction per array, no host sync)."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def eval_sums(params, ref_params, batch: dict, *, graphdef, ref_graphdef, cfg: StepConfig) -> dict:
    """Numerators and denominators of the loss terms and metrics of one batch; add them over batches, then
    `finish_eval`, so the evaluation does not depend on how it was batched."""
    counts = batch_counts(batch)
    _, (sums, parts) = _micro_loss(params, graphdef, ref_graphdef, ref_params, batch, counts, cfg)
    return {**sums, **{f"loss/{k}": v for k, v in parts.items()}, "chosen_targets": counts["chosen_tokens"]}


def finish_eval(sums: dict, cfg: StepConfig) -> dict:
    out = losses.finish_metrics(sums)
    loss = 0.0
    for name, weight in cfg.loss.terms():
        denominator = sums["chosen_targets"] if name in losses.TOKEN_AVERAGED else sums["pairs"]
        loss = loss + weight * sums[f"loss/{name}"] / max(float(denominator), 1.0)
    out["loss"] = loss
    return out


# ------------------------------------------------------------------------------------------ jit and sharding
def state_shardings(params: nnx.State, mesh) -> nnx.State:
    """NamedShardings of parameters from their logical axes (see sharding.py)."""
    return jax.tree.map(lambda v: sharding.param_sharding(v.get_metadata().get("out_sharding"), v.shape, mesh),
                        params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def put_batch(batch: dict, mesh) -> dict:
    """A host batch as global arrays split over data x fsdp. With several processes each holds its own rows
    (`BatchIterator(process_index=..., process_count=...)`), which become its devices' part of the batch."""
    sharding = batch_sharding(mesh)
    if jax.process_count() == 1:
        return jax.device_put(batch, sharding)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def shard_params(params: nnx.State, mesh) -> nnx.State:
    return jax.device_put(params, state_shardings(params, mesh))


def _shardings(tree):
    return None if tree is None else jax.tree.map(lambda x: x.sharding, tree)


def _on_mesh(fn, mesh):
    """`fn` traced with activation sharding hints for `mesh` (see sharding.activations_on)."""
    if mesh is None:
        return fn

    @functools.wraps(fn)
    def traced(*args):
        with sharding.activations_on(mesh):
            return fn(*args)
    return traced


def compile_train_step(graphdef, ref_graphdef, cfg: StepConfig, tx, mesh, state: TrainState, ref_params):
    """`train_step` jitted once, with explicit shardings on `mesh`: the state (from `init_state` on sharded
    parameters) and the reference keep theirs, the batch is split over data x fsdp, the metrics are
    replicated. The state is donated; the reference never is."""
    state_sh = None if mesh is None else _shardings(state)
    fn = _on_mesh(functools.partial(train_step, graphdef=graphdef, ref_graphdef=ref_graphdef, cfg=cfg, tx=tx,
                                    param_shardings=None if mesh is None else state_sh.params), mesh)
    if mesh is None:
        return jax.jit(fn, donate_argnums=(0,))
    return jax.jit(fn, in_shardings=(state_sh, _shardings(ref_params), batch_sharding(mesh)),
                   out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))


def compile_eval_step(graphdef, ref_graphdef, cfg: StepConfig, mesh=None, params=None, ref_params=None):
    fn = _on_mesh(functools.partial(eval_sums, graphdef=graphdef, ref_graphdef=ref_graphdef, cfg=cfg), mesh)
    if mesh is None:
        return jax.jit(fn)
    return jax.jit(fn, in_shardings=(_shardings(params), _shardings(ref_params), batch_sharding(mesh)),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))
