"""dpo-jax bench: the background batch thread hands out the iterator's batches, and the benchmark counts the
same tokens and FLOPs as its TRL side (which counts them from TRL's own collated batches)."""

import json
import subprocess
import sys

import numpy as np
import pytest

from dpo_jax.batching import BatchIterator
from dpo_jax.prefetch import Prefetcher
from test_batching import random_pairs
from test_trainer import tiny_model


def test_prefetcher_hands_out_the_iterators_batches_in_order():
    pairs = random_pairs(10, max_len=12)
    plain = BatchIterator(pairs, global_batch_size=4, pad_token_id=0, seed=3)
    feed = Prefetcher(BatchIterator(pairs, global_batch_size=4, pad_token_id=0, seed=3), depth=2)
    for _ in range(8):  # over several epochs (3 batches each, the last one filled up)
        expected, got = next(plain), next(feed)
        assert expected.keys() == got.keys()
        for k in expected:
            np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
        assert feed.state_dict() == plain.state_dict()  # the next batch handed out, not the next one built
    feed.close()


def test_prefetcher_raises_the_threads_error_in_the_consumer():
    pairs = random_pairs(6, max_len=12)
    batches = BatchIterator(pairs, global_batch_size=2, pad_token_id=0)

    def broken(epoch, step):
        raise ValueError(f"bad batch {epoch}/{step}")
    batches.batch = broken
    with pytest.raises(ValueError, match="bad batch 0/0"):
        next(Prefetcher(batches))


@pytest.mark.filterwarnings("ignore")
def test_bench_counts_what_trl_counts(tmp_path):
    """Same pairs, pairs layout: over the measured epoch both sides see every pair once, so real tokens and
    useful FLOPs (counted by the same formula from each side's own batches) agree; prefix sharing computes
    each prompt once, so fewer tokens for the same pairs."""
    pytest.importorskip("trl")
    model = tiny_model(tmp_path / "model")
    runs = {}
    for layout, extra in (("pairs", ["--vs", "trl"]), ("shared_prefix", [])):
        out = tmp_path / f"{layout}.json"
        done = subprocess.run([sys.executable, "-m", "dpo_jax", "bench", "--model_name_or_path", model,
                               "--max_length", "128", "--dataset_train_split", "train[:12]", "--pack_pairs", layout,
                               "--output_json", str(out), "--work_dir", str(tmp_path / layout), *extra],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "pairs/s" in done.stdout
        runs[layout] = {r["side"]: r for r in json.loads(out.read_text())["results"]}
    ours, trl = runs["pairs"]["dpo-jax"], runs["pairs"]["trl"]

    def measured(result, key):
        last = max(s["epoch"] for s in result["steps"])
        return sum(s[key] for s in result["steps"] if s["epoch"] == last)
    assert measured(ours, "pairs") == measured(trl, "pairs") == 12
    assert measured(ours, "tokens") == measured(trl, "tokens")
    np.testing.assert_allclose(measured(ours, "flops"), measured(trl, "flops"), rtol=1e-9)
    shared = runs["shared_prefix"]["dpo-jax"]
    assert measured(shared, "pairs") == 12 and measured(shared, "tokens") < measured(ours, "tokens")
    assert ours["compiles_after_first_epoch"] == 0 and 1 <= ours["step_shapes"] <= 4
    assert ours["steps_that_compiled"] == 0  # every shape compiled before step 1
    assert ours["process_seconds"] > ours["wall_seconds"] > ours["first_step_seconds"] > 0
    assert ours["peak_rss_gb"] > 0 and ours["matmul_peak_gflops"] > 0
