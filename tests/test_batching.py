"""Truncation on hand-made token lists, length buckets, resumable order and per-process slices."""

import itertools

import numpy as np
import pytest
from datasets import Dataset

from dpo_jax.batching import BatchIterator, choose_buckets, pair_sources
from dpo_jax.pairs import Pairs, Truncation
from dpo_jax.errors import UserError

BOS, EOS, PAD = 1, 2, 0


def make_pairs(triples, **truncation) -> Pairs:
    """Pairs from (prompt ids, chosen ids, rejected ids), as the tokenizer stage would store them."""
    n = len(triples)
    tokenized = Dataset.from_dict({
        "__row__": list(range(1, n + 1)), "__file__": [0] * n,
        "prompt_ids": [list(p) for p, _, _ in triples], "chosen_ids": [list(c) for _, c, _ in triples],
        "rejected_ids": [list(r) for _, _, r in triples], "boundary_merged": [False] * n, "bos_fixed": [0] * n,
        "identical": [False] * n, "pair_key": [str(i) for i in range(n)]})
    return Pairs(tokenized, Truncation(**truncation), BOS)


def seq(pairs, i, which="chosen"):
    ids, mask = pairs.sequence(i, which)
    return ids.tolist(), mask.tolist()


PROMPT = [BOS, 10, 11, 12, 13, 14]
CHOSEN = [20, 21, 22, EOS]
REJECTED = [30, EOS]


def test_no_truncation():
    pairs = make_pairs([(PROMPT, CHOSEN, REJECTED)], max_length=None)
    assert seq(pairs, 0) == (PROMPT + CHOSEN, [0] * 6 + [1] * 4)
    assert seq(pairs, 0, "rejected") == (PROMPT + REJECTED, [0] * 6 + [1] * 2)


def test_keep_start_cuts_the_end_of_the_completion():
    pairs = make_pairs([(PROMPT, CHOSEN, REJECTED)], max_length=8)
    assert seq(pairs, 0) == ([BOS, 10, 11, 12, 13, 14, 20, 21], [0] * 6 + [1] * 2)
    assert seq(pairs, 0, "rejected") == (PROMPT + REJECTED, [0] * 6 + [1] * 2)  # fits: untouched
    assert pairs.truncated_at_max_length["chosen"].tolist() == [True]
    assert pairs.truncated_at_max_length["rejected"].tolist() == [False]


def test_keep_end_cuts_the_start_of_the_prompt():
    pairs = make_pairs([(PROMPT, CHOSEN, REJECTED)], max_length=7, truncation_mode="keep_end")
    assert seq(pairs, 0) == ([12, 13, 14, 20, 21, 22, EOS], [0, 0, 0, 1, 1, 1, 1])


def test_prompt_reaching_max_length_is_dropped_under_keep_start_only():
    triples = [(PROMPT, CHOSEN, REJECTED), ([BOS, 10], CHOSEN, REJECTED)]
    pairs = make_pairs(triples, max_length=6)  # first prompt has 6 tokens: nothing of the completion would fit
    assert len(pairs) == 1 and pairs.dropped_prompt_too_long == 1 and pairs.rows.tolist() == [2]
    assert seq(pairs, 0) == ([BOS, 10, 20, 21, 22, EOS], [0, 0, 1, 1, 1, 1])
    assert len(make_pairs(triples, max_length=6, truncation_mode="keep_end")) == 2


def test_max_prompt_length_keeps_bos_and_the_end_of_the_prompt():
    pairs = make_pairs([(PROMPT, CHOSEN, REJECTED), ([10, 11, 12, 13], CHOSEN, REJECTED)], max_prompt_length=3)
    assert seq(pairs, 0) == ([BOS, 13, 14] + CHOSEN, [0, 0, 0, 1, 1, 1, 1])
    assert seq(pairs, 1) == ([11, 12, 13] + CHOSEN, [0, 0, 0, 1, 1, 1, 1])  # no BOS to keep


def test_max_completion_length_cuts_each_completion():
    pairs = make_pairs([(PROMPT, CHOSEN, REJECTED)], max_completion_length=3)
    assert seq(pairs, 0) == (PROMPT + [20, 21, 22], [0] * 6 + [1] * 3)
    assert seq(pairs, 0, "rejected") == (PROMPT + REJECTED, [0] * 6 + [1] * 2)


