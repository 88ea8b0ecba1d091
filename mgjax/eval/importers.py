"""``python -m mgjax.eval.importers --task TASK --out DIR INPUT... [--images FOLDER]``: the question and answer
files that LLaVA's and Mini-Gemini's evaluation scripts read (``playground/data/eval/...``, ``data/MGM-Eval/...``)
turned into ``DIR/questions.jsonl``, the input of ``python -m mgjax.eval --task TASK --data DIR``.

Each record gets the prompt the reference script sends (its text, or the prompt it builds: MMBench's options and
answer instruction, ScienceQA's single-prediction instruction, MathVista's zero-shot query) and the ground truth
the reference scorer reads, in the fields ``mgjax.eval.scoring`` names. The inputs, per task, are the files the
scripts pass, in the order of the epilog of ``--help``.

Images stay where they are: a record's ``image`` is the path of the file relative to DIR (``--copy-images`` copies
them into DIR/images instead). A benchmark's images are large (TextVQA's train_images, COCO val2014 for POPE) and
often shared between benchmarks, so they are not duplicated; relative paths, unlike absolute ones, keep working
when DIR and the image folders move together, and unlike links they work on every file system and archive. An
image that is not there is an error now, not when the model reaches it. MMBench's images are inside its TSV, as
base64: they are decoded into DIR/images/INDEX.EXT.

Every input is checked as it is read. A missing field, a question without ground truth, an image that does not
exist, a malformed value: an error naming the file, the line (JSONL, TSV, text files) or the entry (JSON files) and
the reason, and nothing is written. Nothing is dropped either: every question of the question file becomes a
record, and ground truth that no question asks for is counted and reported. The written records are then checked
against the scorer's own field rules.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import csv
import io
import json
import os
import re
import shutil
import string
import sys
from collections import defaultdict, deque
from pathlib import Path, PurePosixPath
from typing import Any, Callable, NamedTuple, NoReturn

from PIL import Image

from mgjax.cli import HelpFormatter
from mgjax.eval import scoring

# The instructions the reference scripts append (LLaVA/MGM ``--single-pred-prompt``).
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."
LETTER_PROMPT_CN = "请直接回答选项字母。"
SHORT_ANSWER = "Answer the question using a single word or phrase."

Record = dict[str, Any]
Where = int | str | None  # a line number (JSONL, TSV, txt), an entry ("entry '12'", "item 3") or the whole file


class SourceError(ValueError):
    """A source file that cannot be imported; the message names the file, the line or entry, and the reason."""


def _fail(path: Path, at: Where, reason: str) -> NoReturn:
    where = f"{path}:{at}" if isinstance(at, int) else f"{path}: {at}" if at else f"{path}"
    raise SourceError(f"{where}: {reason}")


# ------------------------------------------------------------------------------------------------ reading


def _file(path: Path) -> Path:
    if not path.is_file():
        _fail(path, None, "no such file" if not path.exists() else "not a file")
    return path


def _text(path: Path) -> str:
    try:
        return _file(path).read_text(encoding="utf-8-sig")  # a byte-order mark is dropped
    except UnicodeDecodeError as e:
        _fail(path, None, f"not UTF-8 at byte {e.start}")


def read_json(path: Path) -> Any:
    """A JSON file; a syntax error names its line."""
    try:
        return json.loads(_text(path))
    except json.JSONDecodeError as e:
        _fail(path, e.lineno, f"not JSON ({e.msg})")


def read_jsonl(path: Path) -> list[tuple[int, Record]]:
    """(line number, object) of each non-blank line of a JSONL file."""
    rows = []
    for n, line in enumerate(_text(path).split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(path, n, f"not JSON ({e.msg})")
        if not isinstance(value, dict):
            _fail(path, n, f"not a JSON object but {type(value).__name__}")
        rows.append((n, value))
    if not rows:
        _fail(path, None, "no records")
    return rows


def _kind(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))


def field(record: Any, name: str, path: Path, at: Where, kind: type | tuple[type, ...] = str) -> Any:
    """``record[name]``, which must exist and be of ``kind`` (an empty string counts as missing)."""
    if not isinstance(record, dict):
        _fail(path, at, f"not a JSON object but {type(record).__name__}")
    if name not in record or record[name] is None or record[name] == "":
        _fail(path, at, f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        _fail(path, at, f"field {name!r} is {type(value).__name__}, not {_kind(kind)}")
    return value


def _strings(record: Record, name: str, path: Path, at: Where) -> list[str]:
    values = field(record, name, path, at, list)
    if not values or not all(isinstance(v, str) for v in values):
        _fail(path, at, f"field {name!r} must be a non-empty list of strings")
    return values


# ------------------------------------------------------------------------------------------------ images


class Images:
    """The ``image`` value of records: a path relative to ``out`` of a file under ``root`` (or of its copy in
    ``out/images``), or of an image decoded into ``out/images``. Copies and decoded images are written by
    ``flush``, once every input has been checked."""

    def __init__(self, out: Path, root: Path | None, copy: bool):
        self.out, self.root, self.copy = out, root, copy
        self.pending: dict[str, Path | bytes] = {}  # name under out -> the file to copy or the bytes to write

    def file(self, name: str, path: Path, at: Where) -> str:
        if self.root is None:
            raise SourceError("--images: this task's questions name image files; pass the folder they are in")
        source = self.root / name
        if not source.is_file():
            _fail(path, at, f"image {name!r} does not exist in {self.root}")
        if not self.copy:
            return _relative(source, self.out)
        inside = PurePosixPath(name.replace("\\", "/"))
        if inside.is_absolute() or ".." in inside.parts:
            _fail(path, at, f"image {name!r} is outside the image folder; it cannot be copied under {self.out}/images")
        target = str(PurePosixPath("images") / inside)
        self.pending[target] = source
        return target

    def write(self, name: str, data: bytes) -> str:
        self.pending[f"images/{name}"] = data
        return f"images/{name}"

    def flush(self) -> int:
        """Write the copies and decoded images; their count."""
        for name, content in self.pending.items():
            target = self.out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                shutil.copyfile(content, target)
        return len(self.pending)


def _relative(source: Path, out: Path) -> str:
    try:
        return Path(os.path.relpath(os.path.abspath(source), os.path.abspath(out))).as_posix()
    except ValueError:  # another drive (Windows): no relative path exists
        return Path(os.path.abspath(source)).as_posix()


# -------------------------------------------------------------------------------------------- collecting


class Collector:
    """The records in source order; a repeated question_id is an error naming both places."""

    def __init__(self):
        self.records: list[Record] = []
        self.notes: list[str] = []
        self.seen: dict[Any, str] = {}
        self.images = 0  # images written under OUT (decoded or copied)

    def add(self, record: Record, path: Path, at: Where) -> None:
        qid = record["question_id"]
        here = f"{path.name}:{at}" if isinstance(at, int) else f"{path.name} {at}"
        if qid in self.seen:
            _fail(path, at, f"question_id {qid!r} repeats the one of {self.seen[qid]}")
        self.seen[qid] = here
        self.records.append(record)

    def unused(self, count: int, total: int, what: str, by: Path) -> None:
        """Report ground truth that no question asks for: ``count`` of the ``total`` ``what``."""
        if count:
            self.notes.append(f"not asked by {by.name}: {count} of the {total} {what}")


# ---------------------------------------------------------------------------------------------- TextVQA


def textvqa_question(prompt: str) -> str | None:
    """The question LLaVA's ``eval_textvqa.py`` (``prompt_processor``) reads from a prompt, lowercased; None for a
    prompt of no form it knows."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        found = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        question = found.group(1) if found else None
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        question = lines[0]
    else:
        question = None
    return None if question is None else question.lower()


