"""Orbax checkpoints of a run: the training state (policy parameters, optimizer state, step and counters), the
data position, and the run's options, saved asynchronously every `save_steps` and keeping `save_total_limit`.

Restoring goes straight into the shardings of an abstract target (`jax.ShapeDtypeStruct`s with shardings),
so a checkpoint saved on one mesh loads onto another.

Every checkpoint carries `SHA256SUMS` (the `sha256sum` format, so `cd checkpoints/<step> && sha256sum -c
SHA256SUMS` checks it by hand), written by the primary process in Orbax's background thread once all files are
on disk and before Orbax renames the directory into place: a checkpoint is listed only with its sums. Restore
tells three failures apart:
- damage (a file missing, cut short or changed against SHA256SUMS, metadata or data that do not decode, or
  parameters / optimizer state that are not finite): resuming moves the checkpoint aside to
  `checkpoints/damaged-<step>-<time>` (out of the step listing, never deleted) and falls back to the one
  before; evaluate and export pass over it without moving it;
- a storage error (any OSError but a missing file, e.g. EIO, ETIMEDOUT, EACCES; or TensorStore's UNAVAILABLE,
  DEADLINE_EXCEEDED, ...): not evidence of damage, so it is retried (`RETRY_DELAYS`) and then reported, with
  nothing moved;
- a saved state of other shapes than the run's (another model, LoRA rank or targets): reported, nothing moved.
Verifying reads the checkpoint once more, about the time restoring it takes.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from .errors import UserError

log = logging.getLogger(__name__)

SUMS = "SHA256SUMS"
RETRY_DELAYS = (1.0, 4.0, 16.0)  # seconds before each new attempt at a checkpoint that fails with a storage error
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # Orbax's name for a step directory still being written
NOT_SUMMED = ("_CHECKPOINT_METADATA", "commit_success.txt", SUMS, f".{SUMS}.tmp")  # Orbax writes the first two
# when it commits, after the sums
# errors that say a file is not there (or not a file): damage, not a storage failure
MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
# TensorStore status codes of a storage or network failure rather than of bad bytes
TRANSIENT_STATUS = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "CANCELLED", "RESOURCE_EXHAUSTED",
                    "PERMISSION_DENIED", "UNAUTHENTICATED")


class Damaged(Exception):
    """Evidence that a checkpoint is not what was saved (the message says what)."""


class Checkpoints:
    """`output_dir/checkpoints/<step>/{state, data, options, SHA256SUMS}`. Use as a context manager, or close()."""

    def __init__(self, directory: str | Path, *, max_to_keep: int | None = None, asynchronous: bool = True,
                 create: bool = True):
        self.directory = Path(directory).absolute()
        self.asynchronous = asynchronous
        self._saving: int | None = None  # the step whose save may still be in flight
        # the sums are written by Orbax's commit, before the rename: a listed checkpoint always has them
        async_options = ocp.AsyncOptions(post_finalization_callback=self._seal) if asynchronous else None
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=asynchronous,
                                               create=create, async_options=async_options)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def save(self, step: int, state, data_position: dict, options: dict) -> None:
        """Start saving (returns while the files are written; `wait` blocks until they are). A save that fails
        (here or, for the one before, in the background) raises UserError naming the newest intact checkpoint."""
        self.wait()  # the previous save's error, if any, is reported under its own step
        self._saving = step
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state), data=ocp.args.JsonSave(data_position),
                options=ocp.args.JsonSave(options)), force=True)
            if not self.asynchronous and jax.process_index() == 0:
                self._seal()
        except Exception as e:
            self._save_failed(step, e)

    def wait(self) -> None:
        """Block until a save in flight is on disk; UserError when it failed."""
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            self._save_failed(self._saving, e)

    def close(self) -> None:
        """Wait for a save in flight (UserError when it failed), then release Orbax's threads and files."""
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # the failed save, raised once more by Orbax: already reported by wait()
                log.debug("closing the checkpoint manager of %s", self.directory, exc_info=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore(self, abstract_state, step: int | None = None):
        """(step, state, data position, options) of `step`, or of the newest checkpoint that is intact (damaged
        newer ones are moved aside, with a warning). `abstract_state` is the state's tree of
        jax.ShapeDtypeStruct with the target shardings."""
        def read(s):
            return self.manager.restore(s, args=ocp.args.Composite(
                state=_restore_args(abstract_state), data=ocp.args.JsonRestore(), options=ocp.args.JsonRestore()))
        s, restored = self._newest_intact(step, read, abstract_state, lambda r: r["state"], set_aside=True)
        return s, restored["state"], dict(restored["data"]), dict(restored["options"])

    def restore_params(self, abstract_params, step: int | None = None) -> tuple[int, object]:
        """(step, policy parameters) of `step`, or of the newest intact checkpoint (a damaged one is passed
        over with a warning, not moved); no optimizer state is read: for evaluation and export."""
        target = {"params": abstract_params}

        def read(s):
            return self.manager.restore(s, args=ocp.args.Composite(state=_restore_args(target, partial=True)))
        s, restored = self._newest_intact(step, read, target, lambda r: r["state"], set_aside=False)
        return s, restored["state"]["params"]

    def saved_options(self, step: int | None = None) -> dict:
        """The run's options stored with `step` (default: the newest intact checkpoint's)."""
        def read(s):
            return self.manager.restore(s, args=ocp.args.Composite(options=ocp.args.JsonRestore()))
        return dict(self._newest_intact(step, read, None, None, set_aside=False)[1]["options"])

    def set_aside_after(self, step: int) -> list[Path]:
        """Move the checkpoints newer than `step` to `superseded-<step>-<time>`: a run resumed from an earlier
        step writes a history of its own, and the other one is kept for the user to delete."""
        moved = [self._set_aside(s, "superseded") for s in self.steps() if s > step]
        if moved:
            log.warning("resuming from checkpoint %s of %s: the later checkpoints belong to another history; "
                        "moved them aside (delete them when not needed): %s", step, self.directory,
                        ", ".join(map(str, moved)))
        return moved

    def _newest_intact(self, step, read, target, state_of, *, set_aside: bool):
        """(s, read(s)) for `step`, or for the newest checkpoint that is intact, passing over damaged ones."""
        steps = [step] if step is not None else self.steps()[::-1]
        if not steps:
            raise UserError(f"no checkpoint in {self.directory} to resume from")
        passed = []
        for s in steps:
            try:
                return s, self._read(s, read, target, state_of)
            except Damaged as e:
                if step is not None:
                    raise UserError(f"checkpoint {s} in {self.directory} cannot be read: it is damaged ({e}); "
                                    f"give another step, or the run's output_dir for its newest intact "
                                    f"checkpoint") from e
                if set_aside:
                    aside = self._set_aside(s, "damaged")
                    log.warning("checkpoint %s in %s cannot be read: it is damaged (%s); moved it aside to %s; "
                                "trying the one before", s, self.directory, e, aside)
                    passed.append(f"{s} (moved to {aside.name}: {e})")
                else:
                    log.warning("checkpoint %s in %s cannot be read: it is damaged (%s); trying the one before",
                                s, self.directory, e)
                    passed.append(f"{s} ({e})")
        raise UserError(f"none of the checkpoints in {self.directory} is intact: " + "; ".join(passed) + (
            ". They were kept aside, not deleted; a new run (or --resume_from_checkpoint true) in this "
            "output_dir now starts from step 0" if set_aside else ""))

    def _read(self, step: int, read, target, state_of):
        """read(step) once the checkpoint verifies, fits `target` and holds finite numbers; Damaged when it is
        not intact; a storage error is retried, then raised as UserError."""
        for delay in (*RETRY_DELAYS, None):
            try:
                self._verify(step)
                if target is not None:
                    self._check_fits(step, target)
                restored = read(step)
                if state_of is not None:
                    _check_finite(state_of(restored))
                return restored
            except (Damaged, UserError):
                raise
            except Exception as e:
                if not _is_storage_error(e):
                    raise Damaged(_brief(e)) from e
                if delay is None:
                    raise UserError(f"checkpoint {step} in {self.directory} could not be read after "
                                    f"{len(RETRY_DELAYS) + 1} attempts ({_brief(e)}): a storage error, not "
                                    f"damage, so nothing was moved or deleted; check the disk or mount (space, "
                                    f"permissions, network) and run the command again") from e
                log.warning("checkpoint %s in %s: %s; trying again in %s s", step, self.directory, _brief(e), delay)
                time.sleep(delay)

    def _verify(self, step: int) -> None:
        """Check the files of `step` against its SHA256SUMS: on the primary process only, whose verdict the
        others take (each would otherwise read the whole checkpoint)."""
        if jax.process_count() == 1:
            verify(self.directory / str(step))
            return
        from jax.experimental import multihost_utils

        code, reason = 0, ""
        if jax.process_index() == 0:
            try:
                verify(self.directory / str(step))
            except Damaged as e:
                code, reason = 1, str(e)
            except OSError as e:
                code, reason = 2, _brief(e)
        code = int(multihost_utils.broadcast_one_to_all(np.int32(code)))
        if code == 1:
            raise Damaged(reason or "its files differ from its SHA256SUMS (see the primary process's log)")
        if code == 2:
            raise OSError(errno.EIO, reason or "the primary process could not read it")

    def _check_fits(self, step: int, target) -> None:
        """UserError when the saved arrays have other shapes than `target`'s (the run's options changed the
        model, LoRA or optimizer): not damage, so the checkpoint stays where it is."""
        handler = ocp.PyTreeCheckpointHandler()  # the manager knows its items' handlers only after a restore
        try:
            saved = getattr(handler.metadata(self.directory / str(step) / "state"), "tree", None)
        finally:
            handler.close()
        if not saved:
            raise Damaged("its state metadata is empty")
        if isinstance(target, dict):  # a partial restore: compare those subtrees only
            saved = {k: saved.get(k) for k in target}
        have, want = _shapes(saved), _shapes(target)
        if have != want:
            only_saved, only_here = _difference(have, want), _difference(want, have)
            raise UserError(f"checkpoint {step} in {self.directory} holds a state of other shapes than this "
                            f"run's ({len(have)} arrays saved, {len(want)} here; saved only: {only_saved[:3]}, "
                            f"here only: {only_here[:3]}): another model, LoRA rank or target modules? Resume "
                            f"with the options the run was saved with; nothing was moved")

    def _set_aside(self, step: int, why: str) -> Path:
        """Rename `<step>` to `<why>-<step>-<time>`, out of Orbax's step listing (the primary process does it)."""
        aside = self.directory / f"{why}-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        n = 1
        while aside.exists():
            aside, n = aside.with_name(f"{why}-{step}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(aside)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"dpo_jax set aside {step}")
        self.manager.reload()
        return aside

    def _seal(self) -> None:
        """Write SHA256SUMS into the step being saved. Orbax calls this on the primary process when every file is
        written, before it renames `<step>.orbax-checkpoint-tmp` to `<step>`."""
        step = self._saving
        pending = [p for p in self.directory.glob(f"{step}{TMP_SUFFIX}*") if p.is_dir()]
        write_sums(pending[0] if len(pending) == 1 else self.directory / str(step))

    def _save_failed(self, step: int | None, error: Exception):
        """Remove what the failed save of `step` left and raise UserError naming the newest intact checkpoint."""
        if jax.process_index() == 0:
            for partial in self.directory.glob(f"{step}{TMP_SUFFIX}*"):
                shutil.rmtree(partial, ignore_errors=True)  # never complete: nothing there can be restored
        self.manager.reload()
        kept = [s for s in self.steps() if (self.directory / str(s) / SUMS).is_file()] or self.steps()
        survivor = (f"the newest intact checkpoint is {self.directory / str(kept[-1])} (continue from it with "
                    f"--resume_from_checkpoint true)" if kept else "no earlier checkpoint survives")
        cause = ("no space left on device" if _errno(error) in (errno.ENOSPC, errno.EDQUOT) else _brief(error))
        raise UserError(f"saving checkpoint {step} in {self.directory} failed: {cause}. Its partial files were "
                        f"removed; {survivor}. Free space (or lower save_total_limit) and run again") from error


def write_sums(step_dir: Path) -> None:
    """`step_dir/SHA256SUMS`: the SHA-256 of every file of the checkpoint's items."""
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name not in NOT_SUMMED)
    lines = [f"{digest}  {p.relative_to(step_dir).as_posix()}\n" for p, digest in zip(files, _digests(files))]
    tmp = step_dir / f".{SUMS}.tmp"
    tmp.write_text("".join(lines))
    tmp.replace(step_dir / SUMS)


def verify(step_dir: Path) -> bool:
    """Check `step_dir` against its SHA256SUMS: True when it matches, False when it has none (a checkpoint of
    an earlier dpo-jax), Damaged when a file is missing or differs; OSError when one cannot be read."""
    try:
        text = (step_dir / SUMS).read_text()
    except FileNotFoundError:
        if not step_dir.is_dir():
            raise Damaged(f"{step_dir} is gone") from None
        log.info("checkpoint %s has no %s (saved by an earlier dpo-jax): not verified", step_dir, SUMS)
        return False
    expected = {}
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise Damaged(f"its {SUMS} is garbled")
        expected[name] = digest
    files = [step_dir / name for name in expected]
    try:
        digests = _digests(files)
    except FileNotFoundError as e:
        raise Damaged(f"{Path(e.filename).relative_to(step_dir)} is missing") from e
    bad = [name for name, digest in zip(expected, digests) if digest != expected[name]]
    if bad:
        raise Damaged(f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} differ{'s' if len(bad) == 1 else ''} "
                      f"from its {SUMS}")
    return True


