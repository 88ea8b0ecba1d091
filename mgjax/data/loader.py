"""Training batches with grain: a seeded shuffle, this host's slice of the data, samples built in worker processes,
and bad samples tallied in the main process (so the counts are exact however many workers run).

Batches are [micro_batches, per_micro, ...] numpy arrays of this host's share of the global batch. The state is
how many records each process has read (good and bad: a host that skipped bad samples, or packed shorter samples,
has read further than its peers) and how many batches were served; a batch is yielded only when complete, so the
state between batches is the whole truth. Restored with as many processes, every host continues exactly; with
another process count, every host starts at the next global batch boundary (records read ahead to replace bad
samples are read again), or with packing past the records the slowest host had covered.

Shapes are static, so grouping by length pays only with ``buckets``: each batch is cut to the shortest of a few
padded lengths that holds its longest row (a handful of compiled shapes instead of one at ``max_length``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Callable, Iterator

import grain
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from mgjax.data.packing import Packer
from mgjax.data.samples import BadSamples, Safe, tally

SEQUENCE_KEYS = ("input_ids", "labels", "attention_mask", "segment_ids")


def words_and_image(record: Any) -> tuple[int, bool | None]:
    """What MGM's sampler length is made of: the conversation's whitespace words, and whether the record has an
    image (``None``: not a record at all)."""
    if not isinstance(record, dict):
        return 1, None
    words = sum(len(str(t.get("value", "")).split()) for t in record.get("conversations") or [] if isinstance(t, dict))
    return words, record.get("image") is not None


def length(words: int, image: bool | None, image_tokens: int) -> int:
    """MGM's sampler length: the words (plus the image's tokens), negative for a text-only record so the two
    modalities group apart; 1 for what is not a record (it is skipped when built, wherever it lands)."""
    if image is None:
        return 1
    return words + image_tokens if image else -max(words, 1)


def record_length(record: Any, image_tokens: int) -> int:
    return length(*words_and_image(record), image_tokens)


def lengths(records: Sequence[Any], image_tokens: int) -> list[int]:
    """``record_length`` of every record; from what a lazy sequence knows without reading them (its
    ``lengths``) where it has that."""
    if hasattr(records, "lengths"):
        return records.lengths(image_tokens)
    return [record_length(r, image_tokens) for r in records]


def grouped_order(lengths: Sequence[int], batch: int, rng: np.random.Generator, megabatch: int = 8) -> np.ndarray:
    """MGM's ``group_by_modality_length`` adapted to static shapes: each modality shuffled, cut into megabatches of
    ``megabatch`` global batches, each sorted by length and cut into batches; the batches shuffled; each
    modality's incomplete last batch merged at the end."""
    lengths = np.asarray(lengths)
    full, rest = [], []
    for group in (np.flatnonzero(lengths > 0), np.flatnonzero(lengths <= 0)):
        group = rng.permutation(group)
        for lo in range(0, len(group), batch * megabatch):
            mb = group[lo : lo + batch * megabatch]
            mb = mb[np.argsort(-np.abs(lengths[mb]), kind="stable")]
            cut = len(mb) - len(mb) % batch
            full += [mb[i : i + batch] for i in range(0, cut, batch)]
            rest.append(mb[cut:])
    full = [full[i] for i in rng.permutation(len(full))]
    return np.concatenate(full + rest) if full or rest else np.zeros(0, np.int64)


