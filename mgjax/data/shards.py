"""Training records as ArrayRecord shards with their images inside: the pod-scale form of a LLaVA JSON/JSONL file
(and of each dataset of an InternVL meta file), read with random access by grain's ``ArrayRecordDataSource``.

A shard dataset is a folder: ``records-XXXXX-of-YYYYY.array_record`` files and ``dataset.json``, the manifest,
written last (a folder without one is not a dataset). The manifest lists the shards with their record counts and
each record's ``[words, has_image]``, so length grouping never reads the shards. A record in a shard is::

    b"MGJXR1" | header length (uint32, little-endian) | header (UTF-8 JSON) | image bytes, one file after another

with the header ``{"record": {...}, "images": [byte counts]}`` (the record as written in its JSON file, image paths
kept so reports name them; the image files' bytes follow in the order of its ``image`` field), or ``{"bad":
{"sample", "reason", "detail"}}`` for a record the converter could not use (an unreadable JSONL line, a missing
image): it becomes the same ``BadSample`` the JSON loader reports, so the tally and ``data.max_bad_fraction`` are
what they would be reading the JSON file. Every field and length is checked when read; a damaged record is a bad
sample naming its shard and index, never an exception that ends the run.

Paths go through ``etils.epath``: the manifest reads from a local folder or ``gs://``. The shard files are opened
by ArrayRecord's own reader, which reads ``gs://`` only where the installed ``array_record`` has a GCS reader;
elsewhere mount the bucket (gcsfuse) and give the mount's path. The converter writes locally.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

from etils import epath

from mgjax.data import loader, preprocess
from mgjax.data.samples import BadSample, escapes

MAGIC = b"MGJXR1"
FORMAT = "mgjax-shards/1"
MANIFEST = "dataset.json"
_HEAD = struct.Struct("<I")
_BAD_KEYS = ("sample", "reason", "detail")


def is_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a shard dataset's folder (it holds a manifest)."""
    return (epath.Path(path) / MANIFEST).is_file()


def encode(record: dict, images: Sequence[bytes]) -> bytes:
    """One record and its images' file bytes as a shard entry."""
    head = json.dumps({"record": record, "images": [len(b) for b in images]}, ensure_ascii=False).encode()
    return MAGIC + _HEAD.pack(len(head)) + head + b"".join(images)


def encode_bad(bad: BadSample) -> bytes:
    head = json.dumps({"bad": {"sample": bad.sample, "reason": bad.reason, "detail": bad.detail}}).encode()
    return MAGIC + _HEAD.pack(len(head)) + head


def image_names(record: dict) -> list[str] | None:
    """The image paths of a record (``None`` where the field is not a path or a list of paths: the loader
    reports those itself)."""
    names = record.get("image")
    names = [] if names is None else names if isinstance(names, list) else [names]
    return names if all(isinstance(n, str) for n in names) else None


def decode(entry: bytes, where: str) -> dict | BadSample:
    """A shard entry back as its record, each image an ``EncodedImage``; anything malformed is a ``BadSample``
    named ``where``."""
    try:
        return _decode(entry, where)
    except (ValueError, TypeError, KeyError, struct.error) as e:
        return BadSample(where, "damaged shard record", str(e))


def _decode(entry: bytes, where: str) -> dict | BadSample:
    if not entry.startswith(MAGIC):
        raise ValueError(f"does not start with {MAGIC!r}")
    (size,) = _HEAD.unpack_from(entry, len(MAGIC))
    start = len(MAGIC) + _HEAD.size
    if start + size > len(entry):
        raise ValueError(f"header of {size} bytes runs past the entry's {len(entry)}")
    head = json.loads(entry[start : start + size].decode("utf-8"))
    if not isinstance(head, dict):
        raise ValueError("header is not a JSON object")
    if "bad" in head:
        bad = head["bad"]
        if not isinstance(bad, dict) or not all(isinstance(bad.get(k), str) for k in _BAD_KEYS):
            raise ValueError(f"bad-record header is not {{sample, reason, detail}}: {bad!r}")
        return BadSample(*(bad[k] for k in _BAD_KEYS))
    record, sizes = head.get("record"), head.get("images")
    if not isinstance(record, dict):
        raise ValueError("header has no record object")
    if not isinstance(sizes, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes):
        raise ValueError(f"image sizes are not non-negative integers: {sizes!r}")
    rest = len(entry) - start - size
    if sum(sizes) != rest:
        raise ValueError(f"image sizes add up to {sum(sizes)} bytes, {rest} follow the header")
    names = image_names(record)
    if names is None or len(names) != len(sizes):
        if sizes:
            raise ValueError(f"{len(sizes)} images for the record's image field {record.get('image')!r}")
        return record  # an image field the loader rejects itself, with its own reason
    at, images = start + size, []
    for name, n in zip(names, sizes):
        images.append(preprocess.EncodedImage(name, entry[at : at + n]))
        at += n
    if not images:
        return record
    return {**record, "image": images if isinstance(record["image"], list) else images[0]}