def _textvqa(inputs: list[Path], images: Images, args) -> Collector:
    qpath, apath = inputs
    data = read_json(apath)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        _fail(apath, None, "not a TextVQA annotation file (no 'data' list)")
    by_key: dict[tuple[str, str], deque] = defaultdict(deque)
    for i, ann in enumerate(data["data"]):
        at = f"data[{i}]"
        image_id, question = field(ann, "image_id", apath, at), field(ann, "question", apath, at)
        qid = field(ann, "question_id", apath, at, (int, str))
        if "answers" not in ann:
            _fail(apath, at, f"question {qid} has no 'answers' (a test-split file has none; use the val file)")
        by_key[(image_id, question.lower())].append((qid, _strings(ann, "answers", apath, at)))
    out = Collector()
    for n, q in read_jsonl(qpath):
        text, image = field(q, "text", qpath, n), field(q, "image", qpath, n)
        llava_id = field(q, "question_id", qpath, n, (str, int))
        question = textvqa_question(text)
        if question is None:
            _fail(qpath, n, "the prompt has no form LLaVA's eval_textvqa reads (question[, OCR line], instruction)")
        # LLaVA's question_id is the image id; the image's file name is the fallback
        keys = [(str(llava_id), question), (PurePosixPath(image).stem, question)]
        found = next((by_key[k] for k in keys if by_key.get(k)), None)
        if found is None:
            _fail(qpath, n, f"{apath.name} has no (more) answers for image {keys[0][0]!r}, question {question!r}")
        qid, answers = found.popleft()
        record = {"question_id": qid, "text": text, "image": images.file(image, qpath, n), "answers": answers}
        out.add(record, qpath, n)
    spare = sum(map(len, by_key.values()))
    out.unused(spare, len(data["data"]), f"questions in {apath.name}", qpath)
    return out


