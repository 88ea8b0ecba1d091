"""``train.out_dir`` as a ``gs://`` URI: records mirrored locally and copied up whole, checkpoints handed to Orbax as
the URI (``pathlib`` and ``os.path.abspath`` would make ``gs://b/run`` a local ``gs:/b/run``). The bucket here is
fsspec's in-memory filesystem registered for ``gs``; no real bucket is reached."""

import os

import fsspec
import pytest
from etils import epath
from fsspec.implementations.memory import MemoryFileSystem

from mgjax.train import checkpoint, run_dir


@pytest.fixture
def bucket():
    for protocol in ("gs", "gcs"):  # what etils.epath asks fsspec for, for gs:// paths
        fsspec.register_implementation(protocol, MemoryFileSystem, clobber=True)
    MemoryFileSystem.store.clear()
    yield epath.Path("gs://bucket/run")
    MemoryFileSystem.store.clear()


def test_uris_stay_uris(tmp_path, monkeypatch):
    assert run_dir.join("gs://b/run/", "lr_only") == "gs://b/run/lr_only"
    assert run_dir.join(str(tmp_path), "lr_only") == str(tmp_path / "lr_only")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    where = run_dir.RunDir("gs://b/run")
    assert where.local == tmp_path / "mgjax" / "runs" / "b" / "run"
    assert str(where.checkpoints) == "gs://b/run/checkpoints"
    assert run_dir.RunDir(str(tmp_path / "r")).checkpoints == tmp_path / "r" / "checkpoints"
    seen = []
    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", lambda directory, options: seen.append(directory))
    checkpoint.Checkpoints("gs://b/run/checkpoints")
    checkpoint.Checkpoints("relative/checkpoints")
    assert str(seen[0]) == "gs://b/run/checkpoints" and seen[1] == os.path.abspath("relative/checkpoints")


def test_records_are_pushed_whole_and_pulled_on_resume(bucket, tmp_path):
    where = run_dir.RunDir("gs://bucket/run", str(tmp_path / "mirror"))
    where.local.mkdir()
    (where.local / "metrics.jsonl").write_text('{"step": 1}\n')
    (where.local / "final").mkdir()
    (where.local / "final" / "config.json").write_text("{}")
    (where.local / "checkpoints").mkdir()
    (where.local / "checkpoints" / "junk").write_text("local checkpoints are not copied")
    where.push()
    assert (bucket / "metrics.jsonl").read_text() == '{"step": 1}\n'
    assert (bucket / "final" / "config.json").read_text() == "{}"
    assert not (bucket / "checkpoints").exists()
    with open(where.local / "metrics.jsonl", "a") as f:
        f.write('{"step": 2}\n')
    where.push()
    assert (bucket / "metrics.jsonl").read_text().count("step") == 2  # what changed goes up again
    again = run_dir.RunDir("gs://bucket/run", str(tmp_path / "elsewhere"))
    again.pull()
    assert (again.local / "metrics.jsonl").read_text() == (where.local / "metrics.jsonl").read_text()
    assert (again.local / "final" / "config.json").exists()
    assert run_dir.RunDir(str(tmp_path / "plain")).push() is None  # a local out_dir: nothing to copy
