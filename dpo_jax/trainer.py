"""The training loop: build the run from `Options`, iterate, log, evaluate, checkpoint, resume.

WIP (issue 5): metrics go to `output_dir/metrics.jsonl`; TensorBoard, plots, the progress bar, the summary and
multi-process runs are still to come.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import lora, reference
from . import step as S
from .batching import BatchIterator, load_pairs
from .checkpoint import Checkpoints, abstract
from .data import MissingSplit
from .errors import UserError
from .hf import from_pretrained, load_tokenizer
from .options import Options
from .sharding import make_mesh


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,fsdp=-1,tensor=1" -> {"data": 2, "fsdp": -1, "tensor": 1}."""
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    given = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        if name not in sizes:
            raise UserError(f"mesh: unknown axis {name!r}; the axes are data, fsdp and tensor")
        try:
            given[name] = int(value)
        except ValueError:
            raise UserError(f"mesh: {part!r} needs an integer size, e.g. fsdp=-1") from None
    return {**sizes, **given}


class Trainer:
    def __init__(self, options: Options):
        self.o = o = options
        if not o.run.model_name_or_path or not o.run.output_dir:
            raise UserError("train needs --model_name_or_path and --output_dir")
        self.out = Path(o.run.output_dir)
        self.mesh = make_mesh(**parse_mesh(o.run.mesh))
        batch_devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.global_batch = o.run.per_device_train_batch_size * batch_devices * o.run.gradient_accumulation_steps
        self.tokenizer = load_tokenizer(o.run.model_name_or_path)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.train_pairs, _ = load_pairs(o.data, o.data.dataset_train_split, self.tokenizer)
        self.batches = BatchIterator(self.train_pairs, global_batch_size=self.global_batch, pad_token_id=pad,
                                     seed=o.run.seed, shuffle=o.data.shuffle, num_buckets=o.data.num_length_buckets,
                                     multiple=o.data.pad_to_multiple_of, layout=o.run.pack_pairs,
                                     micro_batches=o.run.gradient_accumulation_steps, row_multiple=batch_devices)
        self.eval_batches = self._eval_batches(pad)
        dtype = jnp.bfloat16 if o.run.bf16 else jnp.float32
        policy = from_pretrained(o.run.model_name_or_path, dtype=dtype, mesh=self.mesh)
        self.train_pairs.check_vocab(policy.config.vocab_size)
        self.cfg = S.StepConfig(loss=o.loss, gradient_accumulation_steps=o.run.gradient_accumulation_steps,
                                gradient_checkpointing=o.run.gradient_checkpointing, lora=o.lora.use_peft,
                                seed=o.run.seed)
        if o.lora.use_peft:
            lora.apply_lora(policy, o.lora.lora_r, o.lora.lora_alpha, o.lora.lora_target_modules or None,
                            o.lora.lora_dropout, seed=o.run.seed)
            self.graphdef, params, self.ref = lora.split_lora(policy, o.run.gradient_checkpointing)
            self.ref_graphdef = None
        else:
            self.graphdef, params = S.split_policy(policy, o.run.gradient_checkpointing)
            ref_model = from_pretrained(o.run.ref_model_name_or_path or o.run.model_name_or_path, dtype=dtype,
                                        mesh=self.mesh)
            self.ref_graphdef, self.ref = S.split_reference(ref_model)
        self.total_steps = self._total_steps()
        self.tx = S.make_optimizer(o.optim, self.total_steps)
        self.state = S.init_state(params, self.tx)
        self.train_step = S.compile_train_step(self.graphdef, self.ref_graphdef, self.cfg, self.tx, self.mesh,
                                               self.state, self.ref)
        self.checkpoints = Checkpoints(self.out / "checkpoints", max_to_keep=o.run.save_total_limit)

    def _eval_batches(self, pad):
        split = self.o.data.dataset_test_split
        if not split:
            return None
        try:
            pairs, _ = load_pairs(self.o.data, split, self.tokenizer)
        except MissingSplit:
            return None
        batch = self.o.run.per_device_eval_batch_size * self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        return BatchIterator(pairs, global_batch_size=batch, pad_token_id=pad, shuffle=False)

    def _total_steps(self) -> int:
        if self.o.run.max_steps > 0:
            return self.o.run.max_steps
        return max(1, math.ceil(self.o.run.num_train_epochs * self.batches.steps_per_epoch))

    def _put(self, batch: dict) -> dict:
        return jax.device_put(batch, S.batch_sharding(self.mesh))

    def evaluate(self) -> dict:
        """TRL's eval_* metrics over the whole test split."""
        if self.eval_batches is None:
            return {}
        evaluate = S.compile_eval_step(self.graphdef, self.ref_graphdef, self.cfg)
        sums = None
        for s in range(self.eval_batches.steps_per_epoch):
            batch = self._put({k: v for k, v in self.eval_batches.batch(0, s).items() if k != "index"})
            out = evaluate(self.state.params, self.ref, batch)
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        return {f"eval_{k}": float(v) for k, v in S.finish_eval(jax.tree.map(float, sums), self.cfg).items()}

    def _options_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self.o), default=str))

    def _resume(self) -> int:
        spec = self.o.run.resume_from_checkpoint
        if not spec:
            return 0
        checkpoints = self.checkpoints if spec.lower() == "true" else Checkpoints(Path(spec).parent)
        step = None if spec.lower() == "true" else int(Path(spec).name)
        step, self.state, position, _ = checkpoints.restore(abstract(self.state), step)
        self.batches.load_state_dict(position)
        return step

    def _save(self, step: int) -> None:
        if step not in self.checkpoints.steps():
            self.checkpoints.save(step, self.state, self.batches.state_dict(), self._options_json())

    def train(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        start = self._resume()
        stop = {"now": False}
        previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))  # preemption: save, then exit
        log = open(self.out / "metrics.jsonl", "a")
        step = start
        try:
            for step in range(start + 1, self.total_steps + 1):
                batch = next(self.batches)
                t0 = time.perf_counter()
                self.state, metrics = self.train_step(self.state, self.ref, self._put(
                    {k: v for k, v in batch.items() if k != "index"}))
                S.check_finite(metrics, self.o.run.max_nonfinite_steps)
                if step % self.o.run.logging_steps == 0 or step == self.total_steps:
                    row = {"step": step, **{k: float(v) for k, v in metrics.items()},
                           "step_time": time.perf_counter() - t0}
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                if self.eval_batches is not None and step % (self.o.run.eval_steps or self.o.run.logging_steps) == 0:
                    log.write(json.dumps({"step": step, **self.evaluate()}) + "\n")
                    log.flush()
                if step % self.o.run.save_steps == 0 or stop["now"]:
                    self._save(step)
                if stop["now"]:
                    self.checkpoints.wait()
                    return {}
            final = self.evaluate()
            if final:
                log.write(json.dumps({"step": step, **final}) + "\n")
            self._save(step)
            self.checkpoints.wait()
            return final
        finally:
            log.close()
            signal.signal(signal.SIGTERM, previous)


def params_numpy(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(state.params)]
