"""Scoring of generated answers to the domain tasks ``mgjax.data.formatters`` writes: grounding (a box in the answer)
and multiple-choice classification (an option letter), the way InternVL's evaluation scores them (spec
internvl.md 4.2, 5.3, 8). Pure Python: the answers come from a generation run made elsewhere.

- Boxes: InternVL's RefCOCO evaluation (``eval/refcoco/evaluate_grounding.py``, spec 4.2) finds boxes with
  ``\\[*\\[(.*?),(.*?),(.*?),(.*?)\\]\\]*`` anywhere in the answer, ``<ref>``/``<box>`` or not, and scores the first.
  ``BOX`` keeps that (the inner ``[...]`` of four values, whatever brackets wrap it, in order) but takes only
  numbers between the commas: InternVL's lazy groups let a non-numeric bracket such as ``[a, b]`` run on into the
  next box, whose values then fail to convert and score as ``(0, 0, 0, 0)``.
- Not kept from RefCOCO: its reading of boxes whose four numbers sum to < 4 as 0-1 coordinates; the formatters
  write 0-1000 integers only, and the rule would misread a small box at the origin such as ``[0, 0, 1, 1]``.
- IoU is the continuous form of torchvision's ``box_iou`` that RefCOCO uses (not the ``+ 1`` pixel form of
  ``rs_det/caculate.py``); an answer is right at IoU >= 0.5, as in RefCOCO (``rs_det`` needs > 0.5).
- ``to_pixels`` is ``rs_det``'s ``transform_bbox``: ``v / 1000 * extent`` clamped to the image (spec 5.3).
- Choices: InternVL's MMBench script only writes predictions and leaves scoring to the MMBench evaluator (spec 8),
  whose rule (VLMEvalKit ``can_infer_option``) comes first: ``.()[],:;!*#{}`` become spaces and the answer is the
  one option letter among the words, except that a lone ``A`` among more than three words is taken for the
  article. Failing that, an answer whose whole text is one option's label (case-insensitive, spaces collapsed, a
  final period dropped) picks that option. Unlike VLMEvalKit's ``can_infer_text``, a label only contained in the
  answer does not count, so ``car`` is not read out of ``carrier``.

An answer with no box, or no single choice, is wrong and counted in ``unparsed``; a malformed reference is an
error, since it is the data, not the model, that is broken.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

from mgjax.data.meta import finite

Box = tuple[float, float, float, float]
Size = tuple[float, float]

NORMALISED = 1000  # the formatters' frame: int(v / extent * 1000)
THRESHOLD = 0.5
_NUMBER = r"\s*(-?(?:\d+\.?\d*|\.\d+))\s*"
BOX = re.compile(r"\[" + ",".join([_NUMBER] * 4) + r"\]")
OPTION_PUNCTUATION = re.compile(r"[.()\[\],:;!*#{}]")
ARTICLE_WORDS = 3  # past this many words a lone "A" is more likely the article than the option (VLMEvalKit)


# --- boxes -------------------------------------------------------------------------------------------------------


def parse_boxes(text: Any) -> list[Box]:
    """Every ``[x1, y1, x2, y2]`` in ``text``, in order, as floats (several from one ``<box>[[..], [..]]</box>``);
    ``[]`` for text without one, and for a non-string (an answer that is missing)."""
    if not isinstance(text, str):
        return []
    boxes = [tuple(float(v) for v in match) for match in BOX.findall(text)]
    return [box for box in boxes if all(math.isfinite(v) for v in box)]  # a 400-digit number reads as inf


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes; 0 when they do not overlap or either is empty or
    inverted."""
    inter = _span(max(a[0], b[0]), min(a[2], b[2])) * _span(max(a[1], b[1]), min(a[3], b[3]))
    return inter / (_area(a) + _area(b) - inter) if inter > 0 else 0.0


def _span(lo: float, hi: float) -> float:
    return max(0.0, hi - lo)


def _area(box: Sequence[float]) -> float:
    return _span(box[0], box[2]) * _span(box[1], box[3])


