"""LLaVA-format records -> MGM training inputs, with every kind of bad record counted and reported, and a batch
of image and text-only rows through the train step."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import mgjax
from mgjax.data import samples, templates
from mgjax.models.mgm import IMAGE_TOKEN_INDEX
from mgjax.train import optim
from mgjax.train.step import make_optimizer, train_step
from tests.helpers import TINY_MGM, tokenizer

GOOD = {
    "id": "good",
    "image": "cat.png",
    "conversations": [{"from": "human", "value": "what is this ?\n<image>"}, {"from": "gpt", "value": "a red cat ."}],
}
TEXT = {
    "id": "text",
    "conversations": [{"from": "human", "value": "what is this ?"}, {"from": "gpt", "value": "a cat ."}],
}
BAD = {  # id -> (record changes, reason)
    "missing": ({"image": "nowhere.png"}, "missing or corrupt image"),
    "corrupt": ({"image": "broken.png"}, "missing or corrupt image"),
    "two-marks": (
        {"conversations": [{"from": "human", "value": "<image> <image> what ?"}, {"from": "gpt", "value": "a cat ."}]},
        "<image> count mismatch",
    ),
    "no-answer": ({"conversations": [{"from": "human", "value": "<image> what ?"}]}, "tokenization mismatch"),
    "no-conv": ({"conversations": None}, "no conversations"),
    # issue 21: these ended runs with a traceback, or were reported under another reason
    "string-turn": ({"conversations": ["what ?\n<image>", {"from": "gpt", "value": "a cat ."}]}, "malformed turn"),
    "empty": ({"conversations": []}, "empty conversation"),
    "up-and-out": ({"image": "../cat.png"}, "image path outside image_folder"),
    "absolute": ({"image": "/etc/hostname"}, "image path outside image_folder"),
}
LINES = {  # JSONL lines that are not records -> the reason
    b"{not json": "unreadable JSON line",
    b"42": "not a record",
    b'{"id": "caf\xe9", "conversations": []}': "unreadable JSON line",  # Latin-1, not UTF-8
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(root / "cat.png")
    (root / "broken.png").write_bytes(b"\x89PNG truncated")
    lines = [json.dumps(GOOD).encode(), json.dumps(TEXT).encode(), *LINES]
    lines += [json.dumps({**GOOD, "id": name, **change}).encode() for name, (change, _) in BAD.items()]
    (root / "data.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def _make(folder, max_length=40):
    return samples.MGMSamples(TINY_MGM, tokenizer(), "chatml_direct", str(folder), max_length=max_length)


def test_bad_records_are_counted_by_reason_and_reported(folder, tmp_path):
    report = samples.BadSamples(max_fraction=1.0)
    out = list(samples.build(samples.read_records(folder / "data.jsonl"), _make(folder), report))
    assert [int(s["has_image"]) for s in out] == [1, 0]
    assert report.seen == 2 + len(LINES) + len(BAD) and report.count == len(LINES) + len(BAD)
    want = {}
    for reason in [*LINES.values(), *(reason for _, reason in BAD.values())]:
        want[reason] = want.get(reason, 0) + 1
    assert dict(report.reasons) == want
    report.write(tmp_path / "bad.json")
    written = json.loads((tmp_path / "bad.json").read_text())
    assert written["skipped"] == len(LINES) + len(BAD)
    assert any("data.jsonl:3" in s for s in written["samples"]["unreadable JSON line"])
    assert any(s.startswith("data.jsonl:5: not UTF-8 at byte 11") for s in written["samples"]["unreadable JSON line"])
    assert written["samples"]["not a record"] == ["data.jsonl:4: a JSON int (42) instead of an object"]
    assert any(s.startswith("corrupt: ") and "broken.png" in s for s in written["samples"]["missing or corrupt image"])


def test_too_many_bad_records_stop_the_run(folder):
    bad = len(LINES) + len(BAD)
    with pytest.raises(RuntimeError, match=rf"{bad} of {bad + 2} samples are unusable .*missing or corrupt image: 2"):
        list(samples.build(samples.read_records(folder / "data.jsonl"), _make(folder), samples.BadSamples()))


def test_whatever_a_record_raises_makes_it_a_bad_sample_not_a_crash():
    def make(record):
        return {"x": np.int32(record["missing key"])}

    report = samples.BadSamples(max_fraction=1.0)
    assert list(samples.build([{"id": "k"}, 7], make, report)) == []
    assert report.reasons == {"unusable record": 2}
    assert report.examples["unusable record"][0] == "k: KeyError: 'missing key'"


def test_images_above_the_pixel_cap_are_refused_before_decoding(folder):
    make = samples.MGMSamples(TINY_MGM, tokenizer(), "chatml_direct", str(folder), max_length=40, max_image_pixels=2399)
    with pytest.raises(samples.BadSample, match="60x40 pixels is more than the 2,399 allowed"):
        make(GOOD)
    assert make.__class__(**{**make.__dict__, "max_image_pixels": 2400})(GOOD)["has_image"] == 1


def test_a_json_list_that_is_not_utf8_names_the_byte(tmp_path):
    (tmp_path / "d.json").write_bytes(b'[{"id": "caf\xe9"}]')
    with pytest.raises(ValueError, match="d.json: not UTF-8 at byte 12"):
        list(samples.read_records(tmp_path / "d.json"))
    (tmp_path / "e.json").write_bytes(b'[{"id": "a"}, 3]')
    assert [getattr(r, "reason", r) for r in samples.read_records(tmp_path / "e.json")] == [{"id": "a"}, "not a record"]


def test_sample_layout_and_over_length(folder):
    make = _make(folder)
    s = make(GOOD)
    ids, labels = s["input_ids"], s["labels"]
    assert ids.shape == labels.shape == (40,) and (ids == IMAGE_TOKEN_INDEX).sum() == TINY_MGM.tokens_per_image
    trained = labels != templates.IGNORE_INDEX
    assert tokenizer().decode(ids[trained]) == "a red cat . <|im_end|>"
    assert not s["attention_mask"][trained.nonzero()[0][-1] + 1 :].any()  # right padding
    with pytest.raises(samples.BadSample, match="over-length"):
        _make(folder, max_length=20)(GOOD)  # the answer would start past 20 tokens


def test_a_mixed_batch_trains(folder):
    """Image and text-only rows in one batch: the text-only row's zero image is computed but never merged."""
    make = _make(folder)
    batch = [make(GOOD), make(TEXT)]
    stacked = {
        k: jnp.asarray(np.stack([b[k] for b in batch]))[None] for k in ("input_ids", "labels", "images", "images_aux")
    }
    model = mgjax.init(TINY_MGM, seed=0)
    text_only = model.embed(stacked["input_ids"][0][1:])  # row 1 alone, no image at all
    mixed = model.embed(stacked["input_ids"][0], stacked["images"][0], stacked["images_aux"][0])
    np.testing.assert_array_equal(np.asarray(mixed[1]), np.asarray(text_only[0]))
    opt = make_optimizer(model, optim.MGM_STAGE2, optim.OptimConfig(lr=1e-3, warmup_ratio=0.0), 10)
    metrics = train_step(model, opt, stacked)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["tokens"]) == 5 + 4  # both answers + <|im_end|>
