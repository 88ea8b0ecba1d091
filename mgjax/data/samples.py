"""LLaVA/MGM-format training records -> fixed-length model inputs, with every bad record counted and reported.

A record is ``{"id", "image"?: path, "conversations": [{"from": "human"|"gpt", "value"}, ...]}`` under an image
root. Both original codebases quietly zero a bad sample's labels and train on it anyway; here a record that cannot
be used exactly (unreadable JSON line, missing or corrupt image, ``<image>`` count not matching the images, a
tokenization that straddles a prompt/answer boundary, no trained token left within ``max_length``) becomes a
``BadSample`` carrying its id and reason, and ``BadSamples`` keeps the tally, writes the report, and stops the run
when they exceed the allowed fraction.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from mgjax.data import preprocess, templates
from mgjax.models.mgm import IMAGE_TOKEN_INDEX, MGMConfig


class BadSample(ValueError):
    def __init__(self, sample: str, reason: str, detail: str):
        super().__init__(f"sample {sample}: {reason}: {detail}")
        self.sample, self.reason, self.detail = sample, reason, detail

    def __reduce__(self):  # loader workers send bad samples back to the main process
        return BadSample, (self.sample, self.reason, self.detail)


def read_records(path: str | os.PathLike) -> Iterator[dict[str, Any] | BadSample]:
    """Records of a JSON list file or a JSONL file. In a JSONL file a line that is not JSON, not UTF-8 or not an
    object yields a ``BadSample`` naming the line (and the rest is read); in a JSON list an item that is not an
    object is one naming its index. A JSON list that cannot be read at all is a ``ValueError`` naming the file and
    where (the byte, for bad UTF-8)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(1)
        while head.isspace():
            head = f.read(1)
        f.seek(0)
        if head == b"[":
            yield from _json_list(path, f.read())
            return
        for n, raw in enumerate(f, 1):
            if raw.strip():
                yield _jsonl_record(path, n, raw)


def _json_list(path: Path, raw: bytes) -> Iterator[dict[str, Any] | BadSample]:
    try:
        items = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 at byte {e.start} ({e.reason})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    for i, item in enumerate(items):
        yield item if isinstance(item, dict) else BadSample(f"{path.name}[{i}]", "not a record", _not_object(item))


def _jsonl_record(path: Path, n: int, raw: bytes) -> dict[str, Any] | BadSample:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return BadSample(f"{path.name}:{n}", "unreadable JSON line", f"not UTF-8 at byte {e.start} of the line")
    except json.JSONDecodeError as e:
        return BadSample(f"{path.name}:{n}", "unreadable JSON line", str(e))
    return record if isinstance(record, dict) else BadSample(f"{path.name}:{n}", "not a record", _not_object(record))


def _not_object(item: Any) -> str:
    return f"a JSON {type(item).__name__} ({json.dumps(item)[:80]}) instead of an object"


class TooManyBadSamples(RuntimeError):
    pass


@dataclass
class BadSamples:
    """The tally of skipped records. ``check`` raises once they exceed ``max_fraction`` of those seen (mid-run
    only after ``min_seen`` records, so a bad first record does not end a run on its own)."""

    max_fraction: float = 0.01
    min_seen: int = 100
    seen: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def ok(self) -> None:
        self.seen += 1

    def add(self, bad: BadSample) -> None:
        self.seen += 1
        self.reasons[bad.reason] += 1
        self.examples.setdefault(bad.reason, []).append(f"{bad.sample}: {bad.detail}")

    @property
    def count(self) -> int:
        return sum(self.reasons.values())

    def check(self, final: bool = False) -> None:
        if (final or self.seen >= self.min_seen) and self.count > self.max_fraction * self.seen:
            raise TooManyBadSamples(
                f"{self.count} of {self.seen} samples are unusable (> {self.max_fraction:.1%}): "
                + "; ".join(f"{r}: {n}" for r, n in self.reasons.most_common())
                + " (see the bad-sample report)"
            )

    def state(self) -> dict:
        """What a checkpoint keeps of the tally, so that a resumed run's report is the uninterrupted run's."""
        return {"seen": self.seen, "reasons": dict(self.reasons), "examples": self.examples}

    def restore(self, state: dict) -> None:
        self.seen, self.reasons = state["seen"], Counter(state["reasons"])
        self.examples = {reason: list(found) for reason, found in state["examples"].items()}

    def write(self, path: str | os.PathLike) -> None:
        report = {"seen": self.seen, "skipped": self.count, "by_reason": dict(self.reasons), "samples": self.examples}
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False))
        os.replace(tmp, path)