class Shards(Sequence):
    """A shard dataset's records by index (``decode``d), lazily: a grain random-access source that pickles to
    loader workers. ``lengths`` gives the loader's grouping lengths from the manifest alone."""

    def __init__(self, path: str | Path):
        from grain.sources import ArrayRecordDataSource  # grain's sources pull in array_record's C++ reader

        self.path = epath.Path(path)
        manifest = read_manifest(self.path)
        self.files = [str(self.path / s["path"]) for s in manifest["shards"]]
        self._source = ArrayRecordDataSource(self.files)
        self._sizes = [tuple(x) for x in manifest["sizes"]]
        if len(self._source) != len(self._sizes):
            raise ValueError(f"{self.path}: the shards hold {len(self._source)} records, the manifest says {len(self)}")

    def __len__(self) -> int:
        return len(self._sizes)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]
        return decode(self._source[i], f"{self.path.name}#{i}")

    def lengths(self, image_tokens: int) -> list[int]:
        return [loader.length(words, image, image_tokens) for words, image in self._sizes]


def read_manifest(path: epath.Path) -> dict:
    file = path / MANIFEST
    if not file.is_file():
        raise ValueError(f"{path}: not a shard dataset (no {MANIFEST}; python -m mgjax.data.convert writes one)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: not a {FORMAT} manifest")
    shards, sizes = manifest.get("shards"), manifest.get("sizes")
    ok = isinstance(shards, list) and all(
        isinstance(s, dict)
        and isinstance(s.get("path"), str)
        and "/" not in s["path"]
        and s["path"] not in ("", ".", "..")
        and isinstance(s.get("records"), int)
        and s["records"] >= 0
        for s in shards
    )
    if not ok:
        raise ValueError(f"{file}: 'shards' must list {{path: a file name in the folder, records: a count}}")
    ok = isinstance(sizes, list) and all(
        isinstance(x, list) and len(x) == 2 and isinstance(x[0], int) and x[1] in (True, False, None) for x in sizes
    )
    if not ok or len(sizes) != sum(s["records"] for s in shards):
        raise ValueError(f"{file}: 'sizes' must hold one [words, has_image] per record")
    return manifest


def write(
    records: Iterable[dict | BadSample],
    image_folder: str | Path,
    out: str | Path,
    *,
    per_shard: int,
    anywhere: bool = False,
) -> dict:
    """Write ``records`` (with the files their ``image`` fields name under ``image_folder``) as a shard dataset in
    ``out``, ``per_shard`` records a file; returns the manifest. Records the loader would reject (a missing
    image, an unreadable line or an image path leaving ``image_folder`` unless ``anywhere``) are kept as bad entries
    (``encode_bad``); the manifest counts them by reason."""
    if per_shard < 1:
        raise ValueError(f"records per shard must be at least 1, not {per_shard}")
    out, folder = Path(out), Path(image_folder)
    if (out / MANIFEST).exists():
        raise FileExistsError(f"{out} already holds a shard dataset; remove it or write elsewhere")
    out.mkdir(parents=True, exist_ok=True)
    sizes, bad, counts, writer = [], Counter(), [], None
    for record in records:  # streamed: one shard's writer open at a time, nothing held but the sizes
        if writer is None or counts[-1] == per_shard:
            writer = _next_shard(writer, out, len(counts))
            counts.append(0)
        entry = _entry(record, folder, anywhere)
        if isinstance(entry, BadSample):
            bad[entry.reason] += 1
            entry = encode_bad(entry)
        writer.write(entry)
        sizes.append(loader.words_and_image(record))  # as the JSON file's record would be grouped
        counts[-1] += 1
    if writer is None:  # no records: one empty shard, so the dataset still opens
        writer, counts = _next_shard(None, out, 0), [0]
    writer.close()
    shards = []
    for n, count in enumerate(counts):  # named once their number is known
        name = f"records-{n:05d}-of-{len(counts):05d}.array_record"
        (out / f"records-{n:05d}.partial").replace(out / name)
        shards.append({"path": name, "records": count})
    manifest = {"format": FORMAT, "records": len(sizes), "bad": dict(bad), "shards": shards, "sizes": sizes}
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest))
    tmp.replace(out / MANIFEST)  # the manifest last: a folder that has one is complete
    return manifest


def _next_shard(writer, out: Path, n: int):
    from array_record.python.array_record_module import ArrayRecordWriter

    if writer is not None:
        writer.close()
    return ArrayRecordWriter(str(out / f"records-{n:05d}.partial"), "group_size:1")


def _entry(record: Any, folder: Path, anywhere: bool) -> bytes | BadSample:
    if isinstance(record, BadSample):
        return record
    if not isinstance(record, dict):
        return BadSample("?", "not a record", f"{type(record).__name__} instead of a JSON object")
    names = image_names(record) or []
    outside = [n for n in names if escapes(n)]
    if outside and not anywhere:
        sample = str(record.get("id", "?"))
        return BadSample(sample, "image path outside image_folder", f"{outside[0]!r} (--allow-paths-outside)")
    try:
        images = [(folder / name).read_bytes() for name in names]
    except OSError as e:
        sample = str(record.get("id", "?"))
        return BadSample(sample, "missing or corrupt image", f"{e.filename}: cannot read image ({e.strerror})")
    return encode(record, images)
