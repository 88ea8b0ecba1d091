"""ArrayRecord shard datasets (``python -m mgjax.data.convert``): the records, images, bad records, grouping lengths
and training batches read back from shards are those of the JSON file they came from; damaged entries and manifests
are reported, never crash; InternVL meta files convert dataset by dataset and mix as before."""

import json
import random

import numpy as np
import pytest
from PIL import Image

from mgjax.data import convert, loader, meta, preprocess, samples, shards
from tests.helpers import TINY_MGM, tokenizer


def _turns(question, answer):
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    """A JSONL file of image, text-only, missing-image and unreadable records, and its shard dataset."""
    root = tmp_path_factory.mktemp("llava")
    (root / "images").mkdir()
    colours = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 20)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (40 + 8 * i, 30), colour).save(root / "images" / f"{i}.png")
    records = [
        {"id": f"img{i}", "image": f"images/{i % 4}.png", "conversations": _turns("what is this ?\n<image>", "a cat .")}
        for i in range(9)
    ]
    records += [
        {"id": "text", "conversations": _turns("what is this ?", "a red cat .")},
        {"id": "missing", "image": "images/nowhere.png", "conversations": _turns("<image> what ?", "a cat .")},
        {"id": "marks", "image": "images/1.png", "conversations": _turns("<image> <image> what ?", "a cat .")},
    ]
    lines = [json.dumps(r) for r in records]
    lines.insert(5, "{not json")
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = root / "shards"
    assert convert.main(["--data", str(root / "train.jsonl"), "--out", str(out), "--records-per-shard", "4"]) == 0
    return root, out


def test_records_and_images_come_back_as_written(llava):
    root, out = llava
    written = list(samples.read_records(root / "train.jsonl"))
    read = shards.Shards(out)
    assert len(read) == len(written) == 13 and len(read.files) == 4  # 13 records, 4 a shard
    for want, got in zip(written, read):
        if isinstance(want, samples.BadSample):  # the unreadable line: the same bad sample, named alike
            assert (got.sample, got.reason) == (want.sample, want.reason)
        elif want["id"] == "missing":
            assert isinstance(got, samples.BadSample) and got.reason == "missing or corrupt image"
            assert "nowhere.png" in got.detail
        elif "image" in want:
            assert got["conversations"] == want["conversations"] and got["id"] == want["id"]
            assert got["image"] == preprocess.EncodedImage(want["image"], (root / want["image"]).read_bytes())
        else:
            assert got == want
    assert read[-1] == read[len(read) - 1] and read[2:4] == [read[2], read[3]]
    # grouping lengths from the manifest alone, equal to those of the records themselves
    assert read.lengths(16) == [loader.record_length(r, 16) for r in written]


def test_training_batches_and_bad_sample_report_equal_the_json_files(llava):
    root, out = llava
    make = samples.MGMSamples(TINY_MGM, tokenizer(), "chatml_direct", str(root), max_length=64)
    from_json, from_shards = samples.BadSamples(max_fraction=0.5), samples.BadSamples(max_fraction=0.5)
    want = list(loader.Batches(list(samples.read_records(root / "train.jsonl")), make, batch=2, report=from_json))
    got = list(loader.Batches(shards.Shards(out), make, batch=2, workers=1, report=from_shards))
    assert len(got) == len(want) == 4  # 10 good samples, 2 a batch, the last partial one dropped
    for a, b in zip(want, got):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert (
        from_json.reasons
        == from_shards.reasons
        == {
            "unreadable JSON line": 1,
            "missing or corrupt image": 1,
            "<image> count mismatch": 1,
        }
    )
    assert from_shards.seen == from_json.seen


def test_a_batch_reads_only_its_records(llava, monkeypatch):
    _, out = llava
    read, asked = shards.Shards(out), []
    original = shards.decode
    monkeypatch.setattr(shards, "decode", lambda entry, where: asked.append(where) or original(entry, where))
    batches = loader.Batches(read, lambda r: {"x": np.int32(0)}, batch=2, report=samples.BadSamples(max_fraction=1))
    assert asked == []  # nothing read up front (a list of records would be the whole file in memory)
    next(batches)
    assert 2 <= len(asked) < len(read)  # the first batch (and what grain reads ahead), not the whole dataset