@dataclass(frozen=True)
class MGMSamples:
    """One record -> ``input_ids``/``labels`` [max_length] (right-padded with ``pad_id`` / -100) and
    ``images``/``images_aux`` (zeros for text-only records, which still carry a ``has_image`` of 0).
    ``pad_to_square``: stage 2 and inference (MGM's ``image_aspect_ratio='pad'``); stage 1 centre-crops."""

    config: MGMConfig
    tokenizer: Any
    template: str
    image_folder: str
    max_length: int = 2048
    pad_to_square: bool = True
    pad_id: int = 0
    exif_transpose: bool = False  # preprocess.rgb's option; MGM does not turn images upright
    max_image_pixels: int = preprocess.MAX_IMAGE_PIXELS
    allow_outside: bool = False  # image paths may leave image_folder

    def _image(self, record, sample: str):
        name = record.get("image")
        if name is None:
            return None
        if not isinstance(name, (str, preprocess.EncodedImage)):
            raise BadSample(sample, "unsupported image field", f"{name!r} (one image path per sample)")
        path = located(record, self.image_folder, name, sample=sample, anywhere=self.allow_outside)
        try:
            return preprocess.load_image(path, exif_transpose=self.exif_transpose, max_pixels=self.max_image_pixels)
        except preprocess.ImageError as e:
            raise BadSample(sample, "missing or corrupt image", str(e)) from None

    def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        sample = str(record.get("id", "?"))
        c = self.config
        image = self._image(record, sample)
        convs = record.get("conversations")
        if not isinstance(convs, list):
            raise BadSample(sample, "no conversations", f"{type(convs).__name__} instead of a list")
        if not convs:
            raise BadSample(sample, "empty conversation", "no turns")
        _check_turns(convs, sample)
        marks = sum(str(t.get("value", "")).count(templates.IMAGE) for t in convs if isinstance(t, dict))
        if marks != int(image is not None):
            raise BadSample(
                sample, "<image> count mismatch", f"{marks} placeholders for {int(image is not None)} image"
            )
        try:
            segments = templates.render(templates.get(self.template), convs, sample=sample)
            ids, labels = templates.encode(
                segments, self.tokenizer, sample=sample, image_id=IMAGE_TOKEN_INDEX, image_tokens=c.tokens_per_image
            )
        except templates.TokenizationError as e:
            raise BadSample(sample, "tokenization mismatch", str(e)) from None
        ids, labels = ids[: self.max_length], labels[: self.max_length]
        if image is not None and (ids == IMAGE_TOKEN_INDEX).sum() != c.tokens_per_image:
            raise BadSample(sample, "over-length", f"the image tokens end past max_length {self.max_length}")
        if not (labels != templates.IGNORE_INDEX).any():
            raise BadSample(sample, "over-length", f"no answer token within max_length {self.max_length}")
        out_ids = np.full(self.max_length, self.pad_id, np.int32)
        out_labels = np.full(self.max_length, templates.IGNORE_INDEX, np.int32)
        out_ids[: len(ids)], out_labels[: len(labels)] = ids, labels
        images, aux = self._pixels(image)
        return {
            "input_ids": out_ids,
            "labels": out_labels,
            "attention_mask": (np.arange(self.max_length) < len(ids)),
            "images": images,
            "images_aux": aux,
            "has_image": np.int32(image is not None),
        }

    def _pixels(self, image) -> tuple[np.ndarray, np.ndarray]:
        c = self.config
        if image is None:
            s = c.vision.image_size
            shape = (3, s, s) if c.image_grid == 1 else (c.views, 3, s, s)
            return np.zeros(shape, np.float32), np.zeros((3, c.image_size_aux, c.image_size_aux), np.float32)
        return mgm_pixels(c, image, pad=self.pad_to_square)


