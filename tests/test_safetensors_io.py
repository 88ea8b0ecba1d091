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