def test_all_truncations_together():
    pairs = make_pairs([(PROMPT, CHOSEN, REJECTED)], max_prompt_length=4, max_completion_length=3, max_length=6)
    assert seq(pairs, 0) == ([BOS, 12, 13, 14, 20, 21], [0, 0, 0, 0, 1, 1])


def test_bad_truncation_options_are_errors():
    with pytest.raises(UserError, match="truncation_mode"):
        Truncation(truncation_mode="keep_middle")
    with pytest.raises(UserError, match="max_length"):
        Truncation(max_length=0)


def random_pairs(n, seed=0, max_len=60):
    rng = np.random.default_rng(seed)
    def ids(k):
        return rng.integers(3, 100, size=k).tolist()
    return make_pairs([([BOS] + ids(rng.integers(1, 20)), ids(rng.integers(1, max_len)), ids(rng.integers(1, max_len)))
                       for _ in range(n)], max_length=64)


def test_choose_buckets_is_optimal():
    """Against brute force over every choice of buckets from the candidate lengths."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 100, size=40)
    buckets = choose_buckets(lengths, 3, 8, 96)
    rounded = np.minimum(-(-lengths // 8) * 8, 96)

    def padding(bs):
        return sum(min(b for b in bs if b >= n) - n for n in rounded)

    candidates = np.unique(rounded)
    best = min(padding(c + (candidates[-1],)) for k in range(3) for c in itertools.combinations(candidates[:-1], k))
    assert len(buckets) <= 3 and buckets[-1] == rounded.max()
    assert padding(buckets) == best


def test_every_batch_is_padded_to_a_bucket():
    pairs = random_pairs(50)
    batches = BatchIterator(pairs, global_batch_size=4, pad_token_id=PAD, num_buckets=3, multiple=8)
    assert 1 <= len(batches.buckets) <= 3
    shapes = set()
    for _ in range(3 * batches.steps_per_epoch):
        batch = next(batches)
        shapes.add(batch["input_ids"].shape)
        assert batch["input_ids"].shape[1] in batches.buckets and batch["input_ids"].shape[0] == 8
        real = batch["pair_mask"] == 1
        padding = batch["segment"] < 0
        assert (batch["input_ids"][padding] == PAD).all() and (batch["branch"][padding] == -1).all()
        assert (batch["source"][padding] == -1).all()
        for b in range(4):  # pair b's chosen and rejected are rows 2b and 2b + 1, padded on the right
            if not real[b]:
                assert padding[2 * b:2 * b + 2].all()
                continue
            for s, which in enumerate(("chosen", "rejected")):
                ids, mask = pairs.sequence(int(batch["index"][b]), which)
                row = {k: batch[k][2 * b + s] for k in batch if batch[k].ndim == 2}
                assert row["input_ids"][:len(ids)].tolist() == ids.tolist()
                assert (row["segment"][:len(ids)] == b).all() and (row["segment"][len(ids):] == -1).all()
                assert row["branch"][:len(ids)].tolist() == np.where(mask == 1, s + 1, 0).tolist()
                assert row["position_ids"][:len(ids)].tolist() == list(range(len(ids)))
                # a completion token is predicted from the token before it, when there is one
                want = [t - 1 if mask[t] and t > 0 else -1 for t in range(len(ids))]
                assert row["source"][:len(ids)].tolist() == want
    assert len(shapes) <= 3


def test_an_epoch_visits_every_pair_once_and_epochs_differ():
    pairs = random_pairs(10)
    batches = BatchIterator(pairs, global_batch_size=4, pad_token_id=PAD, seed=3)
    assert batches.steps_per_epoch == 3  # 10 pairs: the last batch holds 2 real pairs and 2 fillers
    epochs = []
    for _ in range(2):
        seen = np.concatenate([next(batches)["index"] for _ in range(3)])
        assert sorted(seen[seen >= 0].tolist()) == list(range(10)) and (seen < 0).sum() == 2
        epochs.append(seen.tolist())
    assert epochs[0] != epochs[1]
    again = BatchIterator(pairs, global_batch_size=4, pad_token_id=PAD, seed=3)
    assert np.concatenate([next(again)["index"] for _ in range(3)]).tolist() == epochs[0]


def test_resume_from_saved_state_sees_the_same_batches():
    pairs = random_pairs(23)
    straight = BatchIterator(pairs, global_batch_size=4, pad_token_id=PAD, seed=7)
    expected = [next(straight) for _ in range(20)]  # more than three epochs
    for k in (0, 5, 6, 13):
        first = BatchIterator(pairs, global_batch_size=4, pad_token_id=PAD, seed=7)
        for _ in range(k):
            next(first)
        state = first.state_dict()
        resumed = BatchIterator(pairs, global_batch_size=4, pad_token_id=PAD, seed=7)
        resumed.load_state_dict(state)
        for want in expected[k:]:
            got = next(resumed)
            assert all(np.array_equal(got[key], want[key]) for key in want)


def test_resume_refuses_different_data_or_seed():
    batches = BatchIterator(random_pairs(23), global_batch_size=4, pad_token_id=PAD, seed=7)
    state = batches.state_dict()
    with pytest.raises(UserError, match="seed"):
        BatchIterator(random_pairs(23), global_batch_size=4, pad_token_id=PAD, seed=8).load_state_dict(state)
    with pytest.raises(UserError, match="fingerprint"):
        BatchIterator(random_pairs(23, seed=1), global_batch_size=4, pad_token_id=PAD, seed=7).load_state_dict(state)
    with pytest.raises(UserError, match="shuffle"):
        BatchIterator(random_pairs(23), global_batch_size=4, pad_token_id=PAD, seed=7,
                      shuffle=False).load_state_dict(state)
    with pytest.raises(UserError, match="lacks step"):
        batches.load_state_dict({k: v for k, v in state.items() if k != "step"})


@pytest.mark.parametrize("processes", [2, 4])
def test_process_slices_are_disjoint_and_complete(processes):
    pairs = random_pairs(37)
    whole = BatchIterator(pairs, global_batch_size=8, pad_token_id=PAD)
    parts = [BatchIterator(pairs, global_batch_size=8, pad_token_id=PAD, process_index=p, process_count=processes)
             for p in range(processes)]
    for _ in range(2 * whole.steps_per_epoch):
        want = next(whole)
        got = [next(p) for p in parts]
        rows, length = want["input_ids"].shape
        assert all(g["input_ids"].shape == (rows // processes, length) for g in got)
        for key in want:  # the process slices, stacked in process order, are the global batch
            assert np.array_equal(np.concatenate([g[key] for g in got]), want[key])
        indices = [set(g["index"][g["index"] >= 0].tolist()) for g in got]
        assert sum(map(len, indices)) == len(set().union(*indices))


def test_batch_must_divide_over_processes():
    with pytest.raises(UserError, match="multiple of 3"):
        BatchIterator(random_pairs(8), global_batch_size=8, pad_token_id=PAD, process_index=0, process_count=3)


def test_token_ids_outside_the_vocabulary_name_the_row():
    pairs = make_pairs([(PROMPT, CHOSEN, REJECTED), (PROMPT, CHOSEN, [30, 99, EOS])])
    pairs.check_vocab(100)
    with pytest.raises(UserError, match="row 2: the rejected has token id 99, but the model's vocabulary has 99"):
        pairs.check_vocab(99)


@pytest.mark.parametrize("processes", [1, 2])
def test_packed_rows_hold_every_pair_once(processes):
    pairs = random_pairs(30, max_len=20)
    parts = [BatchIterator(pairs, global_batch_size=8, pad_token_id=PAD, layout="packed",
                           process_index=p, process_count=processes) for p in range(processes)]
    for _ in range(2 * parts[0].steps_per_epoch):
        got = [next(p) for p in parts]
        assert len({g["input_ids"].shape for g in got}) == 1  # every process has the same shapes
        assert got[0]["input_ids"].shape[0] in parts[0].row_counts and got[0]["input_ids"].shape[1] in parts[0].buckets
        for p, g in enumerate(got):
            for k, i in enumerate(g["index"]):
                if i < 0:
                    continue
                # the segment is the pair's index in the global batch (process p's pairs after p's predecessors')
                here = g["segment"] == p * len(g["index"]) + k
                row = int(np.flatnonzero(here.any(axis=1))[0])
                here = here[row]
                ids, branch, positions = pairs.shared_row(int(i))
                chosen, _ = pairs.sequence(int(i), "chosen")
                rejected, _ = pairs.sequence(int(i), "rejected")
                prompt = int((branch == 0).sum())
                assert ids.tolist() == chosen.tolist() + rejected[prompt:].tolist()
                assert positions.tolist() == list(range(len(chosen))) + list(range(prompt, len(rejected)))
                assert g["input_ids"][row][here].tolist() == ids.tolist()
                assert g["branch"][row][here].tolist() == branch.tolist()
                assert g["position_ids"][row][here].tolist() == positions.tolist()
                start = int(np.flatnonzero(here)[0])
                source = pair_sources(branch)
                assert g["source"][row][here].tolist() == np.where(source >= 0, source + start, -1).tolist()
            used = int((g["segment"] >= 0).sum())
            assert used == sum(len(pairs.shared_row(int(i))[0]) for i in g["index"] if i >= 0)


def test_pair_sources_of_prompt_sharing_and_plain_pairs():
    """The first rejected token is predicted from the prompt's last token; a first token without a prompt
    before it, and prompt tokens, are not targets."""
    assert pair_sources(np.array([0, 0, 1, 1, 2, 2, 2])).tolist() == [-1, -1, 1, 2, 1, 4, 5]
    assert pair_sources(np.array([1, 1, 2, 2])).tolist() == [-1, 0, -1, 2]
    assert pair_sources(np.array([0, 2, 2])).tolist() == [-1, 0, 1]


@pytest.mark.parametrize("layout", ["pairs", "shared_prefix", "packed"])
def test_micro_batches_hold_their_pairs_rows(layout):
    """With 2 micro-batches and 2 processes: the global batch's rows r and pairs b of micro-batch r % 2 and
    b % 2, each micro-batch's segments numbering its pairs from 0, and each pair's tokens exactly in its
    segment (the contract the step's split and segment sums rely on), in every layout."""
    pairs = random_pairs(24, max_len=16)
    parts = [BatchIterator(pairs, global_batch_size=8, pad_token_id=PAD, layout=layout, micro_batches=2,
                           process_index=p, process_count=2, shuffle=False) for p in range(2)]
    local = [p.batch(0, 1) for p in parts]
    batch = {k: np.concatenate([b[k] for b in local]) for k in local[0]}
    shared = layout != "pairs"
    for j in range(2):
        rows = {k: batch[k][j::2] for k in ("input_ids", "segment", "branch")}
        for i, index in enumerate(batch["index"][j::2]):
            mine = rows["segment"] == i
            if index < 0:
                assert not mine.any()
                continue
            chosen, _ = pairs.sequence(int(index), "chosen")
            rejected, _ = pairs.sequence(int(index), "rejected")
            if shared:
                (row,) = np.flatnonzero(mine.any(axis=1))
                assert rows["input_ids"][row][mine[row]].tolist() == pairs.shared_row(int(index))[0].tolist()
            else:
                got = [rows["input_ids"][r][mine[r]].tolist() for r in np.flatnonzero(mine.any(axis=1))]
                assert got == [chosen.tolist(), rejected.tolist()]


def test_packed_row_counts_are_multiples_of_the_devices():
    batches = BatchIterator(random_pairs(30, max_len=20), global_batch_size=16, pad_token_id=PAD, layout="packed",
                            row_multiple=4)
    assert batches.row_counts == (4, 8, 16)
    assert next(batches)["input_ids"].shape[0] % 4 == 0


@pytest.mark.parametrize("num_buckets", [3, 4])
def test_packed_step_shapes_stay_within_the_bucket_count(num_buckets):
    """Packing chooses rows per batch and row lengths; together they give at most `num_buckets` step shapes
    (rows x length) over the epochs that chose them, though the row count varies."""
    pairs = random_pairs(200, max_len=60)
    batches = BatchIterator(pairs, global_batch_size=16, pad_token_id=PAD, layout="packed", num_buckets=num_buckets)
    shapes = {next(batches)["input_ids"].shape for _ in range(3 * batches.steps_per_epoch)}
    assert len(shapes) <= num_buckets, shapes
    assert len({rows for rows, _ in shapes}) > 1  # the row count varies: the bound is not met trivially