# ------------------------------------------------------------------------------------------------- POPE

_POPE_FILE = re.compile(r"coco_pope_(.+)\.json")
_POPE_VERSION = (
    " (LLaVA-1.5's llava_pope_test.jsonl was built from POPE commit e3e39262, whose coco_pope_random.json has 2910 "
    "questions; POPE's later one has 3000 others)"
)


def _pope_text(text: str) -> str:
    """A POPE question as both versions of its label files word it (POPE later fixed its "imange" typo)."""
    return text.strip().replace(" imange?", " image?")


def _pope_files(paths: list[Path]) -> dict[str, Path]:
    """category -> label file, from label files or folders holding them (LLaVA's ``--annotation-dir``)."""
    files = {}
    for path in paths:
        found = sorted(path.glob("coco_pope_*.json")) if path.is_dir() else [_file(path)]
        if not found:
            _fail(path, None, "no coco_pope_*.json label file in this folder")
        for file in found:
            name = _POPE_FILE.fullmatch(file.name)
            if not name:
                _fail(file, None, "a POPE label file is named coco_pope_CATEGORY.json")
            if name.group(1) in files:
                _fail(file, None, f"a second label file for category {name.group(1)!r}")
            files[name.group(1)] = file
    return files


def _pope(inputs: list[Path], images: Images, args) -> Collector:
    qpath, label_paths = inputs[0], inputs[1:]
    files = _pope_files(label_paths)
    questions = read_jsonl(qpath)
    by_category: dict[str, list[tuple[int, Record]]] = defaultdict(list)
    for n, q in questions:
        category = field(q, "category", qpath, n)
        if category not in files:
            _fail(qpath, n, f"category {category!r} has no label file coco_pope_{category}.json")
        by_category[category].append((n, q))
    labelled: dict[int, tuple[str, str]] = {}  # question line -> (category, label)
    for category, file in files.items():
        labels, asked = read_jsonl(file), by_category.get(category, [])
        if len(labels) != len(asked):
            _fail(
                file,
                None,
                f"{len(labels)} labels for the {len(asked)} questions of category {category!r} in {qpath.name}: "
                f"LLaVA's eval_pope pairs them in order{_POPE_VERSION if category == 'random' else ''}",
            )
        for (n, q), (m, lab) in zip(asked, labels):
            label = field(lab, "label", file, m)
            if label not in ("yes", "no"):
                _fail(file, m, f"label {label!r} is not yes/no")
            asks, labels_text = field(q, "text", qpath, n).split("\n")[0].strip(), field(lab, "text", file, m).strip()
            same_text = _pope_text(asks) == _pope_text(labels_text)
            if not same_text or ("image" in lab and lab["image"] != field(q, "image", qpath, n)):
                _fail(
                    file,
                    m,
                    f"labels {labels_text!r} on {lab.get('image')!r}, but the question it pairs with "
                    f"({qpath.name}:{n}) asks {asks!r} on {q.get('image')!r}: the files are not in the same order",
                )
            labelled[n] = (category, label)
    out = Collector()
    for n, q in questions:
        category, label = labelled[n]
        qid = field(q, "question_id", qpath, n, (int, str))
        image = images.file(field(q, "image", qpath, n), qpath, n)
        out.add({"question_id": qid, "text": q["text"], "image": image, "category": category, "label": label}, qpath, n)
    return out


# -------------------------------------------------------------------------------------------------- MME


def _mme_answers(root: Path, category: str) -> dict[tuple[str, str], tuple[str, Path, int]]:
    """(txt file name, question) -> (answer, file, line) of one subtask, read as LLaVA's convert_answer_to_mme."""
    folder = root / category
    if not folder.is_dir():
        _fail(folder, None, f"no folder for MME subtask {category!r}")
    qa = folder / "questions_answers_YN" if (folder / "images").exists() else folder
    answers = {}
    for file in sorted(qa.glob("*.txt")):
        for n, line in enumerate(_text(file).splitlines(), 1):
            if not line.strip():
                continue
            parts = line.strip().split("\t")
            if len(parts) != 2:
                _fail(file, n, "not 'question<TAB>answer'")
            answers[(file.name, parts[0])] = (parts[1], file, n)
    if not answers:
        _fail(qa, None, f"no question<TAB>answer .txt files for MME subtask {category!r}")
    return answers