def bucket(length: int, max_length: int, buckets: int) -> int:
    """The shortest multiple of ``ceil(max_length / buckets)`` (capped at ``max_length``) that holds ``length``:
    at most ``buckets`` distinct lengths."""
    step = -(-max_length // buckets)
    return min(max_length, -(-max(length, 1) // step) * step)


class Lookup:
    """Record ``i`` of ``records``, read where the sample is built (in a loader worker, with workers): a shard
    dataset (``data.shards``) is read lazily, a list is what it was."""

    def __init__(self, records: Sequence[Any]):
        self.records = records

    def __call__(self, i) -> Any:
        return self.records[int(i)]


class Batches:
    def __init__(
        self,
        records: Sequence[Any],
        make: Callable[[dict], dict],
        *,
        batch: int,
        micro_batches: int = 1,
        seed: int = 0,
        epochs: int = 1,
        process_index: int = 0,
        process_count: int = 1,
        workers: int = 0,
        report: BadSamples | None = None,
        lengths: Sequence[int] | None = None,
        buckets: int = 1,
        pack: dict | None = None,
    ):
        """``records``: any sequence (a list, a ``shards.Shards``, a ``meta.Mixture``), read only as batches need
        them. ``batch``: this host's examples per step (global batch / process_count), split into
        ``micro_batches`` for accumulation. Records are shuffled with ``seed`` (a fresh order each epoch), or
        grouped by ``lengths`` (``record_length``) when given; host ``process_index`` takes its contiguous share
        of every global batch; each epoch's order ends on a whole global batch (the records past it wait for
        the next epoch's shuffle). ``buckets`` > 1 cuts each batch's padding (see the module docstring).
        ``pack``: ``packing.Packer``'s keywords (``length``, ``tiles``, ``pad_id``): rows of several samples each
        (a batch is then ``batch`` packed rows)."""
        if batch % micro_batches:
            raise ValueError(f"a batch of {batch} does not split into {micro_batches} micro-batches")
        records = records if isinstance(records, Sequence) else list(records)
        rng, whole = np.random.default_rng(seed), batch * process_count
        # no batch straddles two epochs' groupings
        order = np.concatenate(
            [np.zeros(0, np.int64)]
            + [
                o[: len(o) - len(o) % whole]
                for o in (
                    rng.permutation(len(records)) if lengths is None else grouped_order(lengths, whole, rng)
                    for _ in range(epochs)
                )
            ]
        )
        mine = order.reshape(-1, process_count, batch)[:, process_index]
        self._records, self._order = records, mine.reshape(-1)
        self._make, self._workers = make, workers
        self.batch, self.micro, self.buckets, self.pack = batch, micro_batches, buckets, pack
        self.process_index, self.process_count = process_index, process_count
        self.report = report or BadSamples()
        self._start(0)
        self.served = 0

    def _start(self, offset: int) -> None:
        it = grain.MapDataset.source(self._order[offset:]).map(Lookup(self._records)).map(Safe(self._make))
        it = it.to_iter_dataset()
        if self._workers:
            if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside an absl app, use defaults
                flags.FLAGS.mark_as_parsed()
            it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
        self.read = offset
        self._good = tally(self._count(iter(it)), self.report)
        self._rows = Packer(self._good, **self.pack) if self.pack else self._good

    def _count(self, items):
        for item in items:
            self.read += 1
            yield item

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [next(self._rows) for _ in range(self.batch)]  # a last partial batch is dropped (drop_last)
        self.served += 1
        out = {
            k: np.stack([r[k] for r in rows]).reshape(self.micro, self.batch // self.micro, *np.shape(rows[0][k]))
            for k in rows[0]
        }
        if self.buckets > 1:
            full = out["input_ids"].shape[-1]
            keep = bucket(int(out["attention_mask"].sum(-1).max()), full, self.buckets)
            out.update({k: out[k][..., :keep] for k in SEQUENCE_KEYS if k in out})
        return out

    def get_state(self) -> dict:
        """Every process's position and bad-sample tally: a collective, so all processes call it together. A
        sample the packer holds for its next row counts as unread (and unseen)."""
        held = int(self.pack is not None and self._rows.pending is not None)
        report = self.report.state()
        report["seen"] -= held
        read, reports = [self.read - held], [report]
        if self.process_count > 1:
            read = multihost_utils.process_allgather(np.array(read, np.int64)).reshape(-1).tolist()
            reports = _allgather_json(report)
        return {"read": read, "batches": self.served, "reports": reports}

    def set_state(self, state: dict) -> None:
        """Continue where ``state`` was taken; the tally too, this process's own (with another process count, the
        first process takes over every process's tally, so the run's totals stay whole)."""
        reports = state.get("reports", [])  # absent from checkpoints written before the tally was kept
        if len(reports) == self.process_count:
            self.report.restore(reports[self.process_index])
        elif reports and self.process_index == 0:
            self.report.restore(_merged(reports))
        read = state["read"]
        if len(read) == self.process_count:
            offset = read[self.process_index]
        elif self.pack:  # hosts packed at their own pace: restart past what the slowest one had covered
            offset = min(read) * len(read) // self.process_count
        else:
            offset = state["batches"] * self.batch
        self._start(offset)
        self.served = state["batches"]


def _allgather_json(value) -> list:
    """``value`` (JSON-able) from every process, in process order."""
    raw = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([raw.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    every = multihost_utils.process_allgather(padded).reshape(len(sizes), -1)
    return [json.loads(row[:n].tobytes()) for row, n in zip(every, sizes)]


def _merged(reports: list[dict]) -> dict:
    merged = {"seen": 0, "reasons": {}, "examples": {}}
    for r in reports:
        merged["seen"] += r["seen"]
        for reason, n in r["reasons"].items():
            merged["reasons"][reason] = merged["reasons"].get(reason, 0) + n
        for reason, found in r["examples"].items():
            merged["examples"].setdefault(reason, []).extend(found)
    return merged
