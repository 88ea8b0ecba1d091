"""Domain tasks -> InternVL records: the exact texts, box arithmetic and validation, the stitched canvas, the meta
reader's repeat_time, the general/domain mix, and the command line."""

import argparse
import csv
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from mgjax.data import formatters as F
from mgjax.data import meta as meta_lib
from mgjax.data import samples

CLASSES = ["airport", "beach", "forest", "river"]
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (120, 60, 10)]
LAYOUT = (
    "The image stitches six camera views in two rows. Top row, left to right: CAM_FRONT_LEFT, CAM_FRONT, "
    "CAM_FRONT_RIGHT. Bottom row, left to right: CAM_BACK_LEFT, CAM_BACK, CAM_BACK_RIGHT."
)


def _turns(record):
    return [t["value"] for t in record["conversations"]]


def _image(path: Path, size=(64, 48), colour=(90, 90, 90)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path.name


# --- classification --------------------------------------------------------------------------------------------


def test_classification_lettered_options():
    record = F.classification("rs_1", "rs/1.jpg", "beach", CLASSES, seed=0)
    assert record == {
        "id": "rs_1",
        "image": "rs/1.jpg",
        "conversations": [
            {
                "from": "human",
                "value": "<image>\nClassify the image within one of the given classes.\nA. river\n"
                "B. forest\nC. beach\nD. airport\n"
                "Answer with the option's letter from the given choices directly.",
            },
            {"from": "gpt", "value": "C"},
        ],
    }


def test_classification_open_form_is_the_papers():
    record = F.classification("rs_1", "rs/1.jpg", "beach", CLASSES, seed=0, letters=False)
    assert _turns(record) == [
        "<image>\nClassify the image within one of the given classes: river, forest, "
        "beach, airport. Answer with one word or short phrase.",
        "beach",
    ]


def test_classification_options_are_seeded_per_sample():
    three = F.classification("rs_1", "rs/1.jpg", "beach", CLASSES, seed=0, num_options=3)
    assert _turns(three) == [
        "<image>\nClassify the image within one of the given classes.\nA. river\nB. airport\n"
        "C. beach\nAnswer with the option's letter from the given choices directly.",
        "C",
    ]
    for i in range(50):
        label = CLASSES[i % 4]
        question, answer = _turns(F.classification(f"s{i}", "x.jpg", label, CLASSES, seed=7, num_options=2))
        options = dict(line.split(". ", 1) for line in question.splitlines()[2:4])
        assert len(options) == 2 and options[answer] == label
    assert F.classification("s3", "x.jpg", "beach", CLASSES, seed=7) == F.classification(
        "s3", "x.jpg", "beach", CLASSES, seed=7
    )
    orders = {_turns(F.classification("s3", "x.jpg", "beach", CLASSES, seed=s))[0] for s in range(10)}
    assert len(orders) > 1


@pytest.mark.parametrize(
    "label, candidates, kwargs, reason",
    [
        ("lake", CLASSES, {}, "'lake' is not among"),
        ("beach", CLASSES + ["beach"], {}, "repeat"),
        ("beach", CLASSES, {"num_options": 5}, "num_options 5"),
        ("c0", [f"c{i}" for i in range(27)], {}, "27 options do not fit"),
    ],
)
def test_classification_rejects(label, candidates, kwargs, reason):
    with pytest.raises(ValueError, match=f"sample rs_9: .*{reason}"):
        F.classification("rs_9", "x.jpg", label, candidates, **kwargs)


# --- boxes -------------------------------------------------------------------------------------------------------


def test_box_normalisation_arithmetic():
    assert F.normalise_box("a", (192, 108, 960, 540), (1920, 1080)) == [100, 100, 500, 500]
    assert F.normalise_box("a", (0, 0, 1920, 1080), (1920, 1080)) == [0, 0, 1000, 1000]
    assert F.normalise_box("a", (1, 1, 3, 6), (7, 7)) == [142, 142, 428, 857]  # truncated, not rounded
    assert F.normalise_box("a", (0.3, 0, 0.7, 1), (1, 1)) == [300, 0, 700, 1000]  # 0.3 as written, not 0.2999...


def test_grounding_texts():
    record = F.grounding("ref_1", "coco/1.jpg", (1920, 1080), "the red car", (192, 108, 960, 540))
    assert record == {
        "id": "ref_1",
        "image": "coco/1.jpg",
        "width": 1920,
        "height": 1080,
        "conversations": [
            {
                "from": "human",
                "value": "<image>\nPlease provide the bounding box coordinate of the region this "
                "sentence describes: <ref>the red car</ref>",
            },
            {"from": "gpt", "value": "<ref>the red car</ref><box>[[100, 100, 500, 500]]</box>"},
        ],
    }
    two = F.grounding(
        "ref_2",
        "rs/2.jpg",
        (800, 800),
        "1 overpass",
        [(0, 0, 400, 400), (400, 80, 800, 800)],
        question=F.DETECT_QUESTION,
    )
    assert _turns(two) == [
        "<image>\nDetect <ref>1 overpass</ref>",
        "<ref>1 overpass</ref><box>[[0, 0, 500, 500], [500, 100, 1000, 1000]]</box>",
    ]


@pytest.mark.parametrize(
    "box, reason",
    [
        ((960, 108, 192, 540), "empty or inverted"),
        ((192, 540, 960, 540), "empty or inverted"),
        ((-1, 108, 960, 540), "not inside the 1920x1080 image"),
        ((192, 108, 1921, 540), "not inside the 1920x1080 image"),
        ((192, 108, 960, 1081), "not inside the 1920x1080 image"),
        ((192, float("nan"), 960, 540), "not four finite numbers"),
        ((192, 108, 960), "not four finite numbers"),
    ],
)
def test_invalid_boxes_name_the_sample(box, reason):
    with pytest.raises(ValueError, match=f"^sample car_7: box .*{reason}"):
        F.grounding("car_7", "x.jpg", (1920, 1080), "a car", box)
    with pytest.raises(ValueError, match="^sample car_8: "):
        F.region("car_8", "x.jpg", (1920, 1080), box, "car")


def test_region_texts():
    label = F.region("rs_3", "rs/3.jpg", (1920, 1080), (192, 108, 960, 540), "storage tank")
    assert _turns(label) == [
        "<image>\nWhat object is in this location<box>[[100, 100, 500, 500]]</box>",
        "<ref>storage tank</ref><box>[[100, 100, 500, 500]]</box>",
    ]
    caption = F.region("vg_4", "vg/4.jpg", (1920, 1080), (192, 108, 960, 540), "A man riding a horse.", kind="text")
    assert _turns(caption) == [
        "<image>\nPlease provide a short description for this region: <box>[[100, 100, 500, 500]]</box>",
        "A man riding a horse.",
    ]
    vqa = F.region(
        "vg_5",
        "vg/4.jpg",
        (1920, 1080),
        (192, 108, 960, 540),
        "Brown.",
        kind="text",
        question="What colour is the horse in <box>{box}</box>?",
    )
    assert _turns(vqa)[0] == "<image>\nWhat colour is the horse in <box>[[100, 100, 500, 500]]</box>?"


def test_text_holding_an_image_placeholder_is_refused():
    with pytest.raises(ValueError, match="sample v_1: .*<image>"):
        F.video("v_1", ["a.jpg"], "What is in <image>?", "A cat.")
    with pytest.raises(ValueError, match="sample r_1: .*<image>"):
        F.region("r_1", "a.jpg", (10, 10), (1, 1, 5, 5), "<image>")


# --- multi-view --------------------------------------------------------------------------------------------------


def _views(tmp_path):
    """Six solid views of odd sizes, the even ones as files."""
    views = [Image.new("RGB", (40 + k, 20 + k), colour) for k, colour in enumerate(COLOURS)]
    for k in range(0, 6, 2):
        views[k].save(tmp_path / f"v{k}.png")
        views[k] = tmp_path / f"v{k}.png"
    return views


def test_multiview_canvas_layout(tmp_path):
    views = _views(tmp_path)
    canvas, record = F.multiview(
        "scene_1", views, "What is the ego vehicle doing?", "Going straight.", "stitch/scene_1.jpg"
    )
    assert canvas.size == (2688, 896) and canvas.mode == "RGB"
    for k, colour in enumerate(COLOURS):
        left, top = (k % 3) * 896, (k // 3) * 448
        assert canvas.getpixel((left + 448, top + 224)) == colour  # the view's centre
        assert canvas.getpixel((left + 895, top + 447)) == colour  # its bottom-right corner
        tag = canvas.crop((left, top, left + 600, top + 70))
        assert (255, 0, 255) in {c for _, c in tag.getcolors(600 * 70)}, F.CAMERAS[k]
    plain = F.stitch_views(dict(zip(F.CAMERAS, views)), tags=False)
    assert (255, 0, 255) not in {c for _, c in plain.getcolors(2688 * 896)}
    assert plain.getpixel((0, 0)) == COLOURS[0] and plain.getpixel((2687, 895)) == COLOURS[5]
    assert record == {
        "id": "scene_1",
        "image": "stitch/scene_1.jpg",
        "width": 2688,
        "height": 896,
        "conversations": [
            {"from": "human", "value": f"<image>\n{LAYOUT}\nWhat is the ego vehicle doing?"},
            {"from": "gpt", "value": "Going straight."},
        ],
    }
    saved = F.save_canvas(canvas, tmp_path / "root", record)
    assert saved == tmp_path / "root" / "stitch" / "scene_1.jpg"
    with Image.open(saved) as im:
        assert im.size == (2688, 896)


def test_multiview_rejects_wrong_views():
    with pytest.raises(ValueError, match="5 views given"):
        F.stitch_views([Image.new("RGB", (4, 4))] * 5)
    with pytest.raises(ValueError, match="keyed by exactly"):
        F.stitch_views({c: Image.new("RGB", (4, 4)) for c in F.CAMERAS[:5] + ("CAM_TOP",)})


def test_multiview_point():
    assert F.multiview_point("CAM_FRONT_LEFT", 0, 0) == (0, 0)
    assert F.multiview_point("CAM_BACK", 800, 450) == (500, 750)
    assert F.multiview_point("CAM_BACK_RIGHT", 1600, 900) == (1000, 1000)
    assert F.multiview_point("CAM_FRONT_RIGHT", 400, 900) == (750, 500)


# --- video -------------------------------------------------------------------------------------------------------


def test_video_prefix():
    record = F.video(
        "bddx_1", ["clip/0.jpg", "clip/1.jpg", "clip/2.jpg"], "What is the car doing?", "The car slows down."
    )
    assert record == {
        "id": "bddx_1",
        "image": ["clip/0.jpg", "clip/1.jpg", "clip/2.jpg"],
        "conversations": [
            {"from": "human", "value": "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\nWhat is the car doing?"},
            {"from": "gpt", "value": "The car slows down."},
        ],
    }


# --- meta files and mixing ---------------------------------------------------------------------------------------


def _jsonl(path: Path, prefix: str, n: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": f"{prefix}{i}"}) + "\n" for i in range(n)))
    return path.name


def _meta(tmp_path, entries) -> Path:
    path = tmp_path / "meta.json"
    path.write_text(json.dumps(entries))
    return path


def test_read_meta_repeat_time(tmp_path):
    _jsonl(tmp_path / "ann" / "half.jsonl", "h", 5)
    _jsonl(tmp_path / "ann" / "twice.jsonl", "t", 3)
    _jsonl(tmp_path / "ann" / "cut.jsonl", "c", 100)
    meta = _meta(
        tmp_path,
        {
            "half": {"root": "img/half", "annotation": "ann/half.jsonl", "repeat_time": 0.5, "length": 5},
            "twice": {
                "root": "/abs/img",
                "annotation": "ann/twice.jsonl",
                "repeat_time": 2,
                "data_augment": True,
                "max_dynamic_patch": 6,
            },
            "cut": {"root": "", "annotation": "ann/cut.jsonl", "repeat_time": 0.29},
        },
    )
    half, twice, cut = meta_lib.read_meta(meta)
    assert [r["id"] for r in half.records] == ["h0", "h1"]  # the first int(5 * 0.5) = 2
    assert (half.root, half.annotation, half.length) == (
        str(tmp_path / "img/half"),
        str(tmp_path / "ann/half.jsonl"),
        5,
    )
    assert [r["id"] for r in twice.records] == ["t0", "t1", "t2", "t0", "t1", "t2"]
    assert (twice.root, twice.data_augment, twice.max_dynamic_patch) == ("/abs/img", True, 6)
    assert len(cut.records) == 28  # int(100 * 0.29) with InternVL's float product, 28.999...
    assert meta_lib.apply_repeat_time(list(range(10)), 1) == list(range(10))
    assert meta_lib.apply_repeat_time(list(range(10)), 0) == []


@pytest.mark.parametrize(
    "entry, where",
    [
        ({"root": "", "annotation": "a.jsonl", "repeat_time": 1, "repeat_times": 2}, "coco.repeat_times: unknown key"),
        ({"root": "", "repeat_time": 1}, "coco.annotation: missing"),
        ({"root": "", "annotation": "a.json", "repeat_time": 1}, "coco.annotation: 'a.json' is not a .jsonl"),
        ({"root": "", "annotation": "a.jsonl", "repeat_time": 1.5}, "coco.repeat_time: 1.5 is above 1"),
        ({"root": "", "annotation": "a.jsonl", "repeat_time": -1}, "coco.repeat_time: expected a number"),
        ({"root": "", "annotation": "a.jsonl", "repeat_time": 1, "data_augment": "yes"}, "coco.data_augment"),
        ({"root": "", "annotation": "a.jsonl", "repeat_time": 1, "length": -3}, "coco.length"),
        ({"root": "", "annotation": "gone.jsonl", "repeat_time": 1}, "coco.annotation: .*does not exist"),
    ],
)
def test_read_meta_errors_name_file_and_key(tmp_path, entry, where):
    _jsonl(tmp_path / "a.jsonl", "a", 2)
    meta = _meta(tmp_path, {"coco": entry})
    with pytest.raises(ValueError, match=f"meta.json: {where}"):
        meta_lib.read_meta(meta)


def test_read_meta_names_a_bad_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n{"id": 2\n')
    with pytest.raises(ValueError, match=r"meta.json: coco.annotation: .*a.jsonl:2: not valid JSON"):
        meta_lib.read_meta(_meta(tmp_path, {"coco": {"root": "", "annotation": "a.jsonl", "repeat_time": 1}}))


def _source(name: str, n: int) -> meta_lib.Source:
    return meta_lib.Source(name, "root", f"{name}.jsonl", 1, [{"id": f"{name}{i}"} for i in range(n)])


def test_mix_one_to_four():
    domain = [_source("drivelm", 30), _source("nuscenes", 10)]
    general = [_source("sharegpt4v", 60), _source("dvqa", 20)]
    mixed = meta_lib.mix(domain, general, 0.25, seed=1)
    counts = Counter(r["source"] for r in mixed)
    assert counts == {"drivelm": 30, "nuscenes": 10, "sharegpt4v": 8, "dvqa": 2}  # 10 general: 7.5 + 2.5 -> 8 + 2
    assert sum(counts[s.name] for s in general) * 4 == sum(counts[s.name] for s in domain)
    assert sorted(r["id"] for r in mixed if r["source"] == "drivelm") == sorted(f"drivelm{i}" for i in range(30))
    assert len({r["id"] for r in mixed if r["source"] == "sharegpt4v"}) == 8  # drawn without replacement
    assert "source" not in domain[0].records[0]  # tagged copies
    assert list(meta_lib.mix(domain, general, 0.25, seed=1)) == list(mixed)
    assert list(meta_lib.mix(domain, general, 0.25, seed=2)) != list(mixed)


def test_mix_one_to_one_upsamples_small_general_data():
    mixed = meta_lib.mix([_source("bddx", 40)], [_source("llava", 30)], 1.0, seed=0)
    general = Counter(r["id"] for r in mixed if r["source"] == "llava")
    assert sum(general.values()) == 40 and len(general) == 30 and max(general.values()) == 2
    with pytest.raises(ValueError, match="general sources are empty"):
        meta_lib.mix([_source("bddx", 4)], [_source("llava", 0)], 1.0)


# --- command line ------------------------------------------------------------------------------------------------


def _csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_grounding_and_classification(tmp_path, capsys):
    root = tmp_path / "images"
    _image(root / "a.png", (1920, 1080))
    _image(root / "b.png", (200, 100))
    labels = _csv(
        tmp_path / "boxes.csv",
        [
            {"id": "a", "image": "a.png", "expr": "the red car", "x1": 192, "y1": 108, "x2": 960, "y2": 540},
            {"id": "b", "image": "b.png", "expr": "a tree", "x1": 0, "y1": 0, "x2": 200, "y2": 50},
        ],
    )
    out = tmp_path / "out" / "grounding.jsonl"
    assert (
        F.main(
            ["grounding", "--input", str(labels), "--image-root", str(root), "--out", str(out), "--question", "detect"]
        )
        == 0
    )
    assert _records(out) == [
        {
            "id": "a",
            "image": "a.png",
            "width": 1920,
            "height": 1080,
            "conversations": [
                {"from": "human", "value": "<image>\nDetect <ref>the red car</ref>"},
                {"from": "gpt", "value": "<ref>the red car</ref><box>[[100, 100, 500, 500]]</box>"},
            ],
        },
        {
            "id": "b",
            "image": "b.png",
            "width": 200,
            "height": 100,
            "conversations": [
                {"from": "human", "value": "<image>\nDetect <ref>a tree</ref>"},
                {"from": "gpt", "value": "<ref>a tree</ref><box>[[0, 0, 1000, 500]]</box>"},
            ],
        },
    ]
    classes = _csv(
        tmp_path / "classes.csv",
        [{"id": "a", "image": "a.png", "label": "road"}, {"id": "b", "image": "b.png", "label": "forest"}],
    )
    out = tmp_path / "classes.jsonl"
    assert F.main(["classification", "--input", str(classes), "--image-root", str(root), "--out", str(out)]) == 0
    first = _records(out)[0]
    assert first == F.classification("a", "a.png", "road", ["forest", "road"], seed=0)
    assert "2 records" in capsys.readouterr().out


def test_cli_help_explains_every_flag_and_shows_defaults(capsys):
    top = F._parser()
    tasks = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices
    for parser in [top, *tasks.values()]:
        assert [a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction) and not a.help] == []
    with pytest.raises(SystemExit) as exit_:
        F.main(["classification", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "distractors and their order (default: 0)" in text and "(default: letter)" in text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_cli_missing_input_names_the_flag(tmp_path, capsys):
    missing, out = tmp_path / "labels.csv", tmp_path / "out.jsonl"
    assert F.main(["grounding", "--input", str(missing), "--image-root", str(tmp_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: --input {missing}: No such file or directory\n"
    assert not out.exists()


def test_cli_multiview_and_video(tmp_path):
    root = tmp_path / "images"
    row = {"id": "s1", "question": "Is it safe to turn left?", "answer": "No."}
    for camera, colour in zip(F.CAMERAS, COLOURS):
        row[camera] = "cams/" + _image(root / "cams" / f"{camera}.png", (32, 18), colour)
    out = tmp_path / "drive.jsonl"
    assert (
        F.main(
            [
                "multiview",
                "--input",
                str(_csv(tmp_path / "drive.csv", [row])),
                "--image-root",
                str(root),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    (record,) = _records(out)
    assert record["image"] == "stitch/s1.jpg" and _turns(record)[0] == f"<image>\n{LAYOUT}\nIs it safe to turn left?"
    with Image.open(root / "stitch" / "s1.jpg") as im:
        assert im.size == (2688, 896)
    frames = [_image(root / f"f{i}.png") for i in range(2)]
    (tmp_path / "clips.json").write_text(
        json.dumps([{"id": 7, "frames": frames, "question": "Why?", "answer": "A light."}])
    )
    out = tmp_path / "video.jsonl"
    assert F.main(["video", "--input", str(tmp_path / "clips.json"), "--image-root", str(root), "--out", str(out)]) == 0
    assert _records(out) == [F.video("7", ["f0.png", "f1.png"], "Why?", "A light.")]


def test_cli_bad_rows_exit_2_and_write_nothing(tmp_path):
    root = tmp_path / "images"
    _image(root / "a.png", (100, 100))
    labels = _csv(
        tmp_path / "boxes.csv",
        [
            {"id": "ok", "image": "a.png", "x1": 10, "y1": 10, "x2": 50, "y2": 50, "answer": "car"},
            {"id": "flipped", "image": "a.png", "x1": 60, "y1": 10, "x2": 50, "y2": 50, "answer": "car"},
            {"id": "lost", "image": "gone.png", "x1": 1, "y1": 1, "x2": 5, "y2": 5, "answer": "car"},
            {"id": "word", "image": "a.png", "x1": "ten", "y1": 1, "x2": 5, "y2": 5, "answer": "car"},
        ],
    )
    out = tmp_path / "region.jsonl"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mgjax.formatters",
            "region",
            "--input",
            str(labels),
            "--image-root",
            str(root),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    assert result.returncode == 2, result.stderr
    errors = result.stderr.splitlines()
    assert len(errors) == 3
    assert "boxes.csv row 2: sample flipped: box [60, 10, 50, 50] is empty or inverted" in errors[0]
    assert "boxes.csv row 3: image gone.png not found" in errors[1]
    assert "boxes.csv row 4: column 'x1' is not a number: 'ten'" in errors[2]
    assert list(tmp_path.glob("*.jsonl")) == [] and list(tmp_path.glob(".*")) == []


def test_cli_bad_multiview_row_writes_no_canvas(tmp_path):
    root = tmp_path / "images"
    row = {"id": "s1", "question": "Q?", "answer": "A."}
    row.update({camera: _image(root / f"{camera}.png") for camera in F.CAMERAS})
    bad = dict(row, id="s2", CAM_BACK="missing.png")
    out = tmp_path / "drive.jsonl"
    assert (
        F.main(
            [
                "multiview",
                "--input",
                str(_csv(tmp_path / "drive.csv", [row, bad])),
                "--image-root",
                str(root),
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert not out.exists() and not (root / "stitch").exists()


def test_rooted_records_find_their_images_under_their_source_root(tmp_path):
    record = {"id": "a", "image": "x/1.png", "conversations": []}
    tagged = meta_lib.rooted(record, "/data/drive")
    assert tagged == {**record, "image_root": "/data/drive"} and "image_root" not in record  # a copy
    assert samples.located(tagged, "", "x/1.png", sample="a") == Path("/data/drive/x/1.png")
    assert samples.located(record, "/elsewhere", "x/1.png", sample="a") == Path("/elsewhere/x/1.png")
    for escaping in ("../1.png", "x/../../1.png", "/etc/passwd"):
        with pytest.raises(samples.BadSample, match="image path outside image_folder"):
            samples.located(tagged, "", escaping, sample="a")
        assert samples.located(tagged, "", escaping, sample="a", anywhere=True)  # allowed by the setting
    assert samples.located(tagged, "", "x/../1.png", sample="a") == Path("/data/drive/x/../1.png")  # stays inside