def mme_prompt_keys(text: str) -> list[str]:
    """The question strings LLaVA's ``convert_answer_to_mme.py`` looks a prompt up by, in its order."""
    prompt = text
    if SHORT_ANSWER in prompt:
        prompt = prompt.replace(SHORT_ANSWER, "").strip()
    if "Please answer yes or no." in prompt:
        return [prompt]
    prompt += " Please answer yes or no."
    return [prompt, prompt.replace(" Please answer yes or no.", "  Please answer yes or no.")]


def _mme(inputs: list[Path], images: Images, args) -> Collector:
    qpath, root = inputs
    if not root.is_dir():
        _fail(root, None, "not a folder (MME_Benchmark_release_version)")
    subtasks = scoring.MME_PERCEPTION + scoring.MME_COGNITION
    truth: dict[str, dict] = {}
    used: set[tuple[str, str, str]] = set()
    asked: dict[str, int] = defaultdict(int)
    out = Collector()
    for n, q in read_jsonl(qpath):
        llava_id, text = field(q, "question_id", qpath, n), field(q, "text", qpath, n)
        category = llava_id.split("/")[0]
        if category not in subtasks:
            _fail(qpath, n, f"question_id {llava_id!r}: {category!r} is not one of MME's 14 subtasks")
        if category not in truth:
            truth[category] = _mme_answers(root, category)
        txt = llava_id.split("/")[-1].split(".")[0] + ".txt"
        key = next(((txt, k) for k in mme_prompt_keys(text) if (txt, k) in truth[category]), None)
        if key is None:
            _fail(qpath, n, f"{category}/.../{txt} has no answer for the question {mme_prompt_keys(text)[0]!r}")
        answer, file, m = truth[category][key]
        if answer.lower() not in ("yes", "no"):
            _fail(file, m, f"answer {answer!r} is not Yes/No")
        used.add((category, *key))
        # LLaVA's question_id names the image, shared by its two questions: the k-th gets "#k"
        record = {
            "question_id": f"{llava_id}#{asked[llava_id]}",
            "text": text,
            "image": images.file(field(q, "image", qpath, n), qpath, n),
            "category": category,
            "label": answer.lower(),
        }
        asked[llava_id] += 1
        out.add(record, qpath, n)
    total = sum(len(answers) for answers in truth.values())
    out.unused(total - len(used), total, f"questions in the answer files of {', '.join(truth)}", qpath)
    return out


# -------------------------------------------------------------------------------------------------- GQA


def _gqa(inputs: list[Path], images: Images, args) -> Collector:
    qpath, apath = inputs
    truth = read_json(apath)
    if not isinstance(truth, dict):
        _fail(apath, None, "not a GQA questions file (an object of question id -> question)")
    out, asked = Collector(), set()
    for n, q in read_jsonl(qpath):
        qid, image = field(q, "question_id", qpath, n, (str, int)), field(q, "image", qpath, n)
        entry = truth.get(str(qid))
        if entry is None:
            _fail(qpath, n, f"question {qid} is not in {apath.name}")
        label = field(entry, "answer", apath, f"entry {str(qid)!r}")
        if "imageId" in entry and PurePosixPath(image).stem != str(entry["imageId"]):
            _fail(qpath, n, f"image {image!r}, but {apath.name} asks question {qid} about image {entry['imageId']!r}")
        asked.add(str(qid))
        text = field(q, "text", qpath, n)
        out.add({"question_id": qid, "text": text, "image": images.file(image, qpath, n), "label": label}, qpath, n)
    out.unused(len(truth) - len(asked), len(truth), f"questions in {apath.name}", qpath)
    return out


# -------------------------------------------------------------------------------------------- ScienceQA


