"""Training batches with grain: a seeded shuffle, this host's slice of the data, samples built in worker processes,
and bad samples tallied in the main process (so the counts are exact however many workers run).

Batches are [micro_batches, per_micro, ...] numpy arrays of this host's share of the global batch. The iterator's
state (grain's position) can be saved and restored: a batch is yielded only when complete, so the state between
batches is the whole truth.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import grain
from absl import flags
import numpy as np

from mgjax.samples import BadSamples, Safe, tally


class Batches:
    def __init__(self, records: Sequence[Any], make: Callable[[dict], dict], *, batch: int, micro_batches: int = 1,
                 seed: int = 0, epochs: int = 1, process_index: int = 0, process_count: int = 1, workers: int = 0,
                 report: BadSamples | None = None):
        """``batch``: this host's examples per step (global batch / process_count), split into
        ``micro_batches`` for accumulation. Records are shuffled with ``seed`` (a fresh order each epoch), then
        host ``process_index`` takes every ``process_count``-th one."""
        if batch % micro_batches:
            raise ValueError(f"a batch of {batch} does not split into {micro_batches} micro-batches")
        ds = grain.MapDataset.source(list(records))
        ds = grain.MapDataset.concatenate([ds.shuffle(seed=seed + e) for e in range(epochs)])
        ds = ds[process_index::process_count].map(Safe(make))
        it = ds.to_iter_dataset()
        if workers:
            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app, use defaults
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        self._it = iter(it)
        self.batch, self.micro = batch, micro_batches
        self.report = report or BadSamples()
        self._good = tally(self._it, self.report)  # holds nothing between batches: grain's state is the position

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [next(self._good) for _ in range(self.batch)]  # a last partial batch is dropped (drop_last)
        return {k: np.stack([r[k] for r in rows]).reshape(self.micro, self.batch // self.micro,
                                                          *np.shape(rows[0][k])) for k in rows[0]}

    def get_state(self) -> dict:
        return self._it.get_state()

    def set_state(self, state: dict) -> None:
        self._it.set_state(state)
