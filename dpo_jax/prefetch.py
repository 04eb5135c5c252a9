"""The background batch thread: a BatchIterator's batches built ahead of the step, and started on their way
to the devices."""

from __future__ import annotations

import queue
import threading

from .batching import BatchIterator


class Prefetcher:
    """A BatchIterator's batches built `depth` steps ahead in a background thread, so that the step never waits
    for the host (padding, packing and gathering a batch costs about a millisecond, and grows with nothing but
    the batch). Its position, `state_dict()`, is the next batch handed out, not the next one built.

    With `put` (a host batch -> its arrays on the devices, started asynchronously), the thread also starts each
    batch's copy to the devices and hands out `(batch, put(batch))`: the next step's inputs are on their way to
    the devices while the current step runs. With `epoch`: that epoch's batches in order, then StopIteration,
    leaving the iterator's position alone (an evaluation pass)."""

    def __init__(self, batches: BatchIterator, depth: int = 2, put=None, epoch: int | None = None):
        self.batches, self.depth, self.put, self.epoch = batches, depth, put, epoch
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    def _positions(self, epoch: int, step: int):
        """(epoch, step) of the batches to build: those of `self.epoch`, or from (epoch, step) on."""
        if self.epoch is not None:
            yield from ((self.epoch, step) for step in range(self.batches.steps_per_epoch))
            return
        while True:
            yield epoch, step
            epoch, step = self.batches.after(epoch, step)

    def _start(self) -> None:
        self._stop = stop = threading.Event()
        self._queue = out = queue.Queue(self.depth)
        batches, put = self.batches, self.put
        positions = self._positions(batches.epoch, batches.step)

        def work() -> None:
            for epoch, step in positions:
                if stop.is_set():
                    return
                try:
                    batch = batches.batch(epoch, step)
                    item = (epoch, step, batch) if put is None else (epoch, step, (batch, put(batch)))
                except BaseException as e:  # handed to the consumer, which raises it
                    item = e
                if not self._hand_over(out, stop, item) or isinstance(item, BaseException):
                    return
            self._hand_over(out, stop, StopIteration())

        self._thread = threading.Thread(target=work, daemon=True, name="dpo-jax-batches")
        self._thread.start()

    @staticmethod
    def _hand_over(out: queue.Queue, stop: threading.Event, item) -> bool:
        """Queue `item`, waiting for room; False when closed meanwhile."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self):
        if self._queue is None:
            self._start()
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        epoch, step, batch = item
        if self.epoch is None:
            assert (epoch, step) == (self.batches.epoch, self.batches.step)
            self.batches.epoch, self.batches.step = self.batches.after(epoch, step)
        return batch

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def close(self) -> None:
        self._stop.set()
        if self._queue is not None:
            self._thread.join()
        self._queue = None