def _scienceqa(inputs: list[Path], images: Images, args) -> Collector:
    qpath, ppath, spath = inputs
    items, problems, splits = read_json(qpath), read_json(ppath), read_json(spath)
    if not isinstance(items, list):
        _fail(qpath, None, "not a LLaVA question file (a JSON list of {id, conversations, image})")
    if not isinstance(problems, dict):
        _fail(ppath, None, "not ScienceQA's problems.json (an object of problem id -> problem)")
    if not isinstance(splits, dict) or not isinstance(splits.get(args.split), list):
        _fail(spath, None, f"no split {args.split!r} (--split) in pid_splits.json")
    split = {str(pid) for pid in splits[args.split]}
    out = Collector()
    for i, item in enumerate(items):
        at = f"item {i}"
        pid = str(field(item, "id", qpath, at, (str, int)))
        at = f"item {i} (id {pid!r})"
        turns = field(item, "conversations", qpath, at, list)
        prompt = field(turns[0] if turns else {}, "value", qpath, f"{at}, conversations[0]")
        if pid not in problems:
            _fail(qpath, at, f"problem {pid} is not in {ppath.name}")
        if pid not in split:
            _fail(qpath, at, f"problem {pid} is not in the {args.split!r} split of {spath.name}")
        problem, where = problems[pid], f"entry {pid!r}"
        choices = _strings(problem, "choices", ppath, where)
        if len(choices) > 5:
            _fail(ppath, where, f"{len(choices)} choices; LLaVA's evaluator reads the letters A-E")
        answer = field(problem, "answer", ppath, where, int)
        if not 0 <= answer < len(choices):
            _fail(ppath, where, f"answer {answer} names no choice")
        # model_vqa_science: <image> dropped, the single-prediction instruction appended
        record = {"question_id": pid, "text": prompt.replace("<image>", "").strip() + "\n" + LETTER_PROMPT}
        if "image" in item:  # model_vqa_science: an image when the item names one
            record["image"] = images.file(field(item, "image", qpath, at), qpath, at)
        out.add({**record, "options": choices, "label": answer}, qpath, at)
    missing = sorted(split - set(out.seen), key=lambda p: (len(p), p))
    if missing:
        _fail(
            qpath,
            None,
            f"{len(missing)} problems of the {args.split!r} split (first: {missing[0]}) have no question here; "
            "LLaVA's eval_science_qa would count them wrong",
        )
    return out


# ---------------------------------------------------------------------------------------------- MMBench

# What pandas' read_table (LLaVA's and MGM's TSV reader) reads as NaN, and what their ``is_none`` adds.
_PANDAS_NA = frozenset(
    "#N/A,#N/A N/A,#NA,-1.#IND,-1.#QNAN,-NaN,-nan,1.#IND,1.#QNAN,<NA>,N/A,NA,NULL,NaN,None,n/a,nan,null".split(",")
)
_IMAGE_SUFFIX = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp", "TIFF": "tif"}
CIRCULAR = 1_000_000  # MMBench's circular copies of question i are i + k * CIRCULAR (VLMEvalKit: index % 1e6)


def _none(value: str) -> bool:
    return value == "" or value in _PANDAS_NA or value.lower() in ("nan", "none")