def to_pixels(box: Sequence[float], size: Sequence[float]) -> Box:
    """A 0-1000 box -> pixels of a ``size = (width, height)`` image: ``v / 1000 * extent``, clamped to the
    image as InternVL's remote-sensing grounding evaluation does."""
    size = _size(size)
    return _clamped([v / NORMALISED * e for v, e in zip(box, size * 2)], size)


def _size(size: Any) -> Size:
    if not isinstance(size, Sequence) or len(size) != 2 or not all(finite(e) and e > 0 for e in size):
        raise ValueError(f"image size {size!r} is not (width, height) > 0")
    return tuple(size)


def _clamped(box: Sequence[float], size: Size) -> Box:
    return tuple(min(max(float(v), 0.0), e) for v, e in zip(box, size * 2))


def _reference_box(reference: Any) -> Box:
    boxes = parse_boxes(reference) if isinstance(reference, str) else [reference]
    box = boxes[0] if len(boxes) == 1 else None
    if not isinstance(box, Sequence) or len(box) != 4 or not all(finite(v) for v in box):
        raise ValueError(f"reference {reference!r} is not one box [x1, y1, x2, y2]")
    return tuple(float(v) for v in box)


def _judge_box(answer: Any, reference: Any, size: Sequence[float] | None) -> dict:
    """The answer's first box (as written, 0-1000), its IoU with the reference and whether that is >= 0.5."""
    target = _reference_box(reference)
    if size is not None:
        _size(size)  # checked even when the answer has no box, so bad data shows on every record
    boxes = parse_boxes(answer)
    if not boxes:
        return {"box": None, "iou": None, "right": False}
    # clamped in both frames, so an answer scores the same whether its reference is normalised or in pixels
    box = _clamped(boxes[0], (NORMALISED, NORMALISED)) if size is None else to_pixels(boxes[0], size)
    overlap = iou(box, target)
    return {"box": boxes[0], "iou": overlap, "right": overlap >= THRESHOLD}


def grounding_accuracy(
    predictions: Sequence[Any], references: Sequence[Any], sizes: Sequence[Sequence[float]] | None = None
) -> dict:
    """Share of answers whose first box has IoU >= 0.5 with the reference box.

    A reference is ``[x1, y1, x2, y2]`` or a text holding exactly one box (such as a formatter's answer). Without
    ``sizes`` references are in the 0-1000 frame the formatters write, and answers are compared as given (clamped
    to 0..1000). With ``sizes``, one ``(width, height)`` per sample, references are pixel boxes of the images and
    each answer goes through ``to_pixels`` first: IoU is unchanged by the scaling, but the references keep the
    fractions of a pixel that normalising truncates. Returns ``{"right", "total", "accuracy", "unparsed"}``."""
    sizes = [None] * len(predictions) if sizes is None else sizes
    return _summary(_judged(_judge_box, range(len(predictions)), predictions, references, sizes), "box")


# --- multiple choice ---------------------------------------------------------------------------------------------


def extract_choice(text: Any, options: Mapping[str, str]) -> str | None:
    """The option letter (a key of ``options``, ``{letter: label}``) that ``text`` answers, or ``None`` when no
    single option can be read from it. Letters are matched case-sensitively, as a lower-case ``a`` is a word."""
    if not isinstance(text, str):
        return None
    return _letter(text, options) or _label(text, options)


def _letter(text: str, options: Mapping[str, str]) -> str | None:
    words = OPTION_PUNCTUATION.sub(" ", text).split()
    hits = [letter for letter in options if letter in words]
    if len(hits) != 1 or (hits == ["A"] and len(words) > ARTICLE_WORDS):
        return None
    return hits[0]


def _label(text: str, options: Mapping[str, str]) -> str | None:
    said = _plain(text)
    hits = [letter for letter, label in options.items() if _plain(str(label)) == said]
    return hits[0] if len(hits) == 1 else None


def _plain(text: str) -> str:
    return " ".join(text.strip().rstrip(".").split()).casefold()


