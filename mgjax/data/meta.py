"""InternVL meta files (``{name: {root, annotation, repeat_time, length, ...}}`` over JSONL annotations, spec
internvl.md 5.2) and the general-to-domain data mix of Mini-InternVL's domain adaptation (the paper's 1:4 and 1:1).

An annotation may also be a shard dataset's folder (``data.shards``, ``python -m mgjax.data.convert --meta``): its
records are then read only when a batch needs them; the cut, the repeats and the mix are index lists over them.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from mgjax.data import loader, samples, shards

SOURCE_KEY = "source"


def finite(v: Any) -> bool:
    """A real number (not a bool), neither infinite nor NaN."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


@dataclass
class Source:
    """One dataset of a meta file, its records already cut or repeated by ``repeat_time`` (``apply_repeat_time``).
    ``root``: the folder its records' image paths are relative to."""

    name: str
    root: str
    annotation: str
    repeat_time: float
    records: Sequence[dict]
    length: int | None = None
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    min_dynamic_patch: int | None = None


_REQUIRED = ("root", "annotation", "repeat_time")
OPTIONAL = ("length", "data_augment", "max_dynamic_patch", "min_dynamic_patch")


def read_meta(path: str | os.PathLike, base: str | os.PathLike | None = None, *, repeat: bool = True) -> list[Source]:
    """Sources of an InternVL meta file ``{name: {root, annotation, repeat_time, length?, data_augment?,
    max_dynamic_patch?, min_dynamic_patch?}}`` (spec 5.2), in file order. Relative ``root`` / ``annotation`` paths
    resolve against ``base`` (default: the meta file's folder, so a meta file and its data move together).
    Any other key, a missing or mistyped one, an annotation that is not ``.jsonl`` or a bad JSONL line is a
    ``ValueError`` naming the file and the key. ``repeat=False``: each annotation's records once, as written
    (``repeat_time`` still read and checked)."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{path}: expected a non-empty JSON object of datasets")
    folder = Path(base) if base is not None else path.parent
    return [_source(path, name, entry, folder, repeat) for name, entry in meta.items()]


def _source(path: Path, name: str, entry: Any, folder: Path, repeat: bool) -> Source:
    where = f"{path}: {name}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object")
    for key in entry:
        if key not in _REQUIRED + OPTIONAL:
            raise ValueError(f"{where}.{key}: unknown key (known: {', '.join(_REQUIRED + OPTIONAL)})")
    for key in _REQUIRED:
        if key not in entry:
            raise ValueError(f"{where}.{key}: missing")
    for key in ("root", "annotation"):
        if not isinstance(entry[key], str):
            raise ValueError(f"{where}.{key}: expected a path string, got {entry[key]!r}")
    annotation = folder / entry["annotation"]
    sharded = shards.is_dataset(annotation)
    if not (sharded or entry["annotation"].endswith("jsonl")):
        raise ValueError(f"{where}.annotation: {entry['annotation']!r} is not a .jsonl file or a shard dataset")
    options = {key: _option(where, key, entry[key]) for key in OPTIONAL if key in entry}
    repeat_time = _repeat_time(where, entry["repeat_time"])
    if sharded:
        try:
            records = shards.Shards(annotation)
        except ValueError as e:
            raise ValueError(f"{where}.annotation: {e}") from None
        records = Picked(records, apply_repeat_time(range(len(records)), repeat_time if repeat else 1))
    else:
        records = _read_records(where, annotation, repeat_time if repeat else 1)
    return Source(name, str(folder / entry["root"]), str(annotation), repeat_time, records, **options)


def _option(where: str, key: str, value: Any) -> Any:
    if key == "data_augment":
        if not isinstance(value, bool):
            raise ValueError(f"{where}.{key}: expected true or false, got {value!r}")
        return value
    least = 0 if key == "length" else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < least:
        raise ValueError(f"{where}.{key}: expected an integer >= {least}, got {value!r}")
    return value


def _repeat_time(where: str, value: Any) -> float:
    if not finite(value) or value < 0:
        raise ValueError(f"{where}.repeat_time: expected a number >= 0, got {value!r}")
    if value > 1 and value != int(value):  # InternVL asserts an int here
        raise ValueError(f"{where}.repeat_time: {value} is above 1 but not a whole number")
    return value


def apply_repeat_time(items: list, repeat_time: float) -> list:
    """InternVL's ``repeat_time`` (spec 5.2): below 1 keeps the first ``int(len * repeat_time)`` items (the float
    product, as InternVL computes it; not a random subset), above 1 repeats the whole list that many times
    (``[a, b, a, b]``, the same objects again)."""
    if repeat_time < 1:
        return items[: int(len(items) * repeat_time)]
    if repeat_time > 1:
        return list(items) * int(repeat_time)
    return items


def _read_records(where: str, annotation: Path, repeat_time: float) -> list[dict]:
    if not annotation.is_file():
        raise ValueError(f"{where}.annotation: {annotation} does not exist")
    with open(annotation, encoding="utf-8") as f:
        lines = f.readlines()
    if repeat_time < 1:  # the cut counts blank lines, as InternVL's readlines() does; they are skipped after it
        lines = apply_repeat_time(lines, repeat_time)
    records = [_parse_line(where, annotation, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    return apply_repeat_time(records, repeat_time) if repeat_time > 1 else records


def _parse_line(where: str, annotation: Path, n: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}.annotation: {annotation}:{n}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}.annotation: {annotation}:{n}: expected a JSON object")
    return record


def rooted(record: Any, root: str | os.PathLike) -> Any:
    """A copy of ``record`` that says which folder its image paths are relative to (``samples.IMAGE_ROOT_KEY``: its
    source's ``root``), so that records of several sources can share one loader; the paths stay as written, so
    one leaving its root is still caught (``samples.located``)."""
    return {**record, samples.IMAGE_ROOT_KEY: str(root)} if isinstance(record, dict) else record


def mix(domain: Sequence[Source], general: Sequence[Source], ratio: float, seed: int = 0) -> Mixture:
    """Domain data plus general data at ``general : domain = ratio : 1`` (the paper's 1:4 is ``ratio=0.25``, its
    1:1 is ``ratio=1``), shuffled, every record a copy tagged ``"source": <source name>`` (look its image root up
    by that name).

    Every domain record is kept once. The general sources together contribute ``round(ratio * n_domain)``
    records (halves round up), split between them in proportion to their record counts (largest remainder, ties
    to the earlier source), so the meta file's ``repeat_time`` still weights them. A source asked for fewer
    records than it has gives a random subset without replacement; asked for more, it gives whole copies plus
    such a subset. ``seed`` fixes the draw and the shuffle. The records are read as they are asked for."""
    if not finite(ratio) or ratio < 0:
        raise ValueError(f"ratio must be a number >= 0, got {ratio!r}")
    n_domain = sum(len(s.records) for s in domain)
    counts = _allocate(math.floor(ratio * n_domain + 0.5), [len(s.records) for s in general])
    rng = random.Random(seed)
    picks = [(k, i) for k, s in enumerate(domain) for i in range(len(s.records))]
    for k, (source, count) in enumerate(zip(general, counts), len(domain)):
        picks += [(k, i) for i in _draw(range(len(source.records)), count, rng)]
    rng.shuffle(picks)
    return Mixture([*domain, *general], picks)


class Picked(Sequence):
    """``base[i]`` for each of ``indices``, each passed through ``fn`` if given, read only when asked for."""

    def __init__(self, base: Sequence, indices: Sequence[int], fn: Callable[[Any], Any] | None = None):
        self.base, self.indices, self.fn = base, np.asarray(indices, np.int64), fn

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Picked(self.base, self.indices[i], self.fn)
        item = self.base[int(self.indices[i])]
        return item if self.fn is None else self.fn(item)

    def lengths(self, image_tokens: int) -> list[int]:
        """Grouping lengths (``loader.lengths``) of the picked records; ``fn`` must leave them as they were."""
        every = loader.lengths(self.base, image_tokens)
        return [every[i] for i in self.indices.tolist()]


class Mixture(Sequence):
    """``mix``'s records: each a copy of one source's record, tagged with the source's name, read when asked for."""

    def __init__(self, sources: Sequence[Source], picks: list[tuple[int, int]]):
        self.sources, self.picks = list(sources), np.asarray(picks, np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, i) -> dict:
        k, j = (int(x) for x in self.picks[i])
        return _tagged(self.sources[k].records[j], self.sources[k].name)

    def lengths(self, image_tokens: int) -> list[int]:
        every = [loader.lengths(s.records, image_tokens) for s in self.sources]
        return [every[k][j] for k, j in self.picks.tolist()]


def _allocate(total: int, sizes: list[int]) -> list[int]:
    pool = sum(sizes)
    if total and not pool:
        raise ValueError(f"{total} general records wanted but the general sources are empty")
    if not total:
        return [0] * len(sizes)
    counts = [total * n // pool for n in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda i: -(total * sizes[i] % pool))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _draw(records: Sequence, count: int, rng: random.Random) -> list:
    if not count:
        return []
    copies, rest = divmod(count, len(records))
    return list(records) * copies + rng.sample(records, rest)


def _tagged(record: Any, name: str) -> Any:
    return {**record, SOURCE_KEY: name} if isinstance(record, dict) else record  # a bad record stays as it is