def read_tsv(path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """(header, [(line, row)]) of a TSV file quoted as pandas reads it."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are long fields
    rows = []
    reader = csv.reader(io.StringIO(_text(path), newline=""), delimiter="\t")
    try:
        header = next(reader)
    except StopIteration:
        _fail(path, None, "empty file")
    for row in reader:
        if not any(row):
            continue
        if len(row) != len(header):
            _fail(path, reader.line_num, f"{len(row)} fields; the header has {len(header)}")
        rows.append((reader.line_num, dict(zip(header, row))))
    if not rows:
        _fail(path, None, "no rows")
    return header, rows


def _decoded(data: str, path: Path, at: int) -> tuple[bytes, str]:
    """(bytes, file suffix) of a base64 image, checked to decode."""
    try:
        raw = base64.b64decode(data, validate=True)
    except binascii.Error as e:
        _fail(path, at, f"column 'image' is not base64 ({e})")
    try:
        with Image.open(io.BytesIO(raw)) as image:
            kind = image.format
            image.load()
    except Exception as e:  # noqa: BLE001  (PIL raises many types on damaged data)
        _fail(path, at, f"column 'image' does not decode as an image ({type(e).__name__}: {e})")
    return raw, _IMAGE_SUFFIX.get(kind, str(kind).lower())


def _mmbench(inputs: list[Path], images: Images, args) -> Collector:
    (path,) = inputs
    header, rows = read_tsv(path)
    for column in ("index", "question", "image"):
        if column not in header:
            _fail(path, 1, f"no column {column!r}")
    if "answer" not in header:
        _fail(path, 1, "no column 'answer': a test split has no ground truth (the MMBench server scores it)")
    letters = [c for c in string.ascii_uppercase if c in header]
    if letters != list(string.ascii_uppercase[: len(letters)]) or not letters:
        _fail(path, 1, f"option columns {letters}; expected A, B, ... in order")
    by_index: dict[int, tuple[int, dict]] = {}
    for n, row in rows:
        try:
            index = int(row["index"])
        except ValueError:
            _fail(path, n, f"index {row['index']!r} is not an integer")
        if index in by_index:
            _fail(path, n, f"index {index} repeats line {by_index[index][0]}")
        by_index[index] = (n, row)
    files: dict[int, str] = {}

    def image_of(index: int, n: int, row: dict, chain: tuple[int, ...] = ()) -> str:
        if index in files:
            return files[index]
        value = row["image"].strip()
        if _none(value):
            _fail(path, n, "missing field 'image'")
        if value.startswith("["):
            _fail(path, n, "several images in one row are not supported")
        if len(value) <= 64:  # VLMEvalKit stores a repeated image as the index of the row that holds it
            target = int(value) if value.isdigit() else None
            if target not in by_index or target in chain:
                _fail(path, n, f"column 'image' {value!r} is neither base64 nor the index of another row's image")
            files[index] = image_of(target, *by_index[target], chain=(*chain, index))
            return files[index]
        raw, suffix = _decoded(value, path, n)
        files[index] = images.write(f"{index}.{suffix}", raw)
        return files[index]

    suffix = LETTER_PROMPT_CN if args.lang == "cn" else LETTER_PROMPT
    out, groups = Collector(), set()
    for index, (n, row) in by_index.items():
        question = row["question"]
        if _none(question):
            _fail(path, n, "missing field 'question'")
        options = {}
        for letter in letters:  # LLaVA's get_options: up to the first empty option
            if _none(row[letter]):
                break
            options[letter] = row[letter]
        if not options:
            _fail(path, n, "no options (column A is empty)")
        label = row["answer"].strip()
        if _none(label):
            _fail(path, n, "missing field 'answer'")
        if label not in options:
            _fail(path, n, f"answer {label!r} names no option (options {', '.join(options)})")
        hint = row.get("hint", "")
        text = question if _none(hint) else hint + "\n" + question
        text += "".join(f"\n{letter}. {option}" for letter, option in options.items()) + "\n" + suffix
        group = int(row["g_index"]) if row.get("g_index", "").strip().isdigit() else index % CIRCULAR
        groups.add(group)
        record = {"question_id": index, "text": text, "image": image_of(index, n, row), "index": group}
        record.update(options=options, label=label)
        if not _none(row.get("category", "")):
            record["category"] = row["category"]
        out.add(record, path, n)
    if len(groups) < len(out.records):
        out.notes.append(f"{len(out.records)} rows are {len(groups)} questions with their circular copies")
    return out


# -------------------------------------------------------------------------------------------- MathVista

_MATHVISTA_HINTS = {
    ("multi_choice", "text", None): "Please answer the question and provide the correct option letter, e.g., A, B, "
    "C, D, at the end.",
    ("free_form", "integer", None): "Please answer the question requiring an integer answer and provide the final "
    "value, e.g., 1, 2, 3, at the end.",
    ("free_form", "float", 1): "Please answer the question requiring a floating-point number with one decimal place "
    "and provide the final value, e.g., 1.2, 1.3, 1.4, at the end.",
    ("free_form", "float", 2): "Please answer the question requiring a floating-point number with two decimal "
    "places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.",
    ("free_form", "list", None): "Please answer the question requiring a Python list as an answer and provide the "
    "final list, e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.",
}


def mathvista_query(problem: Record) -> str | None:
    """MGM's ``model_math_vista.create_one_query`` (zero-shot, "solution" hints); None where it has no hint."""
    precision = problem.get("precision") if problem["answer_type"] == "float" else None
    hint = _MATHVISTA_HINTS.get((problem["question_type"], problem["answer_type"], precision))
    if hint is None:
        return None
    question = f"Question: {problem['question']}"
    if problem.get("unit"):
        question += f" (Unit: {problem['unit']})"
    choices = problem.get("choices") or []
    lines = ["Choices:", *(f"({string.ascii_uppercase[i]}) {c}" for i, c in enumerate(choices))] if choices else []
    return "\n".join(e for e in (f"Hint: {hint}", question, "\n".join(lines)) if e).strip()


def _mathvista(inputs: list[Path], images: Images, args) -> Collector:
    (path,) = inputs
    problems = read_json(path)
    if not isinstance(problems, dict):
        _fail(path, None, "not a MathVista file (an object of pid -> problem)")
    out = Collector()
    for pid, problem in problems.items():
        at = f"entry {pid!r}"
        field(problem, "question", path, at)
        if "answer" not in problem or problem["answer"] in (None, ""):
            _fail(path, at, "no answer (the test split has none; testmini has them)")
        kind = field(problem, "question_type", path, at)
        answer_type = field(problem, "answer_type", path, at)
        if problem.get("choices") is not None and not isinstance(problem["choices"], list):
            _fail(path, at, "field 'choices' is not a list")
        query = mathvista_query(problem)
        if query is None:
            detail = f", precision {problem.get('precision')!r}" if answer_type == "float" else ""
            _fail(path, at, f"MGM's query has no hint for a {kind} question with a {answer_type} answer{detail}")
        record = {"question_id": str(pid), "text": query}
        if "image" in problem:  # model_math_vista: an image when the problem names one
            record["image"] = images.file(field(problem, "image", path, at), path, at)
        record.update(question_type=kind, answer_type=answer_type, precision=problem.get("precision"))
        if kind == "multi_choice":
            record["choices"] = _strings(problem, "choices", path, at)
        out.add({**record, "label": problem["answer"]}, path, at)
    return out


# ----------------------------------------------------------------------------------------- LLaVA-Bench


def _llava_bench(inputs: list[Path], images: Images, args) -> Collector:
    qpath, apath, cpath = inputs
    answers: dict[Any, tuple[int, Record]] = {}
    for m, a in read_jsonl(apath):
        qid = field(a, "question_id", apath, m, (int, str))
        if qid in answers:
            _fail(apath, m, f"a second answer to question {qid!r} (line {answers[qid][0]})")
        answers[qid] = (m, a)
    contexts: dict[str, Record] = {}
    for k, c in read_jsonl(cpath):
        caption = c.get("caption", c.get("captions"))
        if isinstance(caption, list) and all(isinstance(x, str) for x in caption):
            caption = "\n".join(caption)
        if not isinstance(caption, str) or not caption:
            _fail(cpath, k, "missing field 'caption'")
        contexts[field(c, "image", cpath, k)] = caption
    out, asked = Collector(), set()
    for n, q in read_jsonl(qpath):
        qid, image = field(q, "question_id", qpath, n, (int, str)), field(q, "image", qpath, n)
        if qid not in answers:
            _fail(qpath, n, f"question {qid!r} has no reference answer in {apath.name}")
        if image not in contexts:
            _fail(qpath, n, f"image {image!r} has no caption in {cpath.name}")
        m, reference = answers[qid]
        asked.add(qid)
        record = {"question_id": qid, "text": field(q, "text", qpath, n), "image": images.file(image, qpath, n)}
        record.update(category=field(q, "category", qpath, n), reference=field(reference, "text", apath, m))
        out.add({**record, "caption": contexts[image]}, qpath, n)
    out.unused(len(answers) - len(asked), len(answers), f"answers in {apath.name}", qpath)
    out.notes.append(
        "generation only: LLaVA-Bench is scored by a GPT-4 review (LLaVA's eval_gpt_review_bench), which "
        "mgjax.eval does not run; 'reference' is the GPT-4 answer and 'caption' the context the reviewer reads"
    )
    return out


# ------------------------------------------------------------------------------------------------ tasks


class Importer(NamedTuple):
    run: Callable[[list[Path], Images, argparse.Namespace], Collector]
    inputs: tuple[str, ...]  # what each input is (the reference scripts' file names)
    images: str  # "required" (--images), "input N" (that input's folder unless --images), "embedded"
    folder: str = ""  # an example --images folder, as the reference scripts lay it out
    repeat_last: bool = False  # the last input may be given several times


IMPORTERS: dict[str, Importer] = {
    "textvqa": Importer(
        _textvqa,
        ("llava_textvqa_val_v051_ocr.jsonl", "TextVQA_0.5.1_val.json"),
        "required",
        "textvqa/train_images",
    ),
    "pope": Importer(_pope, ("llava_pope_test.jsonl", "coco/"), "required", "pope/val2014", repeat_last=True),
    "mme": Importer(_mme, ("llava_mme.jsonl", "MME_Benchmark_release_version/"), "input 2"),
    "gqa": Importer(
        _gqa, ("llava_gqa_testdev_balanced.jsonl", "testdev_balanced_questions.json"), "required", "gqa/data/images"
    ),
    "scienceqa": Importer(
        _scienceqa,
        ("llava_test_CQM-A.json", "problems.json", "pid_splits.json"),
        "required",
        "scienceqa/images/test",
    ),
    "mmbench": Importer(_mmbench, ("mmbench_dev_20230712.tsv",), "embedded"),
    "mathvista": Importer(_mathvista, ("testmini.json",), "input 1"),
    "llava-bench": Importer(
        _llava_bench,
        ("questions.jsonl", "answers_gpt4.jsonl", "context.jsonl"),
        "required",
        "llava-bench-in-the-wild/images",
    ),
}


def _epilog() -> str:
    lines = ["inputs, per task (the files LLaVA's and MGM's eval scripts pass, in this order):"]
    for task, imp in IMPORTERS.items():
        more = " ..." if imp.repeat_last else ""
        folder = f" --images {imp.folder}" if imp.folder else ""
        lines.append(f"  {task:<12} {' '.join(imp.inputs)}{more}{folder}")
    lines.append("pope: coco/ is the folder of coco_pope_*.json (or name the files); mmbench: --lang cn for the CN")
    lines.append("TSVs. Images: mme's are under the benchmark folder, mathvista's under testmini.json's, mmbench's in")
    lines.append("its TSV (written to OUT/images).")
    lines.append("not importable: MMMU (MGM reads the Hugging Face dataset's parquet files), and the InternVL tasks")
    lines.append("(ai2d, chartqa, docvqa, infovqa, ocrbench), whose files are not in LLaVA/MGM format.")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mgjax.eval.importers",
        description=__doc__.split("\n\n")[0],
        epilog=_epilog(),
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--task", required=True, choices=list(IMPORTERS), help="the benchmark whose files are read")
    ap.add_argument(
        "--out", required=True, metavar="DIR", help="the folder to write questions.jsonl into (mgjax.eval's --data)"
    )
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="the task's source files, in the order listed below")
    ap.add_argument(
        "--images",
        metavar="FOLDER",
        help="the folder the questions' image paths are relative to (the scripts' --image-folder); mme and "
        "mathvista default to the folder they read",
    )
    ap.add_argument(
        "--copy-images",
        action="store_true",
        help="copy the images into OUT/images (default: record their paths relative to OUT)",
    )
    ap.add_argument("--split", default="test", help="scienceqa: the questions' split in pid_splits.json")
    ap.add_argument(
        "--lang",
        choices=("en", "cn"),
        default="en",
        help="mmbench: the answer instruction appended, English or Chinese (the scripts' --lang)",
    )
    return ap


