"""Training never loses finished work: an unusable output_dir is refused before anything is loaded, a second
run into a directory in use is refused naming the holder, an earlier run's work is never overwritten, and a
run stopped by non-finite steps saves the last good state first, counting the skipped steps."""

import json
import logging
import math
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from dpo_jax import from_pretrained, options, rundir, trainer
from dpo_jax.cli import main
from dpo_jax.report import summary
from dpo_jax.runs import load_trained
from dpo_jax.sharding import make_mesh
from dpo_jax.trainer import Trainer, params_numpy
from test_trainer import tiny_model

PACKAGE = str(Path(rundir.__file__).parent)
TRAIN = ["--per_device_train_batch_size", "1", "--mesh", "data=2,fsdp=-1", "--logging_steps", "1",
         "--max_length", "128", "--dataset_test_split", "none", "--report_to", "none",
         "--lr_scheduler_type", "constant"]
# rundir alone, without the package's heavy imports, in a child process
CLAIM = f"""
import sys, types
package = types.ModuleType("dpo_jax"); package.__path__ = [{PACKAGE!r}]; sys.modules["dpo_jax"] = package
from dpo_jax import rundir, errors
if sys.argv[2:] == ["nobody"]:  # root ignores permissions: drop them, once python and its modules are loaded
    import fcntl, os
    os.setgid(65534); os.setuid(65534)
try:
    held = rundir.claim(sys.argv[1])
except errors.UserError as e:
    print(e, flush=True); sys.exit(2)
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Fails the test if the trainer reaches loading the model."""
    def load_config(path):
        raise AssertionError(f"the model {path} was loaded")
    monkeypatch.setattr(trainer, "load_config", load_config)


def held(directory) -> bool:
    """Whether this process still holds `directory`'s lock."""
    return Path(os.path.realpath(directory)) in rundir._held


def train(capsys, out, *extra, model="no-model-needed"):
    status = main(["train", "--model_name_or_path", model, "--output_dir", str(out), *TRAIN, *extra])
    return status, capsys.readouterr()


def test_an_output_dir_that_cannot_be_used_is_refused_before_loading(tmp_path, capsys, nothing_loaded):
    (tmp_path / "file").write_text("x")
    status, printed = train(capsys, tmp_path / "file")
    assert status == 2 and "is a file, not a directory" in printed.err and "Traceback" not in printed.err
    status, printed = train(capsys, tmp_path / "file" / "sub")
    assert status == 2 and f"output_dir {tmp_path / 'file' / 'sub'} cannot be created" in printed.err
    assert "Not a directory" in printed.err


