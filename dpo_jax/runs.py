"""A trained run's checkpoint used as a model: `dpo-jax evaluate` and `dpo-jax export`.

A checkpoint stores the trained parameters (all of them, or the LoRA adapters) and the run's options; the
model is rebuilt from the options' `model_name_or_path` and the parameters restored into it, sharded.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from flax import nnx

from . import checkpoint, lora
from . import options as opts
from . import step as S
from .config import DataConfig, Options, frozen_quantization
from .data import MissingSplit
from .errors import UserError
from .hf import from_pretrained, load_tokenizer
from .hf_export import check_export_target, export_pretrained
from .models import quant
from .pairs import Pairs, load_pairs
from .sharding import make_mesh, parse_mesh
from .trainer import (check_reference_vocab, compute_dtype, eval_metrics, lora_targets, make_batches, pad_id,
                      step_config, with_layout)

log = logging.getLogger(__name__)

# evaluating a run: its options are the defaults but for these (the machine's, and where to look)
# trust_remote_code is consent, given on each command line: a checkpoint's saved value never grants it.
NOT_INHERITED = ("model_name_or_path", "ref_model_name_or_path", "resume_from_checkpoint", "mesh", "output_dir",
                 "trust_remote_code")
DATASET_CHOICE = ("dataset_config", "dataset_train_split", "dataset_test_split", "data_format")  # with another dataset

DEFAULT_TEST_SPLIT = DataConfig.dataset_test_split

EVAL_KEYS = ("eval_loss", "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/accuracies",
             "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected", "eval_logits/chosen",
             "eval_logits/rejected")


def run_options(path: str) -> Options | None:
    """The options of the run whose checkpoint `path` names, or None when `path` is not a checkpoint."""
    found = checkpoint.find(path)
    if found is None:
        return None
    directory, step = found
    with checkpoint.Checkpoints(directory, create=False) as checkpoints:
        return opts.from_saved(checkpoints.saved_options(step), source=f"checkpoint {path}")


def load_trained(path: str, mesh, dtype, trust_remote_code: bool = False) -> tuple[nnx.Module, Options, int]:
    """(the trained policy with any LoRA adapters folded in, the run's options, the step) of a checkpoint:
    the one `path` names, or the newest intact one (a damaged one is passed over with a warning, and left where
    it is). Only the parameters are read, not the optimizer state. `trust_remote_code` is this command's
    consent to the base model's own config code, never the saved run's."""
    found = checkpoint.find(path)
    if found is None:
        raise UserError(f"{path} is not a dpo-jax checkpoint: give a run's output_dir, its checkpoints/ "
                        f"directory, or one checkpoints/<step> directory")
    directory, step = found
    with checkpoint.Checkpoints(directory, create=False) as checkpoints:
        o = opts.from_saved(checkpoints.saved_options(step), source=f"checkpoint {path}")
        model = from_pretrained(o.run.model_name_or_path, dtype=dtype, mesh=mesh,
                                trust_remote_code=trust_remote_code,  # QLoRA: the base as it trained
                                quantization=frozen_quantization(o) if o.lora.use_peft else None)
        if o.lora.use_peft:
            lora.apply_lora(model, o.lora.lora_r, o.lora.lora_alpha, lora_targets(o), o.lora.lora_dropout,
                            seed=o.run.seed)
        target = checkpoint.abstract(nnx.state(model, nnx.LoRAParam if o.lora.use_peft else nnx.Param))
        step, params = checkpoints.restore_params(target, step)
    nnx.update(model, params)
    # QLoRA: the adapters folded into the dequantised base, which is what the run trained against
    return (lora.merge(model) if o.lora.use_peft else model), o, step


def evaluate(argv: list[str]) -> dict:
    """`dpo-jax evaluate`: TRL's eval_* metrics of a model (or checkpoint) against a reference on a split.
    For a checkpoint, its run's options (dataset, beta, loss_type, max_length, ...) are the defaults and the
    reference defaults to the run's reference; for a model, the reference defaults to the model itself."""
    flags, argv = opts.split_flags(argv, ("output_json",))
    output_json = flags["output_json"]
    given = opts.parse_values(argv)
    model_path = given.get("model_name_or_path")
    if not model_path:
        raise UserError("evaluate needs --model_name_or_path (a model, or a dpo-jax run / checkpoint)")
    trained = run_options(model_path)
    inherited = {k: v for section in (opts.to_dict(trained) if trained else {}).values() for k, v in section.items()
                 if k not in NOT_INHERITED}
    if given.get("dataset_name", inherited.get("dataset_name")) != inherited.get("dataset_name"):
        inherited = {k: v for k, v in inherited.items() if k not in DATASET_CHOICE}  # the run's split names
    o = with_layout(opts.from_dict({**inherited, **given}))
    mesh = make_mesh(**parse_mesh(o.run.mesh))
    dtype = compute_dtype(o)
    trust = o.run.trust_remote_code
    if trained:
        policy, _, step = load_trained(model_path, mesh, dtype, trust)
        tokenizer = load_tokenizer(trained.run.model_name_or_path, trust_remote_code=trust)
        ref_path = (o.run.ref_model_name_or_path or trained.run.ref_model_name_or_path
                    or trained.run.model_name_or_path)
        print(f"evaluating checkpoint step {step} of {model_path} against {ref_path}", file=sys.stderr)
    else:
        policy = from_pretrained(model_path, dtype=dtype, mesh=mesh, trust_remote_code=trust)
        tokenizer = load_tokenizer(model_path, trust_remote_code=trust)
        ref_path = o.run.ref_model_name_or_path or model_path
    graphdef, params = S.split_reference(policy)
    check_reference_vocab(policy.config, model_path, ref_path, trust)
    # the reference held as in training: quantised by ref_quantization, or by a QLoRA run's load_in_4bit / 8bit
    # (its reference is its quantised base); given on this command line, the same options choose it
    quantization = frozen_quantization(o)
    if quantization:
        print(f"the reference {ref_path} is held quantised: {quant.describe(quantization)}", file=sys.stderr)
    ref_graphdef, ref = S.split_reference(from_pretrained(ref_path, dtype=dtype, mesh=mesh, trust_remote_code=trust,
                                                          quantization=quantization))
    # a run's split counts as named unless it is the default: train refuses a named split that is missing
    asked = ("dataset_test_split" in given
             or inherited.get("dataset_test_split", DEFAULT_TEST_SPLIT) != DEFAULT_TEST_SPLIT)
    pairs = test_pairs(o, tokenizer, asked=asked, trained_on=trained and trained.data)
    pairs.check_vocab(policy.config.vocab_size)
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    batches = make_batches(o, pairs, global_batch_size=o.run.per_device_eval_batch_size * devices,
                           pad_token_id=pad_id(tokenizer), train=False, row_multiple=devices)
    cfg = dataclasses.replace(step_config(o), lora=False)  # adapters are folded in: a plain policy
    evaluate_step = S.compile_eval_step(graphdef, ref_graphdef, cfg, mesh, params, ref)
    metrics = eval_metrics(evaluate_step, params, ref, batches, mesh, cfg)
    metrics = {k: metrics[k] for k in EVAL_KEYS if k in metrics} | {k: v for k, v in metrics.items()
                                                                   if k not in EVAL_KEYS}
    text = json.dumps(metrics, indent=1)
    if output_json:
        out = Path(output_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)
    return metrics


def test_pairs(o: Options, tokenizer, *, asked: bool, trained_on=None) -> Pairs:
    """The pairs of o's dataset_test_split; when the dataset lacks it, has one split and no split was asked
    for (the default, or a run's default inherited), that split, said on stderr. `trained_on`: the run's
    DataConfig, to say when that split is the one it trained on."""
    split = o.data.dataset_test_split
    if not split:
        raise UserError("evaluate needs a split: give --dataset_test_split (e.g. test, or \"train[90%:]\")")
    try:
        return load_pairs(o.data, split, tokenizer)[0]
    except MissingSplit as e:
        if asked or len(e.splits) != 1:
            raise
        only = e.splits[0]
        same = (trained_on is not None and trained_on.dataset_name == o.data.dataset_name
                and trained_on.dataset_train_split == only)
        print(f"dataset {o.data.dataset_name} has one split, {only!r}: evaluating it"
              + (" (the run trained on it: these metrics are not held-out)" if same else ""), file=sys.stderr)
        return load_pairs(o.data, only, tokenizer)[0]


def export(checkpoint_path: str, output_dir: str, mesh_spec: str = "fsdp=-1", trust_remote_code: bool = False) -> str:
    """`dpo-jax export`: a checkpoint to a Hugging Face directory (config, safetensors, tokenizer files, the base
    model's generation_config.json), adapters folded in, parameters in the dtype they were trained in. The
    directory is replaced as a whole; it may not be the base or reference model's, nor the run's checkpoints.
    `trust_remote_code`: this command's consent to the base model's own config / tokenizer code (the run's saved
    option does not count)."""
    import jax.numpy as jnp

    saved, protected = run_options(checkpoint_path), {}
    if saved is not None:  # refused before the model is loaded
        protected = {"the run's checkpoints": str(checkpoint.find(checkpoint_path)[0])}
        if saved.run.ref_model_name_or_path and Path(saved.run.ref_model_name_or_path).exists():
            protected["the reference model"] = saved.run.ref_model_name_or_path
        check_export_target(output_dir, saved.run.model_name_or_path, protected)
    mesh = make_mesh(**parse_mesh(mesh_spec))
    model, o, step = load_trained(checkpoint_path, mesh, jnp.float32, trust_remote_code)
    tokenizer = load_tokenizer(o.run.model_name_or_path, trust_remote_code=trust_remote_code)
    out = export_pretrained(model, output_dir, tokenizer, source=o.run.model_name_or_path, protected=protected)
    print(f"exported step {step} of {checkpoint_path} (base {o.run.model_name_or_path}) to {out}")
    return out