def import_task(task: str, inputs: list[Path], out: Path, *, images: Path | None = None, **options) -> Collector:
    """Read ``task``'s source files, write ``out/questions.jsonl`` (and decoded or copied images) and return the
    records and notes. SourceError on a bad input; nothing is written then."""
    imp = IMPORTERS[task]
    count = len(imp.inputs)
    if len(inputs) < count or (len(inputs) > count and not imp.repeat_last):
        more = " ..." if imp.repeat_last else ""
        raise SourceError(f"{task} reads {' '.join(imp.inputs)}{more}; got {len(inputs)} input(s)")
    if images is None and imp.images.startswith("input "):
        source = inputs[int(imp.images.split()[1]) - 1]
        images = source if source.is_dir() else source.parent
    if images is not None and not images.is_dir():
        raise SourceError(f"--images: no folder {images}")
    if imp.images == "required" and images is None:
        raise SourceError(f"--images: {task}'s questions name image files; pass their folder (e.g. {imp.folder})")
    args = argparse.Namespace(split=options.get("split", "test"), lang=options.get("lang", "en"))
    pictures = Images(out, images, options.get("copy_images", False))
    result = imp.run(inputs, pictures, args)
    if task in scoring.TASKS:  # the scorer's own field checks, on an empty answer to each question
        try:
            scoring.score(task, [{**r, "answer": ""} for r in result.records])
        except ValueError as e:
            raise SourceError(f"{task}: an imported record fails the scorer's checks: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    result.images = pictures.flush()
    target = out / "questions.jsonl"
    partial = out / "questions.jsonl.partial"
    with open(partial, "w", encoding="utf-8") as f:
        for record in result.records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(partial, target)
    return result


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    try:
        result = import_task(
            args.task,
            [Path(p) for p in args.inputs],
            out,
            images=Path(args.images) if args.images else None,
            copy_images=args.copy_images,
            split=args.split,
            lang=args.lang,
        )
    except (SourceError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.task}: {len(result.records)} questions -> {out / 'questions.jsonl'}")
    if result.images:
        print(f"  {result.images} images written under {out / 'images'}")
    for note in result.notes:
        print(f"  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
