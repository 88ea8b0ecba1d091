"""Sequence packing for InternVL samples: consecutive samples share one row of ``length`` tokens and ``tiles`` tile
slots, told apart by ``segment_ids`` (1, 2, ... per sample, 0 on padding), which the decoder turns into
block-diagonal attention and positions restarting at each sample, and the loss into per-sample targets (no target
across a boundary). A row's image tokens take its tiles in order, as they do for a single sample, because both
are concatenated in sample order.

Rows are filled greedily in data order (deterministic, so a resumed run packs exactly the same rows): a sample that
does not fit closes the row and opens the next one.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from mgjax.data.templates import IGNORE_INDEX


def pack(group: list[dict[str, np.ndarray]], length: int, tiles: int, pad_id: int) -> dict[str, np.ndarray]:
    """One row from samples of ``InternVLSamples`` (each its ``attention_mask``'s tokens and ``tiles`` tiles)."""
    ids = np.full(length, pad_id, np.int32)
    labels = np.full(length, IGNORE_INDEX, np.int32)
    segments = np.zeros(length, np.int32)
    pixels = np.zeros((tiles, *group[0]["pixel_values"].shape[1:]), np.float32)
    at = used = 0
    for k, s in enumerate(group, 1):
        n, t = int(s["attention_mask"].sum()), int(s["tiles"])
        ids[at : at + n], labels[at : at + n], segments[at : at + n] = s["input_ids"][:n], s["labels"][:n], k
        pixels[used : used + t] = s["pixel_values"][:t]
        at, used = at + n, used + t
    return {
        "input_ids": ids,
        "labels": labels,
        "segment_ids": segments,
        "attention_mask": segments > 0,
        "pixel_values": pixels,
        "tiles": np.int32(used),
        "samples": np.int32(len(group)),
    }


class Packer:
    """Rows packed from a stream of samples. ``pending`` holds the sample read but not yet placed (it opens the
    next row): a checkpoint must count it as unread."""

    def __init__(self, samples: Iterator[dict[str, np.ndarray]], *, length: int, tiles: int, pad_id: int = 0):
        self.samples, self.length, self.tiles, self.pad_id = samples, length, tiles, pad_id
        self.pending: dict[str, np.ndarray] | None = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        group, tokens, tiles = [], 0, 0
        while True:
            if self.pending is None:
                try:
                    self.pending = next(self.samples)
                except StopIteration:
                    if not group:
                        raise
                    break
            s = self.pending
            n, t = int(s["attention_mask"].sum()), int(s["tiles"])
            if n > self.length or t > self.tiles:
                raise ValueError(
                    f"a sample of {n} tokens and {t} tiles cannot fit a packed row of {self.length} "
                    f"tokens and {self.tiles} tiles"
                )
            if tokens + n > self.length or tiles + t > self.tiles:
                break
            group.append(s)
            tokens, tiles, self.pending = tokens + n, tiles + t, None
        return pack(group, self.length, self.tiles, self.pad_id)
