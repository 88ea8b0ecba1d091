"""Safetensors read and written by hand, tensor by tensor, with plain file I/O.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape, byte offsets), then
the raw bytes. Reading with ``readinto`` straight into the destination buffer (rather than through a memory
map) keeps the file's pages out of this process's resident memory, so loading a checkpoint never holds a
second copy of it. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and the keys."""


class KeyMismatch(CheckpointError):
    """The checkpoint's tensors are not the model's: the keys each way, for callers that can say more."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], misshaped: list[str]):
        super().__init__(message)
        self.missing, self.unexpected, self.misshaped = missing, unexpected, misshaped


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in ``file``
    nbytes: int


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate keys {twice}")
    return dict(pairs)


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}; not safetensors?")
        try:
            header = json.loads(f.read(n), object_pairs_hook=_unique_keys)
        except ValueError as e:  # not JSON, not UTF-8, a key twice
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    return header, 8 + n


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _tensor(path: Path, name: str, meta, data_start: int, size: int) -> TensorInfo:
    where = f"{path}: tensor {name!r}"
    if not isinstance(meta, dict) or set(meta) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: expected {{dtype, shape, data_offsets}}, got {meta!r:.200}")
    if meta["dtype"] not in DTYPES:
        raise CheckpointError(f"{where} has unsupported dtype {meta['dtype']!r}")
    shape, offsets = meta["shape"], meta["data_offsets"]
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} are not two byte offsets")
    dtype, (begin, end) = DTYPES[meta["dtype"]], offsets
    if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)) or data_start + end > size:
        raise CheckpointError(
            f"{where} has offsets {begin}..{end} that do not fit its "
            f"shape {tuple(shape)} {meta['dtype']} or the file size {size} (truncated file?)"
        )
    return TensorInfo(path, dtype, tuple(shape), data_start + begin, end - begin)


def _scan_file(path: Path) -> dict[str, TensorInfo]:
    """The file's tensors, after checking every header field: dtypes and shapes, offsets inside the file that
    match them, and a data section the tensors cover exactly, without overlaps or holes (as the format requires)."""
    header, data_start = _read_header(path)
    size = path.stat().st_size
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map names to strings, got {metadata!r:.200}")
    out = {name: _tensor(path, name, meta, data_start, size) for name, meta in header.items()}
    at = data_start
    for name, info in sorted(out.items(), key=lambda kv: (kv[1].start, kv[1].nbytes)):
        if info.start != at:
            what = "overlaps the tensor before it" if info.start < at else f"leaves bytes {at}..{info.start} unused"
            raise CheckpointError(f"{path}: tensor {name!r} at {info.start - data_start} {what}")
        at += info.nbytes
    if at != size:
        raise CheckpointError(f"{path}: {size - at} bytes after the last tensor belong to none")
    return out


class SafetensorsReader:
    """Lazy access to a checkpoint: one ``.safetensors`` file, or a directory holding either
    ``model.safetensors`` or a sharded set described by ``model.safetensors.index.json``."""

    def __init__(self, path: str | os.PathLike, tensors: dict[str, TensorInfo] | None = None):
        """``tensors``: a view assembled from other readers' tensors (each still read from its own file);
        ``path`` then only names the view in messages."""
        path = Path(path)
        self.path = path
        self.tensors: dict[str, TensorInfo] = dict(tensors or {})
        for file in self._files(path) if tensors is None else ():
            for name, info in _scan_file(file).items():
                if name in self.tensors:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} appears in both {self.tensors[name].file.name} and {file.name}"
                    )
                self.tensors[name] = info
        self._handles: dict[Path, object] = {}

    @staticmethod
    def _files(path: Path) -> list[Path]:
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise CheckpointError(f"{path}: no such checkpoint file or directory")
        if (path / INDEX_FILE).exists():
            return [path / f for f in _index_files(path)]
        if (path / SINGLE_FILE).exists():
            return [path / SINGLE_FILE]
        found = sorted(path.glob("*.safetensors"))
        if found:
            return found
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        hint = (
            f" (found {pickled}: pickled PyTorch files are never loaded; convert them to safetensors)"
            if pickled
            else ""
        )
        raise CheckpointError(f"{path}: no safetensors checkpoint{hint}")

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def info(self, key: str) -> TensorInfo:
        try:
            return self.tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None

    def read(self, key: str, out: np.ndarray | None = None, rows: tuple[int, int] | None = None) -> np.ndarray:
        """Read one tensor, or rows ``start:stop`` of its first axis; with ``out`` (right shape) the bytes land
        in it, cast if needed."""
        info = self.info(key)
        shape, start, nbytes = info.shape, info.start, info.nbytes
        if rows is not None:
            lo, hi = rows
            if not (info.shape and 0 <= lo <= hi <= info.shape[0]):
                raise CheckpointError(f"{self.path}: rows {lo}:{hi} are outside tensor {key!r} of shape {info.shape}")
            row = nbytes // info.shape[0] if info.shape[0] else 0
            shape, start, nbytes = (hi - lo, *info.shape[1:]), start + lo * row, (hi - lo) * row
        if out is not None and out.shape != shape:
            raise CheckpointError(f"{self.path}: tensor {key!r} has shape {shape}, expected {out.shape}")
        direct = out is not None and out.dtype == info.dtype and out.flags.c_contiguous
        buf = out if direct else np.empty(shape, info.dtype)
        f = self._handle(info.file)
        f.seek(start)
        if f.readinto(memoryview(buf.reshape(-1).view(np.uint8))) != nbytes:
            raise CheckpointError(f"{info.file}: short read for tensor {key!r} (truncated file?)")
        if out is None or direct:
            return buf
        out[...] = buf.astype(out.dtype)
        return out

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = open(file, "rb")
        return self._handles[file]

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _index_files(path: Path) -> list[str]:
    """The shard files ``path``'s index names: each a file inside ``path``, present."""
    index_file = path / INDEX_FILE
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{index_file}: not valid JSON ({e})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_file}: expected a 'weight_map' of tensor names to shard file names")
    files = sorted(set(weight_map.values()))
    outside = [f for f in files if Path(f).name != f or f in (".", "..")]  # a file name, not a path (HF's own
    # shards sit beside the index; not resolved, so a hub cache's symlinked shards still load)
    if outside:
        raise CheckpointError(f"{index_file} names shard files outside {path}: {outside}")
    absent = [f for f in files if not (path / f).is_file()]
    if absent:
        raise CheckpointError(f"{index_file} names shard files that are absent: {absent}")
    return files


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to be written: its bytes come from ``fetch`` only when its turn comes."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    fetch: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))