def _reference_letter(reference: Any, options: Any) -> str:
    """The reference's letter; a label is accepted too, for records written with ``letters=False``."""
    if not isinstance(options, Mapping) or not options:
        raise ValueError(f"options {options!r} are not a non-empty mapping of letters to labels")
    if isinstance(reference, str) and reference in options:
        return reference
    letters = [letter for letter, label in options.items() if label == reference]
    if len(letters) != 1:
        raise ValueError(f"reference {reference!r} is neither an option letter nor one option's label")
    return letters[0]


def _judge_choice(answer: Any, reference: Any, options: Any) -> dict:
    target = _reference_letter(reference, options)
    choice = extract_choice(answer, options)
    return {"choice": choice, "reference": target, "right": choice == target}


def choice_accuracy(
    predictions: Sequence[Any], references: Sequence[Any], options_list: Sequence[Mapping[str, str]]
) -> dict:
    """Share of answers whose extracted choice is the reference letter (or the letter of the reference label), one
    ``{letter: label}`` per sample. Returns ``{"right", "total", "accuracy", "unparsed"}``."""
    results = _judged(_judge_choice, range(len(predictions)), predictions, references, options_list)
    return _summary(results, "choice")


# --- both --------------------------------------------------------------------------------------------------------


def _judged(judge: Callable[..., dict], ids: Sequence[Any], *columns: Sequence[Any]) -> list[dict]:
    """``judge`` over the samples in order, each result led by its id; a bad reference names its sample."""
    if any(len(column) != len(ids) for column in columns):
        raise ValueError(f"{len(ids)} samples, but columns of lengths {[len(c) for c in columns]}")
    results = []
    for sample_id, *values in zip(ids, *columns):
        try:
            results.append({"id": sample_id, **judge(*values)})
        except ValueError as e:
            raise ValueError(f"sample {sample_id!r}: {e}") from None
    return results


def _summary(results: Sequence[dict], parsed_key: str) -> dict:
    right, total = sum(r["right"] for r in results), len(results)
    return {
        "right": right,
        "total": total,
        "accuracy": right / total if total else 0.0,
        "unparsed": sum(r[parsed_key] is None for r in results),
    }


JUDGES = {"grounding": (_judge_box, "box"), "choice": (_judge_choice, "choice")}


def _column(records: Sequence[Mapping[str, Any]], key: str) -> list[Any]:
    missing = [i for i, record in enumerate(records) if key not in record]
    if missing:
        raise ValueError(f"records at positions {missing[:5]} have no {key!r}")
    return [record[key] for record in records]


def _unique_ids(records: Sequence[Mapping[str, Any]]) -> list[Any]:
    ids = _column(records, "id")
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise ValueError(f"ids {repeated[:5]} repeat, so results could not be joined back to samples")
    return ids


def _third_column(kind: str, records: Sequence[Mapping[str, Any]], pixels: bool) -> list[Any]:
    if kind == "choice":
        return _column(records, "options")
    if not pixels:
        return [None] * len(records)
    return list(zip(_column(records, "width"), _column(records, "height")))


def score(kind: str, records: Sequence[Mapping[str, Any]], *, pixels: bool = False) -> dict:
    """Score a generation run of ``kind`` ``"grounding"`` or ``"choice"``.

    ``records``: dicts with a unique ``id``, ``answer`` (the model's output; ``None`` when it gave none) and
    ``reference``; choice records also carry ``options`` (``{letter: label}``). ``pixels=True`` (grounding only):
    each record also has ``width`` and ``height`` and its reference is a pixel box (see ``grounding_accuracy``).
    Returns ``{"summary": {"right", "total", "accuracy", "unparsed"}, "results": [...]}`` with one result per
    record, in order: ``{"id", "box", "iou", "right"}`` (the box as the answer wrote it) or
    ``{"id", "choice", "reference", "right"}``."""
    if kind not in JUDGES:
        raise ValueError(f"kind must be one of {', '.join(JUDGES)}, not {kind!r}")
    if pixels and kind != "grounding":
        raise ValueError("pixels=True applies to grounding only")
    judge, parsed_key = JUDGES[kind]
    results = _judged(
        judge,
        _unique_ids(records),
        _column(records, "answer"),
        _column(records, "reference"),
        _third_column(kind, records, pixels),
    )
    return {"summary": _summary(results, parsed_key), "results": results}
