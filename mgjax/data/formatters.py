"""Domain tasks -> InternVL conversation records (the annotation JSONL the trainer reads), the way Mini-InternVL's
domain adaptation recasts them as VQA (paper Sec. 3.3 "Data Format"; spec internvl.md 5.1-5.3).

A record is ``{"id", "image": path | [path, ...], "width"?, "height"?, "conversations": [human, gpt]}``; the human
turn carries one ``<image>`` per image, written out rather than left to the loader's auto-prepend, so the text in
the file is the text the model sees. Phrasings and where they come from:

- classification, letters (default): ``<image>\\nClassify the image within one of the given classes.\\nA. ...\\nB. ...
  \\nAnswer with the option's letter from the given choices directly.`` -> ``B``. The opening is the paper's remote
  sensing prompt; the option lines and the closing sentence are InternVL's MMBench evaluation prompt (spec 8), so
  training and evaluation ask alike. ``letters=False`` gives the paper's own open form: ``Classify the
  image within one of the given classes: a, b, c. Answer with one word or short phrase.`` -> the label.
- grounding: ``Please provide the bounding box coordinate of the region this sentence describes: <ref>{expr}</ref>``
  (InternVL's RefCOCO prompt, spec 5.3) or the paper's ``Detect <ref>{expr}</ref>``; the answer is
  ``<ref>{expr}</ref><box>[[x1, y1, x2, y2]]</box>`` (spec 4.2).
- region: ``What object is in this location<box>[[...]]</box>`` -> ``<ref>{label}</ref><box>[[...]]</box>`` (the
  paper's example, verbatim, including the missing space and question mark), or for captions and region VQA
  ``Please provide a short description for this region: <box>[[...]]</box>`` (LLaVA-1.5's region-caption prompt)
  -> the text as given.
- multi-view: a preamble naming the cameras row by row (``CAMERA_LAYOUT``; the canvas itself follows InternVL's
  ``tools/images_stitching.py``), then the question.
- video: ``Frame1: <image>\\nFrame2: <image>\\n...{question}``, the tag of the paper, the model cards and the
  evaluation code (spec 4.1); fine-tuning's own ``<video>`` expansion writes ``Frame-1:`` (spec 9.13), but these
  records list the frames as images, so what is written here is what is trained on.

Boxes are pixel ``(x1, y1, x2, y2)`` of the image as stored (no EXIF rotation, as InternVL opens it), normalised to
``int(v / extent * 1000)`` (spec 4.2).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping, Sequence

from PIL import Image, ImageDraw, ImageFont

from mgjax.cli import HelpFormatter
from mgjax.data.meta import finite

CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")
GRID_COLUMNS = 3
VIEW_SIZE = (896, 448)  # two 448 tiles per camera, so dynamic tiling cuts the canvas at the view borders
CANVAS_SIZE = (VIEW_SIZE[0] * GRID_COLUMNS, VIEW_SIZE[1] * len(CAMERAS) // GRID_COLUMNS)
TAG_COLOUR = (255, 0, 255)
TAG_FONT = ("DejaVuSans-Bold.ttf", 50)
CAMERA_LAYOUT = (
    "The image stitches six camera views in two rows. Top row, left to right: {}. Bottom row, left to right: {}."
).format(", ".join(CAMERAS[:GRID_COLUMNS]), ", ".join(CAMERAS[GRID_COLUMNS:]))

CLASSIFY = "Classify the image within one of the given classes"
LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
OPEN_SUFFIX = "Answer with one word or short phrase."
GROUNDING_QUESTION = (
    "Please provide the bounding box coordinate of the region this sentence describes: <ref>{expr}</ref>"
)
DETECT_QUESTION = "Detect <ref>{expr}</ref>"
REGION_LABEL_QUESTION = "What object is in this location<box>{box}</box>"
REGION_TEXT_QUESTION = "Please provide a short description for this region: <box>{box}</box>"
IMAGE = "<image>"

Size = tuple[int, int]


def _fail(sample_id: Any, reason: str) -> ValueError:
    return ValueError(f"sample {sample_id}: {reason}")


def _record(sample_id: Any, image: str | list[str], human: str, answer: str, size: Size | None = None) -> dict:
    """The record, refusing text that would add ``<image>`` placeholders the loader would pair with no image."""
    n_images = len(image) if isinstance(image, list) else 1
    if human.count(IMAGE) != n_images or IMAGE in answer:
        raise _fail(sample_id, f"the question or answer text itself contains {IMAGE}")
    record: dict[str, Any] = {"id": sample_id, "image": image}
    if size is not None:
        record["width"], record["height"] = size
    record["conversations"] = [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return record


def _single(sample_id: Any, image: str, question: str, answer: str, size: Size | None = None) -> dict:
    return _record(sample_id, image, f"{IMAGE}\n{question}", answer, size)


def _fill(template: str, key: str, value: str) -> str:
    if key not in template:
        raise ValueError(f"question template {template!r} has no {key}")
    return template.replace(key, value)


# --- classification --------------------------------------------------------------------------------------------


def classification(
    sample_id: Any,
    image: str,
    label: str,
    candidates: Sequence[str],
    *,
    seed: int = 0,
    num_options: int | None = None,
    letters: bool = True,
) -> dict:
    """A multiple-choice record over ``candidates`` (which must hold ``label``). ``num_options``: the label plus
    that many minus one distractors drawn from the rest (default: every candidate). The draw and the option order
    come from ``random.Random(f"{seed}:{sample_id}")``, so a sample's options depend only on the seed, its id and
    the candidate list, not on which other samples are converted with it."""
    options = _options(sample_id, label, candidates, seed, num_options)
    if not letters:
        return _single(sample_id, image, f"{CLASSIFY}: {', '.join(options)}. {OPEN_SUFFIX}", label)
    if len(options) > 26:
        raise _fail(sample_id, f"{len(options)} options do not fit letters A-Z; pass num_options")
    lines = "\n".join(f"{chr(ord('A') + i)}. {option}" for i, option in enumerate(options))
    return _single(sample_id, image, f"{CLASSIFY}.\n{lines}\n{LETTER_SUFFIX}", chr(ord("A") + options.index(label)))


def _options(sample_id: Any, label: str, candidates: Sequence[str], seed: int, num_options: int | None) -> list[str]:
    candidates = list(candidates)
    if any(not isinstance(c, str) or not c.strip() for c in candidates):
        raise _fail(sample_id, "every candidate label must be a non-empty string")
    if len(set(candidates)) != len(candidates):
        raise _fail(sample_id, "the candidate labels repeat")
    if label not in candidates:
        raise _fail(sample_id, f"label {label!r} is not among the candidate labels")
    rng = random.Random(f"{seed}:{sample_id}")
    others = [c for c in candidates if c != label]
    if num_options is not None:
        if not 2 <= num_options <= len(candidates):
            raise _fail(sample_id, f"num_options {num_options} is not within 2..{len(candidates)} candidates")
        others = rng.sample(others, num_options - 1)
    options = [label, *others]
    rng.shuffle(options)
    return options


# --- boxes: grounding and region perception ----------------------------------------------------------------------


def normalise_box(sample_id: Any, box: Sequence[float], size: Size) -> list[int]:
    """Pixel ``(x1, y1, x2, y2)`` of a ``size = (width, height)`` image -> ``[x1, y1, x2, y2]`` in 0..1000.

    Each value is ``int(v / extent * 1000)`` (InternVL, spec 4.2), computed exactly on the decimal the value is
    written as (a float's shortest repr), so ``0.3`` of a 1-pixel image is 300, not the 299 its binary value
    gives. The box must lie inside the image with ``x1 < x2`` and ``y1 < y2``; otherwise a ``ValueError`` names
    the sample and the reason."""
    if len(size) != 2 or not all(isinstance(e, int) and e > 0 for e in size):
        raise _fail(sample_id, f"image size {size!r} is not two positive integers")
    width, height = size
    if len(box) != 4 or not all(finite(v) for v in box):
        raise _fail(sample_id, f"box {list(box)!r} is not four finite numbers")
    x1, y1, x2, y2 = box
    if x1 >= x2 or y1 >= y2:
        raise _fail(sample_id, f"box {list(box)} is empty or inverted (needs x1 < x2 and y1 < y2)")
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise _fail(sample_id, f"box {list(box)} is not inside the {width}x{height} image")
    return [int(_exact(v) * 1000 / extent) for v, extent in zip(box, (width, height) * 2)]


def _exact(v: float) -> Fraction:
    return Fraction(v) if isinstance(v, int) else Fraction(repr(float(v)))


def _as_boxes(sample_id: Any, box: Sequence) -> list[Sequence[float]]:
    """One box or a list of boxes (several instances of one expression share one ``<box>``, spec 4.2)."""
    if not box:
        raise _fail(sample_id, "no box")
    return list(box) if isinstance(box[0], Sequence) else [box]


def grounding(
    sample_id: Any, image: str, size: Size, expr: str, box: Sequence, *, question: str = GROUNDING_QUESTION
) -> dict:
    """Referring expression -> box(es). ``box``: one pixel box or a list of them; ``question``: a template with
    ``{expr}`` (``GROUNDING_QUESTION`` or ``DETECT_QUESTION``)."""
    if not expr.strip():
        raise _fail(sample_id, "empty referring expression")
    boxes = json.dumps([normalise_box(sample_id, b, size) for b in _as_boxes(sample_id, box)])
    return _single(sample_id, image, _fill(question, "{expr}", expr), f"<ref>{expr}</ref><box>{boxes}</box>", size)


def region(
    sample_id: Any,
    image: str,
    size: Size,
    box: Sequence[float],
    answer: str,
    *,
    kind: str = "label",
    question: str | None = None,
) -> dict:
    """A question about one region given as a normalised ``<box>``. ``kind="label"``: the answer names the object
    and is written ``<ref>{answer}</ref><box>[[...]]</box>`` (paper); ``kind="text"``: a caption or any answer,
    written as given. ``question``: a template with ``{box}`` replacing the kind's default."""
    if kind not in ("label", "text"):
        raise ValueError(f"region kind must be 'label' or 'text', not {kind!r}")
    if not answer.strip():
        raise _fail(sample_id, "empty answer")
    coords = json.dumps([normalise_box(sample_id, box, size)])
    template = question or (REGION_LABEL_QUESTION if kind == "label" else REGION_TEXT_QUESTION)
    reply = f"<ref>{answer}</ref><box>{coords}</box>" if kind == "label" else answer
    return _single(sample_id, image, _fill(template, "{box}", coords), reply, size)


# --- multi-view stitching (DriveLM) ------------------------------------------------------------------------------


def stitch_views(views: Mapping[str, Any] | Sequence[Any], *, tags: bool = True) -> Image.Image:
    """Six camera views (PIL images or paths; a mapping keyed by ``CAMERAS`` or a sequence in that order) ->
    the 2688x896 RGB canvas. Each view is resized to 896x448 (bicubic) and pasted row-major in ``CAMERAS`` order:
    top row CAM_FRONT_LEFT, CAM_FRONT, CAM_FRONT_RIGHT; bottom row CAM_BACK_LEFT, CAM_BACK, CAM_BACK_RIGHT, so
    view k has its top-left corner at ``((k % 3) * 896, (k // 3) * 448)``. ``tags``: the camera name is drawn at
    the view's top-left in magenta, DejaVuSans-Bold 50 px, as InternVL's ``tools/images_stitching.py`` does."""
    canvas = Image.new("RGB", CANVAS_SIZE)
    for k, (camera, view) in enumerate(zip(CAMERAS, _ordered_views(views))):
        tile = _load_rgb(view).resize(VIEW_SIZE, Image.Resampling.BICUBIC)
        if tags:
            ImageDraw.Draw(tile).text((0, 0), camera, fill=TAG_COLOUR, font=_tag_font())
        canvas.paste(tile, ((k % GRID_COLUMNS) * VIEW_SIZE[0], (k // GRID_COLUMNS) * VIEW_SIZE[1]))
    return canvas


def _ordered_views(views: Mapping[str, Any] | Sequence[Any]) -> list[Any]:
    if isinstance(views, Mapping):
        if set(views) != set(CAMERAS):
            raise ValueError(f"views must be keyed by exactly {', '.join(CAMERAS)}; got {', '.join(views)}")
        return [views[c] for c in CAMERAS]
    if len(views) != len(CAMERAS):
        raise ValueError(f"{len(views)} views given; need {len(CAMERAS)} in the order {', '.join(CAMERAS)}")
    return list(views)


def _load_rgb(view: Any) -> Image.Image:
    if isinstance(view, Image.Image):
        return view.convert("RGB")
    with Image.open(view) as im:
        return im.convert("RGB")


@lru_cache(maxsize=1)
def _tag_font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.truetype(*TAG_FONT)
    except OSError:  # no DejaVu on this machine: Pillow's bundled font at the same size
        return ImageFont.load_default(TAG_FONT[1])


def multiview_question(question: str) -> str:
    """The human turn of a stitched sample: the image, the camera layout, then the question."""
    return f"{IMAGE}\n{CAMERA_LAYOUT}\n{question}"


def multiview(
    sample_id: Any,
    views: Mapping[str, Any] | Sequence[Any],
    question: str,
    answer: str,
    image: str,
    *,
    tags: bool = True,
) -> tuple[Image.Image, dict]:
    """The stitched canvas and its record; ``image`` is the path (under the image root) the canvas is to be saved
    at, which ``save_canvas`` then does."""
    canvas = stitch_views(views, tags=tags)
    return canvas, _record(sample_id, image, multiview_question(question), answer, CANVAS_SIZE)


def save_canvas(canvas: Image.Image, image_root: str | os.PathLike, record: dict) -> Path:
    """Write ``canvas`` where ``record["image"]`` points under ``image_root`` (format from the extension)."""
    path = Path(image_root) / record["image"]
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, quality=95)
    return path


def multiview_point(camera: str, x: float, y: float, size: Size = (1600, 900)) -> tuple[int, int]:
    """A pixel ``(x, y)`` of one camera's ``size`` image -> its ``(cx, cy)`` in 0..1000 of the stitched canvas,
    the coordinates DriveLM's ``<c1,CAM_FRONT,[cx,cy]>`` object tags carry (spec 5.3; the DriveLM evaluation maps
    them back)."""
    if camera not in CAMERAS:
        raise ValueError(f"camera {camera!r} is not one of {', '.join(CAMERAS)}")
    k = CAMERAS.index(camera)
    width, height = size
    if not (0 <= x <= width and 0 <= y <= height):
        raise ValueError(f"point ({x}, {y}) is not inside the {width}x{height} {camera} image")
    columns, rows = GRID_COLUMNS, len(CAMERAS) // GRID_COLUMNS
    cx = (k % columns + _exact(x) / width) * 1000 / columns
    cy = (k // columns + _exact(y) / height) * 1000 / rows
    return int(cx), int(cy)


# --- video -------------------------------------------------------------------------------------------------------


def video(sample_id: Any, frames: Sequence[str], question: str, answer: str) -> dict:
    """Frames as a multi-image record: ``Frame1: <image>\\nFrame2: <image>\\n...`` then the question."""
    if not frames:
        raise _fail(sample_id, "no frames")
    prefix = "".join(f"Frame{i}: {IMAGE}\n" for i in range(1, len(frames) + 1))
    return _record(sample_id, list(frames), prefix + question, answer)


# --- command line ------------------------------------------------------------------------------------------------

COLUMNS = {
    "classification": "id, image, label; optional options (this row's candidates, ';'-separated; default: --labels,"
    " else every label in the file)",
    "grounding": "id, image, expr, x1, y1, x2, y2 (pixels); optional width, height (default: read from the image)",
    "region": "id, image, x1, y1, x2, y2 (pixels), answer; optional width, height, question (a template with {box})",
    "multiview": "id, question, answer, and one view path per camera: " + ", ".join(CAMERAS),
    "video": "id, frames (frame paths in order, ';'-separated), question, answer",
}
BAD_ROWS = (
    "A bad row is reported as 'FILE row N: reason' (N counts data rows from 1, the CSV header not"
    " included); then nothing is written and the exit status is 2."
)
MAX_REPORTED = 20


class RowError(ValueError):
    pass


def _read_rows(path: Path) -> list[dict]:
    """Rows of a CSV (header line), a JSON list of objects or a JSONL file; values keep their JSON types."""
    if path.suffix == ".csv":
        with open(path, encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f))
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"{path}: expected a .csv, .json or .jsonl file")
    text = path.read_text(encoding="utf-8")
    try:
        rows = (
            json.loads(text)
            if path.suffix == ".json"
            else [json.loads(line) for line in text.splitlines() if line.strip()]
        )
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a list of objects")
    return rows


def _text(row: dict, key: str) -> str:
    value = row.get(key)
    if isinstance(value, int) and not isinstance(value, bool):  # JSON ids and numeric labels
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise RowError(f"column {key!r} is missing or empty")
    return value.strip()


def _number(row: dict, key: str) -> float:
    """A finite number; whole ones as ``int`` so messages show the pixels as the user wrote them."""
    value = row.get(key)
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        number = None
    if finite(number):
        return int(number) if number == int(number) else float(number)
    raise RowError(f"column {key!r} is not a number: {value!r}")


def _list(row: dict, key: str) -> list[str]:
    value = row.get(key)
    items = value if isinstance(value, list) else str(value or "").split(";")
    items = [str(v).strip() for v in items if str(v).strip()]
    if not items:
        raise RowError(f"column {key!r} is missing or empty")
    return items


def _existing(root: Path, rel: str) -> Path:
    path = root / rel
    if not path.is_file():
        raise RowError(f"image {rel} not found under {root}")
    return path


def _size(row: dict, root: Path, rel: str) -> Size:
    """The row's ``width``/``height`` if either is given, else the image header's."""
    path = _existing(root, rel)
    if row.get("width") not in (None, "") or row.get("height") not in (None, ""):
        width, height = _number(row, "width"), _number(row, "height")
        if not isinstance(width, int) or not isinstance(height, int):
            raise RowError(f"width/height {width}x{height} are not whole pixels")
        return width, height
    with Image.open(path) as im:
        return im.size


def _box(row: dict) -> list[float]:
    return [_number(row, key) for key in ("x1", "y1", "x2", "y2")]


def _row_classification(row: dict, args: argparse.Namespace) -> dict:
    image = _text(row, "image")
    _existing(args.image_root, image)
    candidates = _list(row, "options") if row.get("options") else args.labels
    return classification(
        _text(row, "id"),
        image,
        _text(row, "label"),
        candidates,
        seed=args.seed,
        num_options=args.num_options,
        letters=args.answer == "letter",
    )


def _row_grounding(row: dict, args: argparse.Namespace) -> dict:
    image = _text(row, "image")
    question = GROUNDING_QUESTION if args.question == "refcoco" else DETECT_QUESTION
    return grounding(
        _text(row, "id"), image, _size(row, args.image_root, image), _text(row, "expr"), _box(row), question=question
    )


def _row_region(row: dict, args: argparse.Namespace) -> dict:
    image = _text(row, "image")
    question = _text(row, "question") if row.get("question") else None
    if question is not None and "{box}" not in question:
        raise RowError("column 'question' has no {box} placeholder")
    return region(
        _text(row, "id"),
        image,
        _size(row, args.image_root, image),
        _box(row),
        _text(row, "answer"),
        kind=args.kind,
        question=question,
    )


def _row_multiview(row: dict, args: argparse.Namespace) -> dict:
    """The record only; the canvas is stitched once every row has passed, so a bad row writes no image."""
    sample_id = _text(row, "id")
    if "/" in sample_id or "\\" in sample_id or sample_id.startswith("."):
        raise RowError(f"id {sample_id!r} names the canvas file and cannot hold a path")
    for camera in CAMERAS:
        with Image.open(_existing(args.image_root, _text(row, camera))):
            pass
    image = f"{args.canvas_dir}/{sample_id}.jpg"
    return _record(sample_id, image, multiview_question(_text(row, "question")), _text(row, "answer"), CANVAS_SIZE)


def _row_video(row: dict, args: argparse.Namespace) -> dict:
    frames = _list(row, "frames")
    for frame in frames:
        _existing(args.image_root, frame)
    return video(_text(row, "id"), frames, _text(row, "question"), _text(row, "answer"))


ROW_CONVERTERS = {
    "classification": _row_classification,
    "grounding": _row_grounding,
    "region": _row_region,
    "multiview": _row_multiview,
    "video": _row_video,
}


def _convert(args: argparse.Namespace, rows: list[dict]) -> tuple[list[dict], list[str]]:
    """Every row's record, or every bad row's message (``row N`` counts data rows from 1, header excluded)."""
    records, errors, seen = [], [], set()
    for n, row in enumerate(rows, 1):
        try:
            record = ROW_CONVERTERS[args.task](row, args)
            if record["id"] in seen:
                raise RowError(f"id {record['id']!r} repeats an earlier row")
            seen.add(record["id"])
            records.append(record)
        except (ValueError, OSError) as e:
            errors.append(f"{args.input} row {n}: {e}")
    return records, errors


def _write_canvases(args: argparse.Namespace, rows: list[dict], records: list[dict]) -> None:
    for n, (row, record) in enumerate(zip(rows, records), 1):
        try:
            views = [args.image_root / _text(row, camera) for camera in CAMERAS]
            save_canvas(stitch_views(views, tags=not args.no_tags), args.image_root, record)
        except (ValueError, OSError) as e:
            raise OSError(f"{args.input} row {n}: {e}") from None


def _write_jsonl(path: Path, records: list[dict]) -> None:
    """All or nothing: a sibling temporary file renamed over ``path`` once complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mgjax.formatters",
        formatter_class=HelpFormatter,
        description="Convert a CSV/JSON/JSONL of labels into InternVL annotation JSONL (one record per row).",
        epilog="columns per task (image paths relative to --image-root):\n"
        + "\n".join(f"  {task}: {cols}" for task, cols in COLUMNS.items())
        + "\n\n"
        + BAD_ROWS,
    )
    tasks = ap.add_subparsers(dest="task", required=True, metavar="TASK", help="what the rows label")
    parsers = {
        task: tasks.add_parser(
            task, help=cols, description=f"columns: {cols}. {BAD_ROWS}", formatter_class=HelpFormatter
        )
        for task, cols in COLUMNS.items()
    }
    for sub in parsers.values():
        sub.add_argument("--input", type=Path, required=True, help="labels: .csv (with a header), .json or .jsonl")
        sub.add_argument("--image-root", type=Path, required=True, help="the folder image paths are relative to")
        sub.add_argument("--out", type=Path, required=True, help="the annotation JSONL to write")
    parsers["classification"].add_argument(
        "--labels",
        type=lambda s: [v.strip() for v in s.split(";")],
        help="the candidate labels, ';'-separated (default: every label in the file)",
    )
    parsers["classification"].add_argument(
        "--num-options", type=int, help="options per question, the label among them (default: every candidate)"
    )
    parsers["classification"].add_argument(
        "--seed", type=int, default=0, help="the random seed that picks each question's distractors and their order"
    )
    parsers["classification"].add_argument(
        "--answer",
        choices=("letter", "label"),
        default="letter",
        help="letter: lettered options, answer a letter; label: the paper's open form, answer the label",
    )
    parsers["grounding"].add_argument(
        "--question",
        choices=("refcoco", "detect"),
        default="refcoco",
        help="refcoco: " + GROUNDING_QUESTION + "; detect: " + DETECT_QUESTION,
    )
    parsers["region"].add_argument(
        "--kind",
        choices=("label", "text"),
        default="label",
        help="label: answer <ref>answer</ref><box>..</box>; text: the answer as given",
    )
    parsers["multiview"].add_argument(
        "--canvas-dir", default="stitch", help="where canvases go, relative to --image-root: DIR/ID.jpg"
    )
    parsers["multiview"].add_argument("--no-tags", action="store_true", help="do not draw camera names")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        rows = _read_rows(args.input)
    except OSError as e:  # its text names the file but not the flag
        print(f"error: --input {args.input}: {e.strerror or e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.task == "classification" and args.labels is None:
        args.labels = sorted({str(r.get("label", "")).strip() for r in rows} - {""})
    if args.task == "multiview" and Path(args.canvas_dir).is_absolute():
        print("error: --canvas-dir must be relative to --image-root", file=sys.stderr)
        return 2
    records, errors = _convert(args, rows)
    for message in errors[:MAX_REPORTED]:
        print(f"error: {message}", file=sys.stderr)
    if len(errors) > MAX_REPORTED:
        print(f"error: ... and {len(errors) - MAX_REPORTED} more bad rows", file=sys.stderr)
    if errors:
        return 2
    try:
        if args.task == "multiview":
            _write_canvases(args, rows, records)
        _write_jsonl(args.out, records)
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(records)} records -> {args.out}")
    return 0
