"""Host-side batches for a jitted step from `Pairs`: mask the prompt, pad to a length bucket, in a resumable order.

Every layout gives one batch type, a dict of numpy arrays; the layouts differ only in what the rows hold:

    input_ids, position_ids   int32 [R, L]  token ids, and positions (a rejected branch restarts after its prompt)
    segment                   int32 [R, L]  which pair of its micro-batch the token belongs to; -1 padding
    branch                    int32 [R, L]  0 prompt, 1 chosen, 2 rejected; -1 padding
    source                    int32 [R, L]  for a loss target, the position in the row whose logits predict it;
                                            -1 for every other token
    pair_mask                 int32 [B]     1 for a real pair, 0 for filler
    index                     int32 [B]     the pair's index in `Pairs`, -1 filler
    ref_logps               float32 [B, 2]  the reference's (chosen, rejected) log-probs, when precomputed

Layouts (`pack_pairs`): `pairs` gives each pair two rows (prompt + chosen, prompt + rejected), R = 2B, as TRL;
`shared_prefix` one row per pair (prompt, chosen, rejected; R = B); `packed` several such pairs per row, in
segments of their own. Attention follows from segment and branch (models/attention.py), the per-pair sums
from segment and branch (logps.batch_logps), so the step has one code path for all three.

A token is a loss target when it is a completion token (EOS included, as TRL's completion_mask) with a token
before it in its branch or prompt: its `source` is the previous token's position, or for the first rejected
token of a prompt-sharing row the prompt's last position (a completion's first token counts only when the
prompt is not empty, as TRL's `completion_mask[..., 1:]`).

With gradient accumulation k, the step puts row r and pair b of the global batch in micro-batch r % k and
b % k; `segment` numbers each micro-batch's pairs from 0 (pair b is pair b // k of its micro-batch) and the
rows of a micro-batch's pair are in that micro-batch. L is one of a few bucket lengths fixed for the run, so
the step compiles once per bucket. The last batch of an epoch is filled up with filler pairs rather than
dropped.
"""

from __future__ import annotations

import math

import numpy as np

from .config import LAYOUTS
from .errors import UserError
from .pairs import Pairs

ROW_FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1)  # packed layout: rows per batch, as fractions of its pairs
PACKED_EPOCHS = 3  # packed layout: epochs whose batches choose the row lengths