def _write_file(path: Path, specs: list[TensorSpec], metadata: dict[str, str]) -> None:
    header: dict[str, dict] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for s in specs:
        header[s.name] = {
            "dtype": DTYPE_NAMES[s.dtype],
            "shape": list(s.shape),
            "data_offsets": [offset, offset + s.nbytes],
        }
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data section 8-byte aligned, as the reference writer does
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for s in specs:
            arr = np.ascontiguousarray(s.fetch(), dtype=s.dtype)
            if arr.shape != s.shape:
                raise ValueError(f"tensor {s.name!r}: fetched shape {arr.shape}, declared {s.shape}")
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write(
    out_dir: str | os.PathLike,
    specs: Iterable[TensorSpec],
    *,
    max_shard_bytes: int = 4 << 30,
    metadata: dict[str, str] | None = None,
) -> list[Path]:
    """Write tensors into ``out_dir`` as ``model.safetensors`` or, above ``max_shard_bytes``, as HF-style shards
    plus ``model.safetensors.index.json``. Each file is written to a temporary name and renamed when complete."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", **(metadata or {})}
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    if len(shards) == 1:
        _write_file(out_dir / SINGLE_FILE, shards[0], metadata)
        return [out_dir / SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _write_file(out_dir / name, shard, metadata)
    index = {
        "metadata": {"total_size": sum(s.nbytes for sh in shards for s in sh)},
        "weight_map": {s.name: name for name, sh in zip(names, shards) for s in sh},
    }
    tmp = out_dir / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, out_dir / INDEX_FILE)
    return [out_dir / n for n in names]