def _digests(files: list[Path]) -> list[str]:
    """SHA-256 of each file, several at a time (hashlib releases the GIL): about 1 GB/s a core."""
    def digest(path: Path) -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(digest, files))


def _check_finite(state) -> None:
    """Damaged when a floating-point array of `state` holds NaN or inf (such a state must not be trained on)."""
    floats = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(state)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not floats:
        return
    finite = np.asarray(jax.jit(lambda xs: jnp.stack([jnp.isfinite(x).all() for x in xs]))([x for _, x in floats]))
    if not finite.all():
        names = [jax.tree_util.keystr(path) for (path, _), ok in zip(floats, finite) if not ok]
        raise Damaged(f"{len(names)} of its arrays hold NaN or inf, e.g. {names[0]}")


def _shapes(tree) -> list[tuple]:
    return sorted(tuple(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def _difference(a: list, b: list) -> list:
    rest = list(b)
    return [x for x in a if x not in rest or rest.remove(x)]


def _errno(error: BaseException) -> int | None:
    """The OS error number behind `error`: an OSError's, or the one TensorStore quotes ([os_error_code='28'])."""
    while error is not None:
        if isinstance(error, OSError) and error.errno is not None:
            return error.errno
        found = re.search(r"os_error_code='?(\d+)", str(error))
        if found:
            return int(found.group(1))
        error = error.__cause__ or error.__context__
    return None


def _is_storage_error(error: BaseException) -> bool:
    """Whether `error` says the storage failed (retry, report) rather than that the bytes are bad (damage)."""
    number = _errno(error)
    if number is not None:
        return number not in MISSING
    if isinstance(error, OSError):  # TimeoutError and others without a number
        return not isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError))
    return str(error).startswith(TRANSIENT_STATUS)


def _brief(error: BaseException) -> str:
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


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