def choose_buckets(lengths: np.ndarray, count: int, multiple: int, max_length: int | None) -> tuple[int, ...]:
    """At most `count` bucket lengths that minimise the padding of batches whose longest rows are `lengths`.

    Candidate lengths are multiples of `multiple` (capped at max_length); the longest bucket fits every batch.
    Exact dynamic programme over the distinct rounded lengths: O(count * n^2) for n distinct values."""
    if count < 1 or multiple < 1:
        raise UserError(f"num_length_buckets and pad_to_multiple_of must be at least 1, not {count} and {multiple}")
    rounded = -(-np.asarray(lengths, np.int64) // multiple) * multiple
    if max_length is not None:
        rounded = np.minimum(rounded, max_length)
    values, counts = np.unique(rounded, return_counts=True)
    n = len(values)
    # cost[a][b]: padding when values[a..b] all go to bucket values[b]
    weighted = np.concatenate([[0], np.cumsum(values * counts)])
    total = np.concatenate([[0], np.cumsum(counts)])

    def cost(a: int, b: int) -> int:
        return int(values[b] * (total[b + 1] - total[a]) - (weighted[b + 1] - weighted[a]))

    best = [cost(0, b) for b in range(n)]  # one bucket ending at b
    choice = [[b] for b in range(n)]
    for _ in range(1, min(count, n)):
        new_best, new_choice = list(best), [list(c) for c in choice]
        for b in range(n):
            for a in range(b):
                c = best[a] + cost(a + 1, b)
                if c < new_best[b]:
                    new_best[b], new_choice[b] = c, choice[a] + [b]
        best, choice = new_best, new_choice
    return tuple(int(values[i]) for i in choice[n - 1])


def pair_sources(branch: np.ndarray) -> np.ndarray:
    """Loss-target sources (see the module's docstring) of one pair's tokens, in their order: a prompt (0)
    followed by a chosen (1) and/or a rejected (2) branch. Positions from the pair's first token; -1: none."""
    source = np.arange(len(branch)) - 1
    prompt = int((branch == 0).sum())
    first_rejected = prompt + int((branch == 1).sum())
    if first_rejected < len(branch):  # predicted from the prompt's last token, as in its own sequence
        source[first_rejected] = prompt - 1
    source[branch == 0] = -1
    return source.astype(np.int32)


def plain_rows(input_ids_Bx2xT: np.ndarray, attention_mask_Bx2xT: np.ndarray, completion_mask_Bx2xT: np.ndarray,
               *, first_pair: int = 0, micro_batches: int = 1) -> dict[str, np.ndarray]:
    """The `pairs` layout's rows from per-sequence arrays (right padding; chosen at [:, 0], rejected at [:, 1]):
    input_ids, position_ids, segment, branch and source, [2B, T] each. `first_pair`: the global batch index of
    the first pair (a process's first); with `micro_batches` k, pair g's two rows are rows (2 (g // k) + s) k
    + g % k of the global batch and its segment g // k."""
    b, _, t = input_ids_Bx2xT.shape
    k = micro_batches
    g = first_pair + np.arange(b)
    rows = (2 * (g // k)[:, None] + np.arange(2)[None]) * k + (g % k)[:, None] - 2 * first_pair  # [B, 2]
    real = attention_mask_Bx2xT.astype(bool)
    completion = completion_mask_Bx2xT.astype(bool) & real
    index = np.arange(t)
    previous_real = np.concatenate([np.zeros((b, 2, 1), bool), real[..., :-1]], axis=-1)
    per_sequence = {
        "input_ids": input_ids_Bx2xT,
        "position_ids": np.maximum(np.cumsum(real, axis=-1) - 1, 0),
        "segment": np.where(real, (g // k)[:, None, None], -1),
        "branch": np.where(real, np.where(completion, np.arange(1, 3)[None, :, None], 0), -1),
        "source": np.where(completion & previous_real, index - 1, -1),
    }
    out = {}
    for name, x in per_sequence.items():
        out[name] = np.empty((2 * b, t), np.int32)
        out[name][rows.reshape(-1)] = x.reshape(2 * b, t)
    return out


class BatchIterator:
    """Batches of `global_batch_size` pairs in a seeded order, epoch after epoch; this process's rows only.

    With P processes, process p builds rows [p * B/P, (p + 1) * B/P) of every global batch; the bucket is chosen
    from the whole global batch, so every process pads to the same length. The position is (epoch, step):
    `state_dict()` saves it and `load_state_dict()` restores it, so a resumed run sees the same batches."""

    def __init__(self, pairs: Pairs, *, global_batch_size: int, pad_token_id: int, seed: int = 42,
                 shuffle: bool = True, buckets: tuple[int, ...] | None = None, num_buckets: int = 4,
                 multiple: int = 16, process_index: int = 0, process_count: int = 1, layout: str = "pairs",
                 micro_batches: int = 1, row_multiple: int = 1):
        if global_batch_size % process_count:
            raise UserError(f"the global batch of {global_batch_size} pairs does not divide over {process_count} "
                            f"processes; choose a batch size that is a multiple of {process_count}")
        if pad_token_id is None:
            raise UserError("the tokenizer has neither a pad token nor an EOS token to pad with; set tokenizer.pad_token")
        if len(pairs) == 0:
            raise UserError("no preference pairs are left to batch (see the data audit for why they were dropped)")
        if layout not in LAYOUTS:
            raise UserError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
        if layout != "pairs" and pairs.truncation.truncation_mode != "keep_start":
            raise UserError("prefix sharing needs truncation_mode keep_start: keep_end can cut chosen and rejected "
                            "prompts differently; with keep_end use --pack_pairs pairs")
        self.layout = layout
        self.lengths = pairs.pair_length if layout == "pairs" else pairs.shared_length
        self.pairs, self.batch_size, self.pad = pairs, global_batch_size, pad_token_id
        self.seed, self.shuffle, self._orders = seed, shuffle, {}
        self.ref_logps: np.ndarray | None = None  # set to attach precomputed reference log-probs to batches
        self.local = slice(process_index * global_batch_size // process_count,
                           (process_index + 1) * global_batch_size // process_count)
        self.steps_per_epoch = -(-len(pairs) // global_batch_size)
        cap = pairs.truncation.max_length and (pairs.truncation.max_length * (1 if layout == "pairs" else 2))
        local_pairs = global_batch_size // process_count
        self.process_count, self.process_index = process_count, process_index
        self.micro_batches = micro_batches  # the step's micro-batches: row order, segment numbers, packing
        if local_pairs % micro_batches:
            raise UserError(f"{local_pairs} pairs per process do not split into {micro_batches} micro-batches")
        # packed rows per micro-batch and process; a multiple of `row_multiple` (the devices a process splits
        # its rows over), so the rows shard like the pairs
        self.row_counts = tuple(sorted({-(-max(1, math.ceil(local_pairs // micro_batches * f)) // row_multiple)
                                        * row_multiple for f in ROW_FRACTIONS}))
        # packed: no row longer than two of the longest pairs (attention is quadratic in the row); the row
        # lengths are buckets of the packed batches' longest rows over the first PACKED_EPOCHS epochs, as many
        # as keep the step's shapes (rows x length) within `num_buckets`, and a later batch that needs more
        # gets `row_cap` (one more compiled shape, rarely)
        self.row_cap = -(-2 * int(self.lengths.max()) // multiple) * multiple
        if layout == "packed" and not buckets:
            needed = [self._packing(self.order(e)[s * self.batch_size:(s + 1) * self.batch_size])[::2]
                      for e in range(PACKED_EPOCHS if shuffle else 1) for s in range(self.steps_per_epoch)]
            def shapes(buckets):
                return len({(rows, next(b for b in buckets if b >= longest)) for rows, longest in needed})

            # the most length buckets within the shape budget; if none is within it (more row counts than
            # num_buckets), the choice with the fewest shapes
            choices = [choose_buckets([longest for _, longest in needed], count, multiple, None)
                       for count in range(num_buckets, 0, -1)]
            buckets = next((b for b in choices if shapes(b) <= num_buckets), min(choices, key=shapes))
        self.buckets = tuple(sorted(buckets or choose_buckets(self.batch_lengths(0), num_buckets, multiple, cap)))
        if self.buckets[-1] < self.lengths.max():
            raise UserError(f"the longest bucket ({self.buckets[-1]} tokens) is shorter than the longest pair "
                            f"({self.lengths.max()} tokens); give buckets up to max_length")
        self.epoch, self.step = 0, 0

    def order(self, epoch: int) -> np.ndarray:
        """Pair indices of one epoch, padded with -1 (filler) to a whole number of batches."""
        if epoch in self._orders:
            return self._orders[epoch]
        n = len(self.pairs)
        order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
        order = np.concatenate([order, np.full(self.steps_per_epoch * self.batch_size - n, -1)])
        self._orders = {epoch: order}  # (replaced whole: the batch thread may read it meanwhile)
        return order

    def batch_lengths(self, epoch: int) -> np.ndarray:
        """The longest pair of every global batch of an epoch."""
        order = self.order(epoch).reshape(self.steps_per_epoch, self.batch_size)
        lengths = np.where(order >= 0, self.lengths[np.maximum(order, 0)], 0)
        return lengths.max(axis=1)

    def bucket_for(self, length: int) -> int:
        return next((b for b in self.buckets if b >= length), max(self.row_cap, self.buckets[-1]))

    def rows_and_length(self, epoch: int, step: int) -> tuple[int, int]:
        """(token rows over all processes, row length) of global batch `step` of `epoch`, without building it:
        the shape the step computes on, for the audit's padding figures."""
        indices = self.order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]
        if self.layout == "packed":
            rows, _, longest = self._packing(indices)
            return rows * self.micro_batches * self.process_count, self.bucket_for(max(longest, 1))
        length = self.bucket_for(int(self.lengths[indices[indices >= 0]].max()))
        return self.batch_size * (2 if self.layout == "pairs" else 1), length

    def batch(self, epoch: int, step: int) -> dict[str, np.ndarray]:
        """This process's part of global batch `step` of `epoch`."""
        indices = self.order(epoch)[step * self.batch_size:(step + 1) * self.batch_size]
        if self.layout == "packed":
            return self._packed_batch(indices)
        length = self.bucket_for(int(self.lengths[indices[indices >= 0]].max()))
        local = indices[self.local]
        if self.layout == "shared_prefix":
            return self._shared_batch(local, length)
        shape = (len(local), 2, length)
        ids, attention, completion = (np.full(shape, self.pad, np.int32), np.zeros(shape, np.int32),
                                      np.zeros(shape, np.int32))
        for r, i in enumerate(local):
            if i < 0:
                continue
            for s, which in enumerate(("chosen", "rejected")):
                seq, mask = self.pairs.sequence(int(i), which)
                ids[r, s, :len(seq)], attention[r, s, :len(seq)], completion[r, s, :len(seq)] = seq, 1, mask
        out = plain_rows(ids, attention, completion, first_pair=self.local.start, micro_batches=self.micro_batches)
        out.update(pair_mask=(local >= 0).astype(np.int32), index=local.astype(np.int32))
        return self._with_ref(out, local)

    def _with_ref(self, out: dict, local: np.ndarray) -> dict:
        """Attach the precomputed reference log-probs of the batch's pairs ([b, 2]; 0 for filler pairs)."""
        if self.ref_logps is not None:
            out["ref_logps"] = np.where((local >= 0)[:, None], self.ref_logps[np.maximum(local, 0)], 0)
        return out

    def _empty_rows(self, rows: int, length: int) -> dict[str, np.ndarray]:
        return {"input_ids": np.full((rows, length), self.pad, np.int32),
                **{k: np.full((rows, length), -1, np.int32) for k in ("segment", "branch", "source")},
                "position_ids": np.zeros((rows, length), np.int32)}

    def _place_pair(self, out: dict, row: int, start: int, i: int, segment: int) -> int:
        """Pair i's prompt-sharing tokens into `row` from `start`, in `segment`; returns where they end."""
        ids, branch, positions = self.pairs.shared_row(i)
        span = slice(start, start + len(ids))
        source = pair_sources(branch)
        out["input_ids"][row, span], out["branch"][row, span], out["position_ids"][row, span] = ids, branch, positions
        out["segment"][row, span] = segment
        out["source"][row, span] = np.where(source >= 0, source + start, -1)
        return start + len(ids)

    def _shared_batch(self, local: np.ndarray, length: int) -> dict[str, np.ndarray]:
        """One row per pair: prompt, chosen, rejected (see `Pairs.shared_row`)."""
        out = self._empty_rows(len(local), length)
        for r, i in enumerate(local):
            if i >= 0:
                self._place_pair(out, r, 0, int(i), (self.local.start + r) // self.micro_batches)
        out.update(pair_mask=(local >= 0).astype(np.int32), index=local.astype(np.int32))
        return self._with_ref(out, local)

    def _packed_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Several prompt-sharing pairs per row of the run's one row length L (balanced packing), each in its
        own segment.

        Each process packs its own pairs, and within them each micro-batch's pairs separately: micro-batch j's
        m-th row is local row m * k + j. The rows per micro-batch and their length, the same everywhere, come
        from `_packing`."""
        k = self.micro_batches
        rows, packings, longest = self._packing(indices)
        length = self.bucket_for(max(longest, 1))
        local, packing = np.array_split(indices, self.process_count)[self.process_index], packings[self.process_index]
        first = self.process_index * len(local)  # the global batch index of this process's first pair
        out = self._empty_rows(rows * k, length)
        where = {int(i): n for n, i in enumerate(local)}
        for j, group in enumerate(packing):
            for m, members in enumerate(group):
                start = 0
                for i in members:
                    start = self._place_pair(out, m * k + j, start, int(i), (first + where[int(i)]) // k)
        out.update(pair_mask=(local >= 0).astype(np.int32), index=local.astype(np.int32))
        return self._with_ref(out, local)

    def _packing(self, indices: np.ndarray) -> tuple[int, list, int]:
        """(rows per micro-batch, each process's micro-batches' rows of pair indices, the longest row): the fewest
        of `row_counts` whose balanced packing keeps every row within `row_cap`."""
        k = self.micro_batches
        parts = np.array_split(indices, self.process_count)
        for rows in self.row_counts:  # the last one has a row per pair, which always fits
            packings = [[self._balanced(part[j::k], rows) for j in range(k)] for part in parts]
            longest = max((sum(int(self.lengths[i]) for i in row) for p in packings for g in p for row in g), default=0)
            if longest <= self.row_cap:
                break
        return rows, packings, longest

    def _balanced(self, indices: np.ndarray, rows: int) -> list[list[int]]:
        """Pairs into `rows` rows, longest first, each into the emptiest row (rows of about equal length)."""
        out: list[list[int]] = [[] for _ in range(rows)]
        fill = [0] * rows
        for i in sorted((int(i) for i in indices if i >= 0), key=lambda i: -self.lengths[i]):
            r = min(range(rows), key=fill.__getitem__)
            out[r].append(i)
            fill[r] += int(self.lengths[i])
        return out

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch(self.epoch, self.step)
        self.epoch, self.step = self.after(self.epoch, self.step)
        return batch

    def after(self, epoch: int, step: int) -> tuple[int, int]:
        """The position following (epoch, step)."""
        return (epoch + 1, 0) if step + 1 == self.steps_per_epoch else (epoch, step + 1)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "shuffle": self.shuffle, "layout": self.layout,
                "batch_size": self.batch_size, "buckets": list(self.buckets), "fingerprint": self.pairs.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        missing = [k for k in mine if k not in state]
        if missing:
            raise UserError(f"the saved data position lacks {', '.join(missing)}: it was not written by this "
                            f"version of dpo-jax, or the checkpoint is damaged.")
        changed = [{"layout": "layout (pack_pairs)"}.get(k, k)
                   for k in ("seed", "shuffle", "layout", "batch_size", "buckets", "fingerprint") if state[k] != mine[k]]
        if changed:
            raise UserError(f"the saved data position does not fit this run: {', '.join(changed)} changed since it "
                            f"was saved. Resume with the same data, tokenizer, truncation, batch size and seed.")
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