def test_damaged_entries_are_bad_samples_never_exceptions():
    entry = shards.encode({"id": "a", "image": "x.png", "conversations": []}, [b"\x89PNG" + bytes(60)])
    assert shards.decode(entry, "s#0")["image"].data == b"\x89PNG" + bytes(60)
    rng = random.Random(0)
    for trial in range(300):
        damaged = bytearray(entry)
        if trial % 3 == 0:
            damaged = damaged[: rng.randrange(len(damaged))]  # truncated
        for _ in range(rng.randint(1, 4)):
            if damaged:
                damaged[rng.randrange(len(damaged))] = rng.randrange(256)  # flipped bytes
        got = shards.decode(bytes(damaged), "s#0")
        assert isinstance(got, (dict, samples.BadSample))
        if isinstance(got, samples.BadSample):
            assert got.sample == "s#0"
    head = json.dumps({"record": {"id": "a", "image": "x.png"}, "images": [10]}).encode()
    short = shards.MAGIC + len(head).to_bytes(4, "little") + head + bytes(4)
    bad = shards.decode(short, "s#1")
    assert bad.reason == "damaged shard record" and "10 bytes, 4 follow" in bad.detail
    head = json.dumps({"record": {"id": "a"}, "images": [4]}).encode()
    bad = shards.decode(shards.MAGIC + len(head).to_bytes(4, "little") + head + bytes(4), "s#2")
    assert "1 images for the record's image field None" in bad.detail


def test_manifests_are_checked(llava, tmp_path):
    _, out = llava
    with pytest.raises(ValueError, match="not a shard dataset"):
        shards.Shards(tmp_path)
    manifest = json.loads((out / shards.MANIFEST).read_text())
    for change, message in [
        ({"format": "other"}, "not a mgjax-shards/1 manifest"),
        ({"shards": [{"path": "../x.array_record", "records": 13}]}, "a file name in the folder"),
        ({"sizes": manifest["sizes"][:-1]}, "one \\[words, has_image\\] per record"),
    ]:
        (tmp_path / shards.MANIFEST).write_text(json.dumps({**manifest, **change}))
        with pytest.raises(ValueError, match=message):
            shards.Shards(tmp_path)
    with pytest.raises(FileExistsError, match="already holds a shard dataset"):
        shards.write([], tmp_path, out, per_shard=4)


def test_cli_refusals(llava, tmp_path, capsys):
    root, out = llava
    assert convert.main(["--data", str(root / "train.jsonl"), "--out", str(out)]) == 2
    assert "already holds a shard dataset" in capsys.readouterr().err
    assert convert.main(["--data", str(root / "nowhere.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        convert.main(["--data", str(root / "train.jsonl"), "--out", str(tmp_path), "--records-per-shard", "0"])
    assert exit.value.code == 2 and "argument --records-per-shard: must be >= 1, not 0" in capsys.readouterr().err


def test_meta_files_convert_per_dataset_and_mix_as_before(tmp_path):
    for name, n in (("drive", 6), ("general", 5)):
        (tmp_path / name).mkdir()
        for i in range(n):
            Image.new("RGB", (16, 16), (i * 40, 0, 0)).save(tmp_path / name / f"{i}.png")
        rows = [{"id": f"{name}{i}", "image": f"{i}.png", "conversations": _turns("<image> ?", "x")} for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {
        "drive": {"root": "drive", "annotation": "drive.jsonl", "repeat_time": 2, "max_dynamic_patch": 4},
        "general": {"root": "general", "annotation": "general.jsonl", "repeat_time": 0.6},
    }
    (tmp_path / "meta.json").write_text(json.dumps(source))
    assert convert.main(["--meta", str(tmp_path / "meta.json"), "--out", str(tmp_path / "out")]) == 0
    converted = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert converted["drive"]["repeat_time"] == 2 and converted["drive"]["max_dynamic_patch"] == 4
    before, after = meta.read_meta(tmp_path / "meta.json"), meta.read_meta(tmp_path / "out" / "meta.json")
    for a, b in zip(before, after):
        assert [r["id"] for r in a.records] == [r["id"] for r in b.records]  # repeats and the cut, as before
        for r, s in zip(a.records, b.records):
            assert s["image"].data == (tmp_path / a.root / r["image"]).read_bytes()
    assert len(after[0].records) == 12 and len(after[1].records) == 3
    mixed_before = meta.mix(before[:1], before[1:], 0.25, seed=3)
    mixed_after = meta.mix(after[:1], after[1:], 0.25, seed=3)
    assert [(r["id"], r["source"]) for r in mixed_before] == [(r["id"], r["source"]) for r in mixed_after]
    assert mixed_after.lengths(8) == [loader.record_length(r, 8) for r in mixed_before]
