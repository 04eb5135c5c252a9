"""Orbax checkpoints of a run: the training state (policy parameters, optimizer state, step and counters), the
data position, and the run's options, saved asynchronously every `save_steps` and keeping `save_total_limit`.

Restoring goes straight into the shardings of an abstract target (`jax.ShapeDtypeStruct`s with shardings),
so a checkpoint saved on one mesh loads onto another. A latest checkpoint that cannot be read (a partial
copy, a truncated file) is skipped with a warning and the previous good one is used.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from .errors import UserError

log = logging.getLogger(__name__)


class Checkpoints:
    """`output_dir/checkpoints/<step>/{state, data, options}`."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = None, asynchronous: bool = True,
                 create: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=asynchronous,
                                               create=create)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state, data_position: dict, options: dict) -> None:
        """Start saving (returns while the files are written; `wait` blocks until they are)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_position),
            options=ocp.args.JsonSave(options)), force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state, step: int | None = None):
        """(step, state, data position, options) of `step`, or of the newest checkpoint that reads back whole.
        `abstract_state` is the state's tree of jax.ShapeDtypeStruct with the target shardings."""
        steps = [step] if step is not None else self.steps()[::-1]
        if not steps:
            raise UserError(f"no checkpoint in {self.directory} to resume from")
        error = None
        for s in steps:
            try:
                restored = self.manager.restore(s, args=ocp.args.Composite(
                    state=_restore_args(abstract_state), data=ocp.args.JsonRestore(), options=ocp.args.JsonRestore()))
            except Exception as e:  # a partial or damaged checkpoint: fall back to the one before
                if step is not None:
                    raise UserError(f"checkpoint {s} in {self.directory} cannot be read ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0][:200]})") from e
                log.warning("checkpoint %s in %s cannot be read (%s); trying the one before", s, self.directory,
                            type(e).__name__)
                error = e
                continue
            return s, restored["state"], dict(restored["data"]), dict(restored["options"])
        raise UserError(f"none of the checkpoints in {self.directory} ({', '.join(map(str, steps))}) can be read; "
                        f"the last error: {type(error).__name__}: {str(error).splitlines()[0][:300]} (a changed "
                        f"model or LoRA option also makes the saved state not fit)")

    def restore_params(self, abstract_params, step: int) -> object:
        """Only the policy parameters of `step` (no optimizer state is read): for evaluation and export."""
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=_restore_args({"params": abstract_params}, partial=True)))
        except Exception as e:
            raise UserError(f"checkpoint {step} in {self.directory} cannot be read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from e
        return restored["state"]["params"]

    def delete_after(self, step: int) -> None:
        """Remove the checkpoints newer than `step`: a run resumed from `step` writes its own."""
        for s in self.steps():
            if s > step:
                self.manager.delete(s)

    def saved_options(self, step: int | None = None) -> dict:
        """The run's options stored with `step` (default: the newest checkpoint whose options read back)."""
        for s in ([step] if step is not None else self.steps()[::-1]):
            try:
                return dict(self.manager.restore(s, args=ocp.args.Composite(options=ocp.args.JsonRestore()))["options"])
            except Exception as e:
                if step is not None:
                    raise UserError(f"checkpoint {s} in {self.directory} cannot be read ({type(e).__name__})") from e
                log.warning("checkpoint %s in %s cannot be read (%s); trying the one before", s, self.directory,
                            type(e).__name__)
        raise UserError(f"no readable checkpoint in {self.directory}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _restore_args(target, partial: bool = False):
    return ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=partial)


def find(path: str | Path) -> tuple[Path, int | None] | None:
    """(checkpoints directory, step or None for the newest) that `path` names: a run's output_dir, its
    `checkpoints/` directory, or one `checkpoints/<step>` directory. None when it is not one of ours."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if p.name.isdigit() and (p / "options").is_dir():
        return p.parent, int(p.name)
    if p.is_dir() and any(c.name.isdigit() and (c / "options").is_dir() for c in p.iterdir()):
        return p, None
    return None


def abstract(tree):
    """The ShapeDtypeStructs (with shardings) of a tree of arrays, as a restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
