"""Our hand-written safetensors reader/writer against the reference `safetensors` library, both directions."""

import json

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from mgjax.convert.safetensors_io import CheckpointError, SafetensorsReader, TensorSpec, write

BF16 = np.dtype(ml_dtypes.bfloat16)


def _tensors():
    rng = np.random.default_rng(0)
    return {
        "a.weight": rng.standard_normal((3, 5), np.float32),
        "b": np.arange(7, dtype=np.int64),
        "c.half": rng.standard_normal((2, 2, 2)).astype(np.float16),
        "scalar": np.array(3.5, np.float32),
    }


def test_reads_what_the_reference_library_writes(tmp_path):
    want = _tensors()
    safetensors.numpy.save_file(want, tmp_path / "x.safetensors")
    with SafetensorsReader(tmp_path / "x.safetensors") as r:
        assert sorted(r.keys()) == sorted(want)
        for k, v in want.items():
            got = r.read(k)
            assert got.dtype == v.dtype and np.array_equal(got, v), k
        out = np.empty((3, 5), BF16)  # read with a cast into a caller's buffer
        r.read("a.weight", out=out)
        assert np.array_equal(out, want["a.weight"].astype(BF16))


def test_reads_torch_bfloat16(tmp_path):
    t = torch.randn(4, 6, dtype=torch.bfloat16)
    safetensors.torch.save_file({"w": t}, tmp_path / "w.safetensors")
    with SafetensorsReader(tmp_path / "w.safetensors") as r:
        assert np.array_equal(r.read("w").astype(np.float32), t.float().numpy())


def test_reference_library_reads_what_we_write_sharded(tmp_path):
    want = {f"layer.{i}": np.full((64, 64), i, np.float32) for i in range(5)}
    files = write(
        tmp_path, [TensorSpec(k, v.dtype, v.shape, lambda v=v: v) for k, v in want.items()], max_shard_bytes=40_000
    )
    assert len(files) == 3 and not list(tmp_path.glob("*.tmp"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    got = {}
    for f in files:
        got.update(safetensors.numpy.load_file(f))
    assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    with SafetensorsReader(tmp_path) as r:  # and we read our own sharded output through the index
        assert all(np.array_equal(r.read(k), want[k]) for k in want)


def test_index_naming_an_absent_shard_is_an_error(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="absent.*gone.safetensors"):
        SafetensorsReader(tmp_path)


def test_garbage_header_names_the_file(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="bad.safetensors: unreadable safetensors header"):
        SafetensorsReader(bad)


def _file(tmp_path, header, data: bytes, name="m.safetensors"):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path = tmp_path / name
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


GOOD = {
    "__metadata__": {"format": "pt"},
    "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
    "b": {"dtype": "I8", "shape": [4], "data_offsets": [16, 20]},
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"b": {"dtype": "I8", "shape": [4], "data_offsets": [12, 16]}}, "'b' at 12 overlaps the tensor before it"),
        ({"b": {"dtype": "I8", "shape": [4], "data_offsets": [-4, 0]}}, "data_offsets \\[-4, 0\\] are not two"),
        ({"b": {"dtype": "I8", "shape": [2], "data_offsets": [16, 18]}}, "2 bytes after the last tensor"),
        ({"b": {"dtype": "I8", "shape": [-4], "data_offsets": [16, 20]}}, "shape \\[-4\\] is not a list of sizes"),
        ({"b": {"dtype": "I8", "shape": [True, 4], "data_offsets": [16, 20]}}, "is not a list of sizes"),
        ({"b": [1, 2]}, "'b': expected \\{dtype, shape, data_offsets\\}"),
        ({"b": {"dtype": "I8", "shape": [4]}}, "'b': expected \\{dtype, shape, data_offsets\\}"),
        ({"b": {"dtype": "Q4", "shape": [4], "data_offsets": [16, 20]}}, "unsupported dtype 'Q4'"),
        ({"b": {"dtype": "I8", "shape": [4], "data_offsets": [16, 2**40]}}, "do not fit"),
        ({"__metadata__": ["x"]}, "__metadata__ must map names to strings"),
    ],
)
def test_every_header_field_and_offset_is_checked(tmp_path, change, message):
    assert set(SafetensorsReader(_file(tmp_path, GOOD, bytes(20))).keys()) == {"a", "b"}
    with pytest.raises(CheckpointError, match=f"m.safetensors.*{message}"):
        SafetensorsReader(_file(tmp_path, {**GOOD, **change}, bytes(20)))


def test_headers_that_are_not_objects_or_repeat_a_key(tmp_path):
    with pytest.raises(CheckpointError, match="the header is a JSON list, not an object"):
        SafetensorsReader(_file(tmp_path, [1, 2], b""))
    twice = b'{"a": {"dtype": "I8", "shape": [1], "data_offsets": [0, 1]}, "a": {"dtype": "I8", "shape": [1], ' + (
        b'"data_offsets": [0, 1]}}'
    )
    with pytest.raises(CheckpointError, match="duplicate keys \\['a'\\]"):
        SafetensorsReader(_file(tmp_path, twice, bytes(1)))
    with pytest.raises(CheckpointError, match="unreadable safetensors header"):
        SafetensorsReader(_file(tmp_path, b'{"a": "\xff\xfe"}', b""))


def test_index_shard_paths_stay_inside_the_checkpoint(tmp_path):
    (tmp_path / "ckpt").mkdir()
    _file(tmp_path, GOOD, bytes(20), name="outside.safetensors")
    for target in ("../outside.safetensors", str(tmp_path / "outside.safetensors")):
        index = {"weight_map": {"a": target, "b": target}}
        (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(CheckpointError, match="names shard files outside"):
            SafetensorsReader(tmp_path / "ckpt")
    for index, message in (([1], "weight_map"), ({"weight_map": {"a": 3}}, "weight_map"), ("{", "not valid JSON")):
        text = index if isinstance(index, str) else json.dumps(index)
        (tmp_path / "ckpt" / "model.safetensors.index.json").write_text(text)
        with pytest.raises(CheckpointError, match=message):
            SafetensorsReader(tmp_path / "ckpt")


def test_fuzzed_headers_raise_checkpoint_errors_or_load_exactly(tmp_path):
    """Random edits of a valid header's JSON text: each file either fails with a CheckpointError or loads tensors
    whose bytes are the file's own (a key renamed, say), never another exception and never bytes from elsewhere."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 20, dtype=np.uint8).tobytes()
    text = json.dumps(GOOD)
    digits = '0123456789-,[]{}":. e'
    outcomes = {"error": 0, "loaded": 0}
    for trial in range(400):
        chars = list(text)
        for _ in range(int(rng.integers(1, 4))):
            chars[int(rng.integers(len(chars)))] = digits[int(rng.integers(len(digits)))]
        path = _file(tmp_path, "".join(chars).encode(), data, name=f"f{trial}.safetensors")
        try:
            with SafetensorsReader(path) as r:
                for key in r.keys():
                    info = r.info(key)
                    got = r.read(key).reshape(-1).view(np.uint8).tobytes()
                    assert got == data[info.start - (path.stat().st_size - 20) :][: info.nbytes]
            outcomes["loaded"] += 1
        except CheckpointError:
            outcomes["error"] += 1
    assert outcomes["error"] > 100 and outcomes["loaded"] > 0, outcomes
