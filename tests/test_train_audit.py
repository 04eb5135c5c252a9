"""`train` audits its data before loading the model (audit_fail_on, skipped rows, nothing left after truncation),
the audit's padding figures are those of the run's layout, and `evaluate` of a single file evaluates it."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from dpo_jax import audit, options
from dpo_jax.batching import BatchIterator
from dpo_jax.pairs import load_pairs
from dpo_jax.cli import build_parser, main
from dpo_jax.config import DataConfig, RunConfig
from dpo_jax.data import SAMPLE_DIR
from dpo_jax.hf import load_tokenizer
from dpo_jax.trainer import Trainer
from test_trainer import tiny_model

ROWS = [json.loads(line) for line in open(SAMPLE_DIR / "train.jsonl")][:12]
MEMORY_PLAN = "memory, per device (XLA's compiled step)"  # what train prints after the audit, before loading weights


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_model(tmp_path_factory.mktemp("model"))


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def train(capsys, model, out, data, *extra):
    code = main(["train", "--model_name_or_path", model, "--output_dir", str(out), "--dataset_name", data,
                 "--max_steps", "1", "--per_device_train_batch_size", "1",
                 "--report_to", "none", "--save_strategy", "no", *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_audit_fail_on_stops_train_before_the_model(model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    code, out, err = train(capsys, model, tmp_path / "run", data, "--max_length", "24",
                           "--audit_fail_on", "truncated")
    assert code == 2 and "the data audit found truncated: 10" in err and "Traceback" not in err
    assert MEMORY_PLAN not in out and "data audit: " in out  # the table, since a check failed
    report = json.loads((tmp_path / "run" / "data_audit.json").read_text())["train"]
    assert report["counts"]["truncated"] == 10 and report["counts"]["dropped"] == 2


def test_skipped_rows_are_counted_printed_and_written(model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS[:5] + ['{"prompt": "broken'] + ROWS[5:])
    code, out, err = train(capsys, model, tmp_path / "stop", data, "--on_bad_row", "skip",
                           "--audit_fail_on", "skipped", "--dataset_test_split", "none")
    assert code == 2 and "skipped: 1 (rows 6)" in err and MEMORY_PLAN not in out

    # a run that goes on: the table on stdout (a row was skipped), the audit in output_dir
    run = tmp_path / "run"
    o = options.parse(["--model_name_or_path", model, "--output_dir", str(run), "--dataset_name", data,
                       "--on_bad_row", "skip", "--per_device_train_batch_size", "1",
                       "--pad_to_multiple_of", "32", "--dataset_test_split", "train[:4]"])
    trainer = Trainer(o, test_split_asked=True)
    out = capsys.readouterr().out
    assert re.search(r"skipped \(bad rows\) +1 +rows 6\n", out)
    assert out.index("data audit written to") < out.index(MEMORY_PLAN)
    reports = json.loads((run / "data_audit.json").read_text())
    assert reports["train"]["counts"]["skipped"] == 1 and reports["train"]["first_rows"]["skipped"] == [6]
    assert reports["train"]["records_read"] == 13 and reports["train"]["pairs_kept"] == 12
    assert reports["train"]["layout"] == reports["test"]["layout"] == "packed"
    # evaluation batches follow training's bucket policy (pad_to_multiple_of), not the defaults
    assert all(b % 32 == 0 for b in trainer.eval_batches.buckets + trainer.batches.buckets)


def test_nothing_left_after_truncation_shows_the_audit_table(model, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    code, out, err = train(capsys, model, tmp_path / "run", data, "--max_length", "4")
    assert code == 2 and "no preference pair is left" in err and "max_length (4 tokens)" in err
    assert "data audit: " in err and re.search(r"dropped \(prompt >= max_length\) +12 +rows 1, 2, 3, 4, 5", err)
    assert MEMORY_PLAN not in out


def test_single_split_dataset_trains_without_evaluating_on_itself(model, tmp_path, capsys, caplog):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    o = options.parse(["--model_name_or_path", model, "--output_dir", str(tmp_path / "run"), "--dataset_name", data,
                       "--per_device_train_batch_size", "1"])
    assert Trainer(o, test_split_asked=False).eval_batches is None
    assert "has one split, 'train', and no 'test' split: no evaluation" in caplog.text
    assert '--dataset_train_split "train[:90%]" --dataset_test_split "train[90%:]"' in caplog.text
    code, _, err = train(capsys, model, tmp_path / "named", data, "--dataset_test_split", "test")
    assert code == 2 and "split 'test' is not in" in err  # named: its absence is an error


def padding_of_batches(batches: BatchIterator) -> dict[int, tuple[int, float]]:
    """Row length -> (batches, padding fraction), counted on the batches themselves."""
    slots, real, count = {}, {}, {}
    for s in range(batches.steps_per_epoch):
        b = batches.batch(0, s)
        used = b["segment"] >= 0
        n = b["input_ids"].shape[-1]
        slots[n] = slots.get(n, 0) + b["input_ids"].size
        real[n] = real.get(n, 0) + int(used.sum())
        count[n] = count.get(n, 0) + 1
    return {n: (count[n], 1 - real[n] / slots[n]) for n in slots}


@pytest.mark.parametrize("layout,micro_batches", [("pairs", 1), ("shared_prefix", 1), ("packed", 1), ("packed", 2)])
def test_audit_padding_is_the_layouts(layout, micro_batches, model):
    tokenizer = load_tokenizer(model)
    pairs, rows = load_pairs(DataConfig(max_length=96), "train", tokenizer)
    batches = BatchIterator(pairs, global_batch_size=8, pad_token_id=0, layout=layout, micro_batches=micro_batches,
                            num_buckets=3, multiple=16)
    report = audit.audit(pairs, rows, batches, tokenizer)
    assert report["layout"] == layout
    figures = {b["length"]: (b["batches"], b["padding"]) for b in report["buckets"] if b["batches"]}
    counted = padding_of_batches(batches)
    assert sorted(figures) == sorted(counted)
    for n, (k, padding) in counted.items():
        assert figures[n][0] == k and figures[n][1] == pytest.approx(padding, abs=1e-4), n


def test_audit_command_shows_the_train_layout(model, tmp_path, capsys):
    assert build_parser().parse_args(["audit"]).pack_pairs == RunConfig.pack_pairs
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    assert main(["audit", "--model_name_or_path", model, "--dataset_name", data]) == 0
    out = capsys.readouterr().out
    assert "buckets (first epoch, packed)" in out and "no 'test' split: no held-out audit" in out
    assert out.count("data audit:") == 1  # the one split, once
    assert main(["audit", "--model_name_or_path", model, "--dataset_name", data, "--pack_pairs", "pairs"]) == 0
    assert "buckets (first epoch, pairs)" in capsys.readouterr().out
    assert main(["audit", "--model_name_or_path", model, "--dataset_name", data, "--dataset_test_split", "test"]) == 2
    assert "split 'test' is not in" in capsys.readouterr().err


def evaluate(capsys, *argv):
    code = main(["evaluate", *argv])
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else None), captured.err


def test_evaluate_a_single_file(model, tmp_path, capsys):
    ref = tmp_path / "ref"  # another random model, so that rewards and margins are not all 0
    torch.manual_seed(1)
    config = transformers.AutoConfig.from_pretrained(model)
    transformers.LlamaForCausalLM(config).save_pretrained(ref)
    rows = [json.loads(line) for line in open(SAMPLE_DIR / "test.jsonl")][:10]
    single = write_jsonl(tmp_path / "pairs.jsonl", rows)
    directory = tmp_path / "dir"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", ROWS)
    write_jsonl(directory / "test.jsonl", rows)
    common = ["--model_name_or_path", model, "--ref_model_name_or_path", str(ref),
              "--per_device_eval_batch_size", "1"]
    code, from_file, err = evaluate(capsys, *common, "--dataset_name", single)
    assert code == 0, err
    assert f"dataset {single} has one split, 'train': evaluating it" in err
    code, from_dir, err = evaluate(capsys, *common, "--dataset_name", str(directory))
    assert code == 0, err
    assert from_file["eval_rewards/margins"] != 0
    for k, v in from_dir.items():
        assert from_file[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    code, _, err = evaluate(capsys, *common, "--dataset_name", single, "--dataset_test_split", "test")
    assert code == 2 and "split 'test' is not in" in err


def test_demo_asks_for_a_held_out_slice_of_a_single_split(tmp_path):
    from dpo_jax.demo import held_out_prompts
    from dpo_jax.errors import UserError

    o = options.parse(["--dataset_name", write_jsonl(tmp_path / "d.jsonl", ROWS)])
    with pytest.raises(UserError, match=r'one split: give --dataset_train_split "train\[:90%\]" '
                                        r'--dataset_test_split "train\[90%:\]"'):
        held_out_prompts(o, smoke=True)
