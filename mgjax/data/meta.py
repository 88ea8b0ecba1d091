"""InternVL meta files (``{name: {root, annotation, repeat_time, length, ...}}`` over JSONL annotations, spec
internvl.md 5.2) and the general-to-domain data mix of Mini-InternVL's domain adaptation (the paper's 1:4 and 1:1).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

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
    records: list[dict]
    length: int | None = None
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    min_dynamic_patch: int | None = None


_REQUIRED = ("root", "annotation", "repeat_time")
_OPTIONAL = ("length", "data_augment", "max_dynamic_patch", "min_dynamic_patch")


def read_meta(path: str | os.PathLike, base: str | os.PathLike | None = None) -> list[Source]:
    """Sources of an InternVL meta file ``{name: {root, annotation, repeat_time, length?, data_augment?,
    max_dynamic_patch?, min_dynamic_patch?}}`` (spec 5.2), in file order. Relative ``root`` / ``annotation`` paths
    resolve against ``base`` (default: the meta file's folder, so a meta file and its data move together).
    Any other key, a missing or mistyped one, an annotation that is not ``.jsonl`` or a bad JSONL line is a
    ``ValueError`` naming the file and the key."""
    path = Path(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{path}: expected a non-empty JSON object of datasets")
    folder = Path(base) if base is not None else path.parent
    return [_source(path, name, entry, folder) for name, entry in meta.items()]


def _source(path: Path, name: str, entry: Any, folder: Path) -> Source:
    where = f"{path}: {name}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object")
    for key in entry:
        if key not in _REQUIRED + _OPTIONAL:
            raise ValueError(f"{where}.{key}: unknown key (known: {', '.join(_REQUIRED + _OPTIONAL)})")
    for key in _REQUIRED:
        if key not in entry:
            raise ValueError(f"{where}.{key}: missing")
    for key in ("root", "annotation"):
        if not isinstance(entry[key], str):
            raise ValueError(f"{where}.{key}: expected a path string, got {entry[key]!r}")
    if not entry["annotation"].endswith("jsonl"):
        raise ValueError(f"{where}.annotation: {entry['annotation']!r} is not a .jsonl file")
    options = {key: _option(where, key, entry[key]) for key in _OPTIONAL if key in entry}
    repeat_time = _repeat_time(where, entry["repeat_time"])
    annotation = folder / entry["annotation"]
    records = _read_records(where, annotation, repeat_time)
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
        return items * int(repeat_time)
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


def rooted(record: dict, root: str | os.PathLike) -> dict:
    """A copy of ``record`` with its image path(s) under its source's ``root``, so that records of several sources
    can share one loader (anything that is not a path is left for the loader to reject)."""
    image = record.get("image")
    if isinstance(image, str):
        return {**record, "image": str(Path(root) / image)}
    if isinstance(image, list):
        return {**record, "image": [str(Path(root) / i) if isinstance(i, str) else i for i in image]}
    return record


def mix(domain: Sequence[Source], general: Sequence[Source], ratio: float, seed: int = 0) -> list[dict]:
    """Domain data plus general data at ``general : domain = ratio : 1`` (the paper's 1:4 is ``ratio=0.25``, its
    1:1 is ``ratio=1``), shuffled, every record a copy tagged ``"source": <source name>`` (look its image root up
    by that name).

    Every domain record is kept once. The general sources together contribute ``round(ratio * n_domain)``
    records (halves round up), split between them in proportion to their record counts (largest remainder, ties
    to the earlier source), so the meta file's ``repeat_time`` still weights them. A source asked for fewer
    records than it has gives a random subset without replacement; asked for more, it gives whole copies plus
    such a subset. ``seed`` fixes the draw and the shuffle."""
    if not finite(ratio) or ratio < 0:
        raise ValueError(f"ratio must be a number >= 0, got {ratio!r}")
    n_domain = sum(len(s.records) for s in domain)
    counts = _allocate(math.floor(ratio * n_domain + 0.5), [len(s.records) for s in general])
    rng = random.Random(seed)
    mixed = [_tagged(r, s.name) for s in domain for r in s.records]
    for source, count in zip(general, counts):
        mixed += [_tagged(r, source.name) for r in _draw(source.records, count, rng)]
    rng.shuffle(mixed)
    return mixed


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


def _draw(records: list[dict], count: int, rng: random.Random) -> list[dict]:
    if not count:
        return []
    copies, rest = divmod(count, len(records))
    return records * copies + rng.sample(records, rest)


def _tagged(record: dict, name: str) -> dict:
    return {**record, SOURCE_KEY: name}
