"""The training loop: build the run from `Options`, iterate, log, evaluate, checkpoint, resume.

A run writes to `output_dir`: `metrics.jsonl`, TensorBoard events under `runs/`, `checkpoints/<step>/`
(Orbax: state, data position, options), the reference log-prob cache `ref_logps/` when precomputed, and at the
end `plots.png`. SIGTERM (a TPU VM's preemption) or Ctrl-C stops the run at most one step after the one running
(two with several processes, all after the same step), saves a checkpoint there and exits;
`--resume_from_checkpoint true` continues from the newest readable checkpoint exactly where it stopped.

The loop keeps the devices busy: the feed's thread builds the next batches and starts their copies to the
devices, and step n + 1 is dispatched before step n's metrics are read, the loop's only wait for the devices.
A step whose state the host needs (evaluated, saved, the last, one that may end a run of skipped steps, one
after a stop) is read before the next is dispatched, since dispatching donates it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import signal
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from . import audit, gguf, lora, memory, reference, report, rundir
from . import options as opts
from . import step as S
from .batching import PACKED_EPOCHS, BatchIterator
from . import checkpoint
from .checkpoint import Checkpoints, abstract
from .config import Options, frozen_quantization
from .data import MissingSplit
from .errors import UserError
from .hf import from_pretrained, load_config, load_tokenizer
from .models import quant
from .pairs import load_pairs
from .prefetch import Prefetcher
from .sharding import check_mesh, is_variable, make_mesh, parse_mesh

log = logging.getLogger(__name__)


def use_compilation_cache(directory: str | None) -> Path | None:
    """Point XLA's persistent compilation cache at `directory` ("default": the user cache, shared by runs; None
    or "none": off), so a restarted or repeated run loads its compiled steps instead of compiling them again.
    Entries are keyed by the program, the devices and the versions, so sharing is safe."""
    if directory is None or directory.lower() == "none":
        return None
    path = reference.default_cache_dir().parent / "xla" if directory.lower() == "default" else Path(directory)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def processes() -> dict:
    """This process's place among the run's processes, for BatchIterator."""
    return {"process_index": jax.process_index(), "process_count": jax.process_count()}


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def compute_dtype(o: Options):
    bf16 = o.run.bf16 if o.run.bf16 is not None else jax.default_backend() != "cpu"
    return jnp.bfloat16 if bf16 else jnp.float32


frozen_dtype = memory.frozen_dtype


def hold_frozen(params, dtype):
    """Frozen weights with their matrices (2+ dimensions) in `dtype`: in the compute dtype they give the same
    products as float32 ones, since every layer casts its weights to the compute dtype when it uses them, at
    half the memory in bfloat16. Vectors (norm scales, biases) stay as loaded: they are small, and some are used
    in float32 maths (Gemma's norms). A fresh copy either way (the policy's buffers are donated to its state)."""
    def hold(variable):
        x = variable.get_value()
        cast = memory.held_in_frozen_dtype(variable) and x.dtype != dtype
        return variable.replace(x.astype(dtype) if cast else jnp.copy(x))
    return jax.tree.map(hold, params, is_leaf=is_variable)


def step_config(o: Options) -> S.StepConfig:
    return S.StepConfig(loss=o.loss, gradient_accumulation_steps=o.run.gradient_accumulation_steps,
                        gradient_checkpointing=o.run.gradient_checkpointing, lora=o.lora.use_peft, seed=o.run.seed,
                        attn_implementation=o.run.attn_implementation)


def with_layout(o: Options) -> Options:
    """`o` with a layout its truncation allows: keep_end can cut a pair's two prompts differently, so it needs
    chosen and rejected in rows of their own (`pairs`)."""
    if o.data.truncation_mode == "keep_end" and o.run.pack_pairs != "pairs":
        log.warning("truncation_mode keep_end: pack_pairs %s needs keep_start; using pack_pairs pairs",
                    o.run.pack_pairs)
        return dataclasses.replace(o, run=dataclasses.replace(o.run, pack_pairs="pairs"))
    return o


lora_targets = memory.lora_targets


# options that belong to one launch, not to the run: never "changed" on resume
PER_LAUNCH = ("resume_from_checkpoint", "coordinator_address", "num_processes", "process_id", "distributed",
              "compilation_cache_dir", "memory_limit_gb", "trust_remote_code")


class Models(NamedTuple):
    """The policy split for the step, and its reference. With LoRA, `params` are the adapters, `ref` is
    (dropout keys, base weights) and `ref_graphdef` is None: the base model is not held twice."""

    config: Any  # the policy's model config
    graphdef: Any
    params: Any
    ref_graphdef: Any
    ref: Any
    ref_config: Any


def check_reference_vocab(policy_config, model_path: str, ref_path: str, trust_remote_code: bool = False) -> None:
    """A reference with another vocabulary scores other tokens (and ids past its end come out NaN): refuse it
    before its weights are read."""
    ref_vocab = load_config(ref_path, trust_remote_code=trust_remote_code).vocab_size
    if ref_vocab != policy_config.vocab_size:
        raise UserError(f"the reference {ref_path} has a vocabulary of {ref_vocab} tokens, the model {model_path} "
                        f"one of {policy_config.vocab_size}: the reference must share the model's tokenizer "
                        f"(usually it is the model before training). Give a matching ref_model_name_or_path, or "
                        f"leave it out to use the model itself.")


def build_models(o: Options, mesh, dtype) -> Models:
    """The policy and its reference. QLoRA (use_peft with load_in_4bit / load_in_8bit): the base is quantised as it
    is loaded and is the reference too. A full fine-tune's reference with ref_quantization: the policy's weights
    quantised kernel by kernel (or the other reference model's, as it is loaded)."""
    kind = frozen_quantization(o)
    if o.lora.use_peft and o.run.ref_model_name_or_path:
        raise UserError("use_peft trains adapters against their own base model, so ref_model_name_or_path "
                        "is not used with it; drop one of the two (as TRL)")
    policy = from_pretrained(o.run.model_name_or_path, dtype=dtype, mesh=mesh,
                             trust_remote_code=o.run.trust_remote_code,
                             quantization=kind if o.lora.use_peft else None)
    if o.lora.use_peft:
        lora.apply_lora(policy, o.lora.lora_r, o.lora.lora_alpha, lora_targets(o),
                        o.lora.lora_dropout, seed=o.run.seed)
        graphdef, params, (keys, base) = lora.split_lora(policy, o.run.gradient_checkpointing)
        return Models(policy.config, graphdef, params, None, (keys, hold_frozen(base, frozen_dtype(o, dtype))),
                      policy.config)
    ref_path = o.run.ref_model_name_or_path
    if not ref_path or ref_path == o.run.model_name_or_path:  # the usual case: a copy, not a second load
        # (quantised: a second module tree over the policy's arrays, whose kernels are then replaced by codes;
        # gguf: the file's blocks, read again)
        if kind == quant.GGUF:
            ref_model = from_pretrained(o.run.model_name_or_path, dtype=dtype, mesh=mesh, quantization=kind,
                                        trust_remote_code=o.run.trust_remote_code)
        else:
            ref_model = policy if kind is None else quant.quantize_linears(nnx.merge(*nnx.split(policy)), kind)
        ref_graphdef, ref = S.split_reference(ref_model, o.run.gradient_checkpointing)
        ref, ref_config = hold_frozen(ref, frozen_dtype(o, dtype)), policy.config
    else:
        check_reference_vocab(policy.config, o.run.model_name_or_path, ref_path, o.run.trust_remote_code)
        ref_model = from_pretrained(ref_path, dtype=dtype, mesh=mesh, trust_remote_code=o.run.trust_remote_code,
                                    quantization=kind)
        (ref_graphdef, ref), ref_config = S.split_reference(ref_model, o.run.gradient_checkpointing), ref_model.config
        ref = hold_frozen(ref, frozen_dtype(o, dtype))
    graphdef, params = S.split_policy(policy, o.run.gradient_checkpointing)
    return Models(policy.config, graphdef, params, ref_graphdef, ref, ref_config)


def eval_metrics(evaluate, params, ref, batches: BatchIterator, mesh, cfg: S.StepConfig) -> dict:
    """TRL's eval_* metrics over every pair of `batches` (one ordered epoch). The batches are built and put on
    the devices ahead in a thread, the sums added on the devices and read once, at the end."""
    sums = None
    feed = Prefetcher(batches, put=functools.partial(device_batch, mesh=mesh), epoch=0)
    try:
        for _, arrays in feed:
            out = evaluate(params, ref, arrays)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    finally:
        feed.close()
    sums = jax.tree.map(float, jax.device_get(sums))
    return {f"eval_{k}": float(v) for k, v in S.finish_eval(sums, cfg).items()}


def make_batches(o: Options, pairs, *, global_batch_size: int, pad_token_id: int, train: bool,
                 row_multiple: int) -> BatchIterator:
    """The run's batches of `pairs`: training's (shuffled, in micro-batches) or evaluation's (in order), both
    in the run's layout and with its length-bucket policy (num_length_buckets, pad_to_multiple_of)."""
    return BatchIterator(pairs, global_batch_size=global_batch_size, pad_token_id=pad_token_id, seed=o.run.seed,
                         shuffle=train and o.data.shuffle, num_buckets=o.data.num_length_buckets,
                         multiple=o.data.pad_to_multiple_of, layout=o.run.pack_pairs,
                         micro_batches=o.run.gradient_accumulation_steps if train else 1,
                         row_multiple=row_multiple, **processes())


def _arrays(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "index"}


def device_batch(batch: dict, mesh) -> dict:
    """The step's arguments from a host batch, split over the mesh (the copies run asynchronously)."""
    return S.put_batch(_arrays(batch), mesh)


def batch_shape(arrays: dict) -> tuple:
    """The key of a step's compilation: its arrays' names and shapes."""
    return tuple(sorted((k, tuple(v.shape)) for k, v in arrays.items()))


def batch_tokens(batch: dict) -> int:
    """Real (non-padding) tokens the model reads for this batch."""
    return int((batch["segment"] >= 0).sum())


class Trainer:
    def __init__(self, options: Options, test_split_asked: bool | None = None):
        """`test_split_asked`: whether the user named dataset_test_split (command line or YAML), so that its
        absence is an error; None (not known): when it differs from the default."""
        if not options.run.model_name_or_path or not options.run.output_dir:
            raise UserError("train needs --model_name_or_path and --output_dir")
        report.validate(options.run.report_to)
        # before loading anything: a directory that cannot be written, or that another run is writing, is refused
        # now; the lock is held until train() ends (only process 0's: all of them share output_dir)
        self.claim = rundir.claim(options.run.output_dir, enabled=jax.process_index() == 0)
        try:
            self._build(options, test_split_asked)
        except BaseException:
            self.claim.release()
            raise

    def _build(self, options: Options, test_split_asked: bool | None) -> None:
        resume = (options.run.resume_from_checkpoint or "false").lower() != "false"
        out = Path(options.run.output_dir)
        # resuming: checkpoints are continued; a metrics.jsonl with no checkpoint is set aside when training
        # starts from step 0 (`_keep_earlier_metrics`)
        old = None if resume else rundir.earlier_run(out)
        if old == "checkpoints":
            raise UserError(f"{out} already holds checkpoints of a run: continue it with --resume_from_checkpoint "
                            f"true, or give another output_dir (or delete {out / old})")
        if old:  # a finished run's work is never overwritten, even without checkpoints
            raise UserError(f"{out} already holds the {old} of an earlier run (which saved no checkpoint to "
                            f"continue): give another output_dir, or delete {out / old} to start again there")
        local = {k: str(Path(v).absolute()) for k in ("model_name_or_path", "ref_model_name_or_path")
                 if (v := getattr(options.run, k)) and Path(v).exists()}  # checkpoints name the models absolutely
        data = options.data
        if data.dataset_name and Path(data.dataset_name).exists():
            data = dataclasses.replace(data, dataset_name=str(Path(data.dataset_name).absolute()))
        self.o = o = with_layout(dataclasses.replace(options, run=dataclasses.replace(options.run, **local), data=data))
        self.out = Path(o.run.output_dir)
        self.test_split_asked = test_split_asked
        use_compilation_cache(o.run.compilation_cache_dir)
        self.main = jax.process_index() == 0
        self.mesh = make_mesh(**parse_mesh(o.run.mesh))
        config = load_config(o.run.model_name_or_path, trust_remote_code=o.run.trust_remote_code)
        check_mesh(self.mesh, config, per_device_batch=o.run.per_device_train_batch_size)
        batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.global_batch = o.run.per_device_train_batch_size * batch_devices * o.run.gradient_accumulation_steps
        self.tokenizer = load_tokenizer(o.run.model_name_or_path, trust_remote_code=o.run.trust_remote_code)
        pad = pad_id(self.tokenizer)
        self.train_pairs, self.batches, self.eval_pairs, self.eval_batches = self._data(batch_devices)
        self.dtype = compute_dtype(o)
        self.total_steps = self._total_steps()
        self.schedule = S.make_schedule(o.optim, self.total_steps)
        self.tx = S.make_optimizer(o.optim, self.total_steps)
        # the compiler's account of the step for the run's largest batch, before any weight is loaded; jax.jit
        # keeps that compilation for the steps of that shape
        planned = self.plan_memory(config, *self._largest_batch())
        self.o = o = dataclasses.replace(o, run=dataclasses.replace(o.run, gradient_checkpointing=planned.remat))
        models = build_models(o, self.mesh, self.dtype)
        gguf.release()  # the models and the tokenizer are read: a GGUF file's parse is not needed again
        self.graphdef, params, self.ref_graphdef, self.ref = models.graphdef, models.params, models.ref_graphdef, models.ref
        for pairs in filter(None, (self.train_pairs, self.eval_pairs)):
            pairs.check_vocab(models.config.vocab_size)
        self.cfg = step_config(o)
        self.timings: dict[str, float] = {}
        if o.run.precompute_ref_log_probs:
            start = time.perf_counter()
            self._precompute(params, models.ref_config, pad)
            self.timings["precompute"] = time.perf_counter() - start
        self.state = S.init_state(params, self.tx, donate=True)
        del params, models
        self.compiled_shapes: set = set()  # train step shapes (batch_shape) compiled so far
        if _placed_alike((self.state, self.ref), (planned.run.state, planned.run.ref)):
            self.train_step = planned.fn
            self.compiled_shapes.add(batch_shape(planned.run.batch))
        else:  # the checkpoint differs from its config (an untied head): the step of what was loaded
            self.train_step = S.compile_train_step(self.graphdef, self.ref_graphdef, self.cfg, self.tx, self.mesh,
                                                   self.state, self.ref)
        self.jitted_step = self.train_step  # (train_step may be wrapped, by tests and the benchmark)
        self.eval_step = S.compile_eval_step(self.graphdef, self.ref_graphdef, self.cfg, self.mesh,
                                             self.state.params, self.ref)
        self.on_step = None  # called as on_step(step, batch, start, end) after each step (dpo-jax bench)
        memory.release_freed_host_memory()

    def compile_ahead(self, start: int) -> None:
        """Compile the train step for every batch shape of steps start+1 .. total_steps now, so that no step of
        the run waits for a compile (jax.jit keeps each compilation for the arrays of its shape). The shapes
        come from the batch order without building any batch; the memory plan's shape is compiled already."""
        b, o = self.batches, self.o
        shapes = {b.rows_and_length(*divmod(s, b.steps_per_epoch)) for s in range(start, self.total_steps)}
        placed = S.batch_sharding(self.mesh)
        begin = time.perf_counter()
        compiled = 0
        for rows, length in sorted(shapes, key=lambda shape: shape[0] * shape[1]):
            batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=placed) for k, (shape, dtype) in
                     memory.batch_shapes(o.run.pack_pairs, self.global_batch, length, rows,
                                         ref_logps=o.run.precompute_ref_log_probs).items()}
            key = batch_shape(batch)
            if key not in self.compiled_shapes:
                self.jitted_step.lower(self.state, self.ref, batch).compile()
                self.compiled_shapes.add(key)
                compiled += 1
        memory.release_freed_host_memory()
        if self.main and compiled:
            print(f"dpo-jax: compiled the train step for {compiled} more batch shape{'s' * (compiled > 1)} "
                  f"({len(shapes)} in the run) in {time.perf_counter() - begin:.1f} s", flush=True)

    def _largest_batch(self) -> tuple[int, int | None]:
        """(row length, packed rows) of the largest batch among the run's first steps (up to the packed
        layout's planning epochs): the most attention (rows x length^2), then the most tokens. A shape training
        uses, so the memory check's compilation is not an extra one."""
        b = self.batches
        steps = min(self.total_steps, PACKED_EPOCHS * b.steps_per_epoch)
        shapes = {b.rows_and_length(*divmod(i, b.steps_per_epoch)) for i in range(steps)}
        rows, length = max(shapes, key=lambda shape: (shape[0] * shape[1] ** 2, shape[0] * shape[1]))
        return length, rows if self.o.run.pack_pairs == "packed" else None

    def plan_memory(self, config, length: int, rows: int | None = None) -> memory.Step:
        """The train step compiled for the run's largest batch (rows of `length` tokens; packed: `rows` rows) from
        the configs alone, its per-device memory printed; a run that does not fit in a device's memory is
        refused before any weight is loaded. gradient_checkpointing None: on only when memory needs it."""
        o = self.o
        ref_config = None
        if not o.run.precompute_ref_log_probs and not o.lora.use_peft:  # the step gets a live reference
            ref_path = o.run.ref_model_name_or_path
            ref_config = config if not ref_path or ref_path == o.run.model_name_or_path else \
                load_config(ref_path, trust_remote_code=o.run.trust_remote_code)
            if ref_config is not config:
                check_reference_vocab(config, o.run.model_name_or_path, ref_path, o.run.trust_remote_code)
        limit, source = memory.device_memory(o.run.memory_limit_gb)
        compile_with = functools.partial(memory.compile_step, o, config, ref_config, self.mesh, self.dtype, self.tx,
                                         length=length, rows=rows)
        try:
            planned = memory.fitting_step(compile_with, o.run.gradient_checkpointing, limit)
        except memory.OutOfMemory as e:  # an accelerator's compiler refuses what its device cannot hold
            raise memory.refuse_out_of_memory(e, o, self.mesh) from None
        if self.main:
            print(planned.usage.table(limit, source), flush=True)
        memory.check(planned, limit, o, self.mesh)
        return planned

    def _data(self, batch_devices: int) -> tuple:
        """(train pairs, their batches, test pairs, their batches or None), audited before the model is loaded:
        process 0 prints the audit and writes data_audit.json; a failed audit_fail_on check stops every process."""
        o, tokenizer, row_multiple = self.o, self.tokenizer, batch_devices // jax.process_count()
        splits = {"train": (*load_pairs(o.data, o.data.dataset_train_split, tokenizer), self.global_batch, True)}
        if (test := self._eval_pairs()) is not None:
            splits["test"] = (*test, o.run.per_device_eval_batch_size * batch_devices, False)
        reports, batches = {}, {}
        for name, (pairs, rows, size, train) in splits.items():
            batches[name], reports[name] = audit.batched(pairs, rows, tokenizer, functools.partial(
                make_batches, o, global_batch_size=size, pad_token_id=pad_id(tokenizer), train=train,
                row_multiple=row_multiple))
        audit.conclude(reports, o.data.audit_fail_on, o.run.output_dir if self.main else None,
                       say=functools.partial(print, flush=True) if self.main else None)
        test = splits.get("test")
        return splits["train"][0], batches["train"], test and test[0], batches.get("test")

    def _eval_pairs(self):
        """(Pairs, Split) of the test split, or None. A dataset without the test split asked for is an error
        when the user named the split, else a warning: training does not evaluate on its own training pairs."""
        split = self.o.data.dataset_test_split
        if not split:
            return None
        try:
            return load_pairs(self.o.data, split, self.tokenizer)
        except MissingSplit as e:
            asked = self.test_split_asked
            if asked or (asked is None and split != type(self.o.data)().dataset_test_split):
                raise  # asked for by name: its absence is the user's error
            if len(e.splits) == 1:
                log.warning("%s has one split, %r, and no %r split: no evaluation (for a held-out split give "
                            "--dataset_train_split \"%s[:90%%]\" --dataset_test_split \"%s[90%%:]\")",
                            self.o.data.dataset_name, e.splits[0], split, e.splits[0], e.splits[0])
            else:
                log.warning("no %r split in %s: no evaluation (give --dataset_test_split, e.g. \"train[90%%:]\")",
                            split, self.o.data.dataset_name)
            return None

    def _precompute(self, params, ref_config, pad: int) -> None:
        """Reference log-probs of the train and test pairs, computed once (or read from the cache), attached to
        the batches; without LoRA the reference model is then dropped from memory."""
        batch = self.o.run.per_device_eval_batch_size * self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        ref_graphdef = self.ref_graphdef or self.graphdef
        ref = self.ref if self.ref_graphdef else (jax.tree.map(jnp.zeros_like, params), *self.ref)
        dirs = [self.out / "ref_logps", reference.default_cache_dir()]
        for pairs, batches in ((self.train_pairs, self.batches), (self.eval_pairs, self.eval_batches)):
            if pairs:
                key = reference.cache_key(ref, ref_config, pairs, self.dtype, self.o.run.pack_pairs)
                batches.ref_logps = reference.precompute(ref_graphdef, ref, pairs, batch_size=batch, pad_token_id=pad,
                                                         cache_dirs=dirs, key=key, mesh=self.mesh,
                                                         layout=self.o.run.pack_pairs,
                                                         attn_implementation=self.o.run.attn_implementation)
        if self.ref_graphdef:
            self.ref_graphdef, self.ref = None, None

    def _total_steps(self) -> int:
        if self.o.run.max_steps > 0:
            return self.o.run.max_steps
        return max(1, math.ceil(self.o.run.num_train_epochs * self.batches.steps_per_epoch))

    def evaluate(self) -> dict:
        if not self.eval_batches:
            return {}
        return eval_metrics(self.eval_step, self.state.params, self.ref, self.eval_batches, self.mesh, self.cfg)

    def _resume(self) -> int:
        """The step to start after: 0, or the restored checkpoint's. `true` with no checkpoint yet starts
        afresh, so a preemptible job can always be launched with it."""
        spec = self.o.run.resume_from_checkpoint
        if not spec or spec.lower() == "false":
            return 0
        if spec.lower() == "true":
            if not self.checkpoints.steps():
                log.warning("--resume_from_checkpoint true: no checkpoint in %s yet; starting from step 0",
                            self.checkpoints.directory)
                return 0
            checkpoints, step = self.checkpoints, None
        else:
            found = checkpoint.find(spec)
            if found is None:
                raise UserError(f"--resume_from_checkpoint {spec}: not a checkpoint (give a run's output_dir, its "
                                f"checkpoints/<step> directory, or true for the newest in output_dir)")
            own = found[0].resolve() == self.checkpoints.directory.resolve()
            if not own and self.checkpoints.steps():
                raise UserError(f"--resume_from_checkpoint {spec} is another run's, and {self.out} holds checkpoints "
                                f"of its own; continue into an empty output_dir (or the run's own)")
            checkpoints, step = (self.checkpoints if own else Checkpoints(found[0], create=False)), found[1]
        try:  # damaged checkpoints are moved aside in restore; newer intact ones of our own, below
            step, self.state, position, saved = checkpoints.restore(abstract(self.state), step)
        finally:
            if checkpoints is not self.checkpoints:
                checkpoints.close()
        self.batches.load_state_dict(position)
        if step > self.total_steps:
            raise UserError(f"the checkpoint is at step {step}, past this run's {self.total_steps} steps; raise "
                            f"max_steps (or num_train_epochs) to continue it")
        self.checkpoints.set_aside_after(step)  # resumed from an earlier step: the later ones are another history
        now = opts.to_dict(self.o)
        changed = [f"{name} ({saved[s][name]!r} -> {value!r})" for s, section in now.items()
                   for name, value in section.items() if name not in PER_LAUNCH
                   and saved.get(s, {}).get(name, value) != value]
        if changed:
            log.warning("resuming with options changed since the checkpoint: %s", ", ".join(changed))
        return step

    def train(self) -> dict:
        """Train to `total_steps` (`finished`), or until SIGTERM / Ctrl-C (`stopped_by`), evaluating
        and checkpointing on the way; returns the final evaluation (empty without a test split, or when
        stopped early). Raises UserError, after saving the last good state, when max_nonfinite_steps steps
        in a row were skipped. Releases output_dir's lock however it ends."""
        try:
            return self._train()
        finally:
            self.claim.release()

    def _train(self) -> dict:
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoints = Checkpoints(self.out / "checkpoints", max_to_keep=self.o.run.save_total_limit)
        try:
            start = self._resume()
            if start == 0 and self.main:
                self._keep_earlier_metrics()
            reporter = report.Reporter(self.out, self.o.run.report_to, start_step=start, enabled=self.main,
                                       run_name=self.out.name, config=opts.to_dict(self.o))
        except BaseException:
            self.checkpoints.close()
            raise
        self.stopped_by, self.finished = None, False
        # read once, before the loop: whether the first step could end a run of max_nonfinite_steps
        run = Progress(done=start, nonfinite_run=int(jax.device_get(self.state.nonfinite_run)))
        handlers = {}

        def on_signal(number, _):  # finish the step, save, exit; a second signal acts as usual
            self.stopped_by = number
            signal.signal(number, handlers[number])
        for sig in (signal.SIGTERM, signal.SIGINT):
            handlers[sig] = signal.signal(sig, on_signal)
        bar = report.progress(self.total_steps, start, self.main)
        say = bar.write if self.main else (lambda _: None)
        self.first_eval = {}
        feed = Prefetcher(self.batches, put=functools.partial(device_batch, mesh=self.mesh))
        try:
            self.compile_ahead(start)
            if self.o.run.eval_on_start and start == 0 and self.eval_batches:
                self.first_eval = self.evaluate()
                reporter.log(0, self.first_eval)
            self.schedule(start + 1)  # compiles its eager ops now, not inside a step's time (bench counts them)
            behind = None  # the step dispatched before, its metrics not read yet
            for step in range(start + 1, self.total_steps + 1):
                tick = time.perf_counter()
                batch, arrays = next(feed)  # built and on its way to the devices in the feed's thread
                shape = batch_shape(arrays)
                if behind is not None and shape not in self.compiled_shapes:  # it compiles: not within the step
                    if self._finish(behind, run, bar, say, reporter, latest=True):  # before's time
                        break
                    behind = None
                self.compiled_shapes.add(shape)
                self.state, metrics = self.train_step(self.state, self.ref, arrays)  # donates the state
                logged = step % self.o.run.logging_steps == 0 or step == self.total_steps
                current = Dispatched(step, batch, metrics, self.schedule(step) if logged else None,
                                     feed.state_dict(), tick)
                if behind is not None:  # read while the devices run `step`
                    self._finish(behind, run, bar, say, reporter, latest=False)
                behind = current
                if run.stop or self._needs_state(step, run):
                    behind = None
                    if self._finish(current, run, bar, say, reporter, latest=True):
                        break
            self.finished = run.done == self.total_steps
            if self.finished and run.done > start:
                run.final = self.evaluate()
                if run.final:
                    reporter.log(run.done, run.final)
        finally:
            feed.close()
            bar.close()
            reporter.close()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            self.checkpoints.close()  # a save in flight completes (or its failure is reported), whatever happened
        saving = self.o.run.save_strategy != "no"
        if self.main and self.finished:
            if run.done == start:
                print(f"dpo-jax: the run in {self.out} had already finished ({start} steps)")
                return run.final
            written = ["metrics.jsonl"] + (["checkpoints/"] if saving else [])
            if reporter.tb is not None:
                written.append("runs/ (TensorBoard: tensorboard --logdir " + str(self.out / "runs") + ")")
            if reporter.wandb is not None:
                written.append(f"W&B run {reporter.wandb_where}")
            report.plot(self.out / "metrics.jsonl", self.out / "plots.png")
            written.append("plots.png")
            print(report.summary(final=run.final, train=run.last, steps=run.done - start, tokens=run.tokens,
                                 seconds=run.seconds, out=self.out, written=written, skipped=run.skipped))
        return run.final

    def _needs_state(self, step: int, run: Progress) -> bool:
        """Whether `step` must be read before the next is dispatched (which donates the state after `step`): it
        is the last, evaluated or saved, or it may end a run of max_nonfinite_steps skipped steps (whose last
        good state is saved)."""
        r = self.o.run
        return (step == self.total_steps or (r.save_strategy != "no" and step % r.save_steps == 0)
                or bool(self.eval_batches and step % (r.eval_steps or r.logging_steps) == 0)
                or run.nonfinite_run + 1 >= r.max_nonfinite_steps)

    def _finish(self, d: Dispatched, run: Progress, bar, say, reporter, *, latest: bool) -> bool:
        """Read step `d`'s metrics (the loop's wait for the devices) and act on them: its time, tokens, progress
        bar and on_step; the skipped-step message; the log line; the stop the processes agreed on. A step's
        time ends when its metrics come back and starts when the step before's did (the devices ran it in
        between), or when its batch was taken if that is later (after an evaluation or a save, not timed).
        With `latest` (no step dispatched after `d`: the state is the one after it) also what needs that state:
        stop after max_nonfinite_steps skipped in a row, saving the last good state; evaluate at eval_steps;
        checkpoint at save_steps, at the end and when stopping. True when the loop stops here."""
        o = self.o.run
        several = jax.process_count() > 1
        metrics = _agree_on_stop(d.metrics, self.stopped_by, self.mesh) if several else d.metrics
        metrics, learning_rate = jax.device_get((metrics, d.learning_rate))  # waits for the step
        now = time.perf_counter()
        metrics = {k: float(v) for k, v in metrics.items()}
        # with several processes decided by all together (from the step's metrics): a signal seen by some hosts
        # stops all of them after the same step
        signal_number = (int(metrics.pop("stop")) or None) if several else self.stopped_by
        run.stop = run.stop or signal_number
        begin = max(run.end, d.tick)  # pipelined: the step before ended (its metrics came back) after d's dispatch
        n = batch_tokens(d.batch) * jax.process_count()  # each process holds its share of the rows
        run.tokens, run.seconds, run.end, run.done = run.tokens + n, run.seconds + now - begin, now, d.step
        if self.on_step is not None:
            self.on_step(d.step, d.batch, begin, now)
        bar.update(1)
        bar.set_postfix(report.postfix(metrics, n / (now - begin)), refresh=False)
        if not metrics.pop("applied"):
            run.skipped += 1
            say(f"step {d.step}: loss, gradients or update not finite; the update was skipped")
        run.nonfinite_run = int(metrics.pop("nonfinite_run"))
        stuck = run.nonfinite_run >= o.max_nonfinite_steps
        if learning_rate is not None or stuck:
            # learning_rate as TRL logs it: the schedule's value after this step's update
            rate = float(self.schedule(d.step) if learning_rate is None else learning_rate)
            run.last = {**metrics, "learning_rate": rate, "epoch": d.step / self.batches.steps_per_epoch,
                        "tokens_per_second": n / (now - begin)}
            reporter.log(d.step, run.last)
        if not latest:
            assert not stuck, "a step that may end a run of skipped steps is read before the next is dispatched"
            return False
        if stuck:  # the skipped steps left the state as it was: save that, then stop
            S.check_finite(run.nonfinite_run, o.max_nonfinite_steps, self._save_last_good(d.step, d.position))
        last = d.step == self.total_steps
        if self.eval_batches and d.step % (o.eval_steps or o.logging_steps) == 0 and not last and not run.stop:
            reporter.log(d.step, self.evaluate())
        saving = o.save_strategy != "no"
        if saving and (d.step % o.save_steps == 0 or last or run.stop):
            # Orbax copies the arrays to the host before save() returns (the files are written in the
            # background), so the next dispatch may donate them
            self.checkpoints.save(d.step, self.state, d.position, opts.to_dict(self.o))
        if run.stop and not last:
            self.stopped_by = run.stop
            say(f"stopped by signal {run.stop} after step {d.step}; " + (
                "checkpoint saved: continue with --resume_from_checkpoint true" if saving
                else "no checkpoint (save_strategy no)"))
            return True
        return False

    def _keep_earlier_metrics(self) -> None:
        """A resumed run with no checkpoint to resume starts from step 0: an earlier run's metrics.jsonl (one with
        save_strategy no, or stopped before its first save) is renamed, not replaced."""
        if rundir.earlier_run(self.out) != "metrics.jsonl":
            return
        kept = self.out / f"metrics.before-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        (self.out / "metrics.jsonl").rename(kept)
        log.warning("%s holds no checkpoint to resume, so this run starts from step 0; the earlier run's "
                    "metrics.jsonl is kept as %s", self.out, kept.name)

    def _save_last_good(self, step: int, position: dict) -> Path | None:
        """Checkpoint the state (unchanged by the skipped steps) at `step`, with its count of skipped steps in a
        row reset so that a resumed run gets max_nonfinite_steps tries again; its path, or None with
        save_strategy no."""
        if self.o.run.save_strategy == "no":
            return None
        state = self.state._replace(nonfinite_run=self.state.nonfinite_run * 0)
        self.checkpoints.save(step, state, position, opts.to_dict(self.o))
        self.checkpoints.wait()
        return self.checkpoints.directory / str(step)