def test_an_output_dir_this_user_cannot_write_is_refused(tmp_path):
    """Root ignores permissions, so as root the claim is made by a child process that becomes nobody."""
    parent = Path(tempfile.mkdtemp(prefix="dpo_jax_readonly."))  # outside pytest's 0700 tmp_path
    try:
        os.chmod(parent, 0o755)
        for target, message in ((parent, "is not writable (Permission denied)"),
                                (parent / "sub", "cannot be created (Permission denied)")):
            if os.geteuid() == 0:
                done = subprocess.run([sys.executable, "-c", CLAIM, str(target), "nobody"], capture_output=True,
                                      text=True, stdin=subprocess.DEVNULL, timeout=60)
                assert done.returncode == 2 and message in done.stdout, (done.stdout, done.stderr)
            else:
                os.chmod(parent, 0o555)
                with pytest.raises(rundir.UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
                    rundir.claim(target)
        assert not (parent / "sub").exists() and not list(parent.iterdir())
    finally:
        os.chmod(parent, 0o755)
        os.rmdir(parent)


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys, caplog,
                                                                                         nothing_loaded):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", CLAIM, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        status, printed = train(capsys, out)
        assert status == 2, printed.err
        assert f"output_dir {out} is in use by another run (pid {holder.pid} on host " in printed.err
        status, printed = main(["demo", "--output_dir", str(out)]), capsys.readouterr()  # the demo too
        assert status == 2 and f"pid {holder.pid}" in printed.err
    finally:
        holder.send_signal(signal.SIGKILL)  # dies holding it: no release, its record stays in the lock file
        holder.wait()
    assert json.loads((out / rundir.LOCK_FILE).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING):
        with rundir.claim(out):
            assert json.loads((out / rundir.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of pid {holder.pid}" in caplog.text
    assert (out / rundir.LOCK_FILE).read_text() == ""  # released: no holder recorded


def test_a_failed_start_releases_the_lock_and_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "o"
    status, printed = train(capsys, out, "--dataset_name", str(tmp_path / "missing.jsonl"),
                            model=tiny_model(tmp_path / "model"))
    assert status == 2 and "does not exist" in printed.err
    assert not out.exists() and not held(out)


def test_an_earlier_runs_metrics_are_not_overwritten_by_a_new_run_or_the_demo(tmp_path, capsys, nothing_loaded):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    status, printed = train(capsys, out, "--save_strategy", "no")
    assert status == 2 and f"{out} already holds the metrics.jsonl of an earlier run" in printed.err
    status, printed = main(["demo", "--output_dir", str(out)]), capsys.readouterr()
    assert status == 2 and f"{out} holds an earlier demo run" in printed.err and "rm -r" in printed.err
    assert (out / "metrics.jsonl").read_text() == json.dumps({"step": 1, "loss": 0.69}) + "\n"
    assert not held(out)


def test_resuming_with_no_checkpoint_keeps_the_earlier_runs_metrics(tmp_path, capsys, caplog):
    model = tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    assert train(capsys, out, "--max_steps", "1", "--save_strategy", "no", model=model)[0] == 0
    first = (out / "metrics.jsonl").read_text()
    status, _ = train(capsys, out, "--max_steps", "2", "--save_strategy", "no", "--resume_from_checkpoint", "true",
                      model=model)
    kept = list(out.glob("metrics.before-*.jsonl"))
    assert status == 0 and len(kept) == 1 and kept[0].read_text() == first
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2]
    assert "is kept as metrics.before-" in caplog.text


def test_non_finite_updates_are_skipped_counted_and_the_last_good_state_saved(tmp_path, capsys):
    """A learning rate past float32's range: loss and gradients are finite, the update is not, so every step is
    skipped. After max_nonfinite_steps the run stops (exit 2) naming the checkpoint it saved, which holds the
    untouched initial weights and resumes: with a sane learning rate it then trains on."""
    model = tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    status, printed = train(capsys, out, "--learning_rate", "1e39", "--max_steps", "3",
                            "--max_nonfinite_steps", "2", "--save_steps", "100", model=model)
    saved = out / "checkpoints" / "2"
    assert status == 2 and "Traceback" not in printed.err
    assert "not finite in the last 2 steps in a row" in printed.err
    assert f"The last good state is saved in {saved}" in printed.err and "Lower the learning rate" in printed.err
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [(r["step"], r["skipped_steps"]) for r in rows] == [(1, 1), (2, 2)]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)  # only the update was not
    restored, _, step = load_trained(str(saved), make_mesh(fsdp=-1), np.float32)
    assert step == 2
    initial = from_pretrained(model, dtype=np.float32)
    for a, b in zip(*(jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (initial, restored))):
        assert np.isfinite(np.asarray(b)).all()
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    assert not held(out) and (out / rundir.LOCK_FILE).read_text() == ""  # released on this exit path too

    resumed = Trainer(options.parse(["--model_name_or_path", model, "--output_dir", str(out), *TRAIN,
                                     "--learning_rate", "1e-3", "--max_steps", "3", "--max_nonfinite_steps", "2",
                                     "--save_steps", "100", "--resume_from_checkpoint", "true"]))
    start = params_numpy(resumed.state)
    resumed.train()
    assert resumed.finished and "dpo-jax: trained 1 steps in " in capsys.readouterr().out
    last = [json.loads(line) for line in open(out / "metrics.jsonl")][-1]
    assert last["step"] == 3 and last["skipped_steps"] == 2  # the count of the whole run, restored with the state
    assert any(np.abs(b - a).max() > 0 for a, b in zip(start, params_numpy(resumed.state)))


def test_a_run_whose_every_step_was_skipped_does_not_say_it_trained(tmp_path, capsys):
    model = tiny_model(tmp_path / "model")
    status, printed = train(capsys, tmp_path / "run", "--learning_rate", "1e39", "--max_steps", "2",
                            "--save_strategy", "no", model=model)
    assert status == 0, printed.err
    assert "ran 2 steps but applied no update: all were skipped (loss, gradients or update not finite)" in printed.out
    assert "trained" not in printed.out
    assert (printed.out + printed.err).count("the update was skipped") == 2
    status, printed = train(capsys, tmp_path / "run", "--save_strategy", "no", model=model)  # not over it
    assert status == 2 and "already holds the metrics.jsonl of an earlier run" in printed.err


def test_the_summary_counts_skipped_steps():
    def first_line(steps, skipped):
        return summary(final={}, train={}, steps=steps, tokens=100, seconds=1.0, out=Path("o"), written=[],
                       skipped=skipped).splitlines()[0]
    assert first_line(4, 0).startswith("dpo-jax: trained 4 steps in ")
    assert first_line(4, 1).startswith("dpo-jax: trained 4 steps (1 skipped: loss, gradients or update not finite)")
    assert first_line(4, 4).startswith("dpo-jax: ran 4 steps but applied no update: all were skipped")