@dataclass(frozen=True)
class InternVLSamples:
    """One InternVL annotation record (spec internvl.md 5.1: single image, ``image`` as a list for several, none
    for text) -> ``input_ids``/``labels`` [max_length] and ``pixel_values`` [tile_slots, 3, S, S] (the record's
    tiles first, zeros after; ``tiles`` counts them). Each image is tiled dynamically with at most
    ``max_dynamic_patch`` tiles, or ``max_dynamic_patch // images`` each when a record has several (InternVL's
    per-image budget), a thumbnail added; ``<image>`` is prepended to the first human turn of a one-image
    record that lacks it, as InternVL's loader does."""

    config: Any  # InternVLConfig
    tokenizer: Any
    template: str
    image_folder: str
    max_length: int = 4096
    max_dynamic_patch: int = 12
    tile_slots: int = 13
    pad_id: int = 0
    exif_transpose: bool = False  # preprocess.rgb's option; InternVL does not turn images upright
    max_image_pixels: int = preprocess.MAX_IMAGE_PIXELS
    allow_outside: bool = False  # image paths may leave image_folder

    def _images(self, record, sample: str) -> list:
        names = record.get("image")
        names = [] if names is None else names if isinstance(names, list) else [names]
        if not all(isinstance(n, (str, preprocess.EncodedImage)) for n in names):
            raise BadSample(sample, "unsupported image field", f"{record.get('image')!r}")
        paths = [located(record, self.image_folder, n, sample=sample, anywhere=self.allow_outside) for n in names]
        try:
            return [
                preprocess.load_image(p, exif_transpose=self.exif_transpose, max_pixels=self.max_image_pixels)
                for p in paths
            ]
        except preprocess.ImageError as e:
            raise BadSample(sample, "missing or corrupt image", str(e)) from None

    def _conversations(self, record, sample: str, images: int) -> list:
        convs = record.get("conversations")
        if not isinstance(convs, list):
            raise BadSample(sample, "no conversations", f"{type(convs).__name__} instead of a list of turns")
        if not convs:
            raise BadSample(sample, "empty conversation", "no turns")
        _check_turns(convs, sample)
        _check_turns(convs, sample)
        marks = sum(str(t.get("value", "")).count(templates.IMAGE) for t in convs)
        if images == 1 and marks == 0:
            convs = [{**convs[0], "value": templates.IMAGE + "\n" + str(convs[0].get("value", ""))}, *convs[1:]]
            marks = 1
        if marks != images:
            raise BadSample(sample, "<image> count mismatch", f"{marks} placeholders for {images} images")
        return convs

    def _tiles(self, images: list, sample: str) -> list[np.ndarray]:
        budget = max(1, self.max_dynamic_patch // max(len(images), 1))
        tiles = [
            preprocess.internvl_pixels(img, max_num=budget, image_size=self.config.vision.image_size) for img in images
        ]
        if sum(len(t) for t in tiles) > self.tile_slots:
            raise BadSample(sample, "too many tiles", f"{sum(len(t) for t in tiles)} tiles for {self.tile_slots} slots")
        return tiles

    def _encode(self, record: dict[str, Any], generation: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """(ids, labels, pixel_values [tile_slots, 3, S, S], tiles used); ``generation``: the prompt alone, up to
        the assistant prefix of the last answer (which is left out)."""
        sample = str(record.get("id", "?"))
        images = self._images(record, sample)
        convs = self._conversations(record, sample, len(images))
        if generation:
            convs = convs[:-1] if len(convs) % 2 == 0 else convs
        tiles = self._tiles(images, sample)
        counts = iter([len(t) for t in tiles])
        try:
            segments = [
                templates.Segment(
                    templates.expand_internvl_images(
                        seg.text,
                        [next(counts) for _ in range(seg.text.count(templates.IMAGE))],
                        self.config.tokens_per_tile,
                    ),
                    seg.trained,
                )
                for seg in templates.render(templates.get(self.template), convs, sample=sample, generation=generation)
            ]
            ids, labels = templates.encode(segments, self.tokenizer, sample=sample)
        except templates.TokenizationError as e:
            raise BadSample(sample, "tokenization mismatch", str(e)) from None
        if len(ids) > self.max_length:
            raise BadSample(sample, "over-length", f"{len(ids)} tokens for max_length {self.max_length}")
        s = self.config.vision.image_size
        pixels = np.zeros((self.tile_slots, 3, s, s), np.float32)
        if tiles:
            stacked = np.concatenate(tiles)
            pixels[: len(stacked)] = stacked
        return ids, labels, pixels, sum(len(t) for t in tiles)

    def __call__(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        ids, labels, pixels, tiles = self._encode(record, generation=False)
        out_ids = np.full(self.max_length, self.pad_id, np.int32)
        out_labels = np.full(self.max_length, templates.IGNORE_INDEX, np.int32)
        out_ids[: len(ids)], out_labels[: len(labels)] = ids, labels
        return {
            "input_ids": out_ids,
            "labels": out_labels,
            "attention_mask": np.arange(self.max_length) < len(ids),
            "pixel_values": pixels,
            "tiles": np.int32(tiles),
        }

    def prompt(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
        """The record's generation prompt (its last answer left out): unpadded ``input_ids`` [T] and
        ``pixel_values`` [tile_slots, 3, S, S]."""
        ids, _, pixels, _ = self._encode(record, generation=True)
        return {"input_ids": ids.astype(np.int32), "pixel_values": pixels}


def mgm_pixels(config: MGMConfig, image, *, pad: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(images, images_aux)`` of one PIL image at the model's own sizes (``preprocess.mgm_images``)."""
    return preprocess.mgm_images(
        image,
        image_size_aux=config.image_size_aux,
        image_grid=config.image_grid,
        image_global=config.image_global,
        image_size=config.vision.image_size,
        pad=pad,
    )


def _check_turns(convs: list, sample: str) -> None:
    for i, turn in enumerate(convs):
        if not isinstance(turn, dict) or not isinstance(turn.get("value", ""), str):
            raise BadSample(sample, "malformed turn", f"turn {i} is {json.dumps(turn)[:80]}, not {{from, value}}")


IMAGE_ROOT_KEY = "image_root"  # set by meta.rooted: the folder a record's image paths are relative to


def located(record: dict, folder: str, image: str | preprocess.EncodedImage, *, sample: str, anywhere: bool = False):
    """A record's image: its path under its folder (``IMAGE_ROOT_KEY``, else ``folder``), or the bytes a shard
    carried (``data.shards``). A path that leaves the folder (absolute, or ``..`` past it) is a bad sample unless
    ``anywhere`` (``data.allow_paths_outside_image_folder``)."""
    if isinstance(image, preprocess.EncodedImage):
        return image
    if not anywhere and escapes(image):
        raise BadSample(sample, "image path outside image_folder", f"{image!r} (data.allow_paths_outside_image_folder)")
    return Path(record.get(IMAGE_ROOT_KEY) or folder) / image


def escapes(name: str) -> bool:
    """Whether a relative image path leads out of its folder: absolute, or up past it with ``..``."""
    return os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir


class Safe:
    """``make`` with a bad record turned into its ``BadSample`` value (picklable, so it crosses to loader workers)."""

    def __init__(self, make: Callable[[dict], dict]):
        self.make = make

    def __call__(self, record):
        if isinstance(record, BadSample):
            return record
        try:
            return self.make(record)
        except BadSample as bad:
            return bad
        except Exception as e:  # one record never ends a run: whatever it raises, it is counted and reported
            sample = str(record.get("id", "?")) if isinstance(record, dict) else "?"
            return BadSample(sample, "unusable record", f"{type(e).__name__}: {e}")


def tally(items: Iterable, report: BadSamples) -> Iterator[dict[str, np.ndarray]]:
    """The good items of a stream of samples and ``BadSample`` values; the bad ones go to ``report``, which is
    checked after each item and at the end."""
    for item in items:
        if isinstance(item, BadSample):
            report.add(item)
        else:
            report.ok()
            yield item
        report.check()
    report.check(final=True)


def build(records, make, report: BadSamples) -> Iterator[dict[str, np.ndarray]]:
    """``make`` applied to each record in this process, bad records skipped and tallied."""
    return tally(map(Safe(make), records), report)