class Dispatched(NamedTuple):
    """A train step handed to the devices, its metrics not read yet."""

    step: int
    batch: dict  # its host batch (tokens counted, on_step)
    metrics: dict  # on the devices
    learning_rate: Any  # the schedule's value at `step` (on the devices) where the step is logged, else None
    position: dict  # the data position after its batch: what a checkpoint of the state after it records
    tick: float  # perf_counter() when its batch was taken: its time starts no earlier


@dataclasses.dataclass
class Progress:
    """What the loop has read back from the steps so far."""

    done: int  # the last step whose metrics were read
    nonfinite_run: int  # skipped steps in a row after it
    end: float = 0.0  # perf_counter() when they were read
    tokens: int = 0
    seconds: float = 0.0
    skipped: int = 0
    stop: int | None = None  # the signal that stops the run, once the processes agreed on it
    last: dict = dataclasses.field(default_factory=dict)  # the last train metrics logged
    final: dict = dataclasses.field(default_factory=dict)  # the final evaluation


@jax.jit
def _fold_stop(metrics: dict, signals_N: jax.Array) -> dict:
    return {**metrics, "stop": jnp.max(signals_N)}


def _agree_on_stop(metrics: dict, signal_number: int | None, mesh) -> dict:
    """A step's `metrics` (on the devices) with "stop": the largest signal number any process had received when
    it called this. The maximum is taken on the devices, after the step (it reads the step's outputs), so the
    processes learn it when they read the metrics, which they do anyway: no synchronisation of its own."""
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names))  # one number per device
    mine = np.full((1,), signal_number or 0, np.int32)
    signals_N = jax.make_array_from_single_device_arrays(
        (mesh.size,), sharding, [jax.device_put(mine, device) for device in sharding.addressable_devices])
    return _fold_stop(metrics, signals_N)


def _placed_alike(tree, abstract) -> bool:
    """Whether arrays `tree` have the structure, shapes, dtypes and shardings of `abstract` (ShapeDtypeStructs)."""
    leaves, structure = jax.tree.flatten(tree)
    planned, planned_structure = jax.tree.flatten(abstract)
    return structure == planned_structure and all(
        (x.shape, x.dtype) == (p.shape, p.dtype) and x.sharding.is_equivalent_to(p.sharding, x.ndim)
        for x, p in zip(leaves, planned))


def params_numpy(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]
