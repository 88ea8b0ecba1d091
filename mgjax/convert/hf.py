"""Load an NNX model from safetensors and write it back, one tensor at a time.

Loading starts from the *abstract* model (shapes only), checks every key and shape against the checkpoint
header before reading a byte, then materialises one parameter at a time: host buffer -> device array -> buffer
freed. On CPU the device array adopts the aligned host buffer, so the peak is the model itself; elsewhere at
most one parameter's host buffer exists at a time.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Callable, NamedTuple

import jax
import numpy as np
from flax import nnx
from jax.experimental.multihost_utils import process_allgather

from mgjax.convert.keymap import HF, KeyLayout, Target, hf_keys, path_name, row_blocks, stack_depth
from mgjax.convert.safetensors_io import KeyMismatch, SafetensorsReader, TensorSpec, write


def _params(state) -> list[tuple[tuple, nnx.Variable]]:
    return [(path, var) for path, var in nnx.to_flat_state(state) if isinstance(var, nnx.Param)]


class Piece(NamedTuple):
    """``var[index]`` of parameter number ``param`` is (rows ``blocks`` of) a checkpoint tensor."""

    param: int
    index: tuple[int, ...]
    blocks: list[tuple[int, int, int]] | None  # (dst, src, n) row copies of a fused tensor; None: all of it


def _tensors(params, layout: KeyLayout) -> dict[str, tuple[tuple[int, ...], list[Piece]]]:
    """Checkpoint key -> (its shape, the parameter pieces it holds), in model order."""
    found: dict[str, list[tuple[Target, int, tuple, tuple]]] = {}
    for n, (path, var) in enumerate(params):
        shape = tuple(var.shape[stack_depth(var) :])
        for index, k in hf_keys(path, var):
            t = layout.locate(k)
            found.setdefault(t.key, []).append((t, n, index, shape))
    out = {}
    for key, hits in found.items():
        if not hits[0][0].fused:
            if len(hits) > 1:
                raise ValueError(f"layout maps {len(hits)} parameters onto checkpoint key {key!r}")
            _, n, index, shape = hits[0]
            out[key] = (shape, [Piece(n, index, None)])
            continue
        hits.sort(key=lambda h: h[0].part)
        t = hits[0][0]
        if [h[0].part for h in hits] != list(range(t.parts)) or len({h[3][1:] for h in hits}) != 1:
            raise ValueError(
                f"fused checkpoint key {key!r}: parts {[h[0].part for h in hits]} of {t.parts} with "
                f"shapes {[h[3] for h in hits]} do not stack"
            )
        sizes = [h[3][0] for h in hits]
        out[key] = (
            (sum(sizes), *hits[0][3][1:]),
            [Piece(n, index, row_blocks(sizes, t.part, t.groups)) for t, n, index, _ in hits],
        )
    return out


def _plan(
    params, reader: SafetensorsReader, layout: KeyLayout, skip: frozenset[int] = frozenset()
) -> dict[str, list[Piece]]:
    """What to read for every parameter not in ``skip``; raise one error listing every missing, extra or
    mis-shaped key. Keys of skipped parameters may be present or not."""
    tensors = _tensors(params, layout)
    missing, misshaped = [], []
    for key, (shape, pieces) in tensors.items():
        if all(p.param in skip for p in pieces):
            continue
        if key not in reader:
            missing.append(key)
        elif reader.info(key).shape != shape:
            names = ", ".join(sorted({path_name(params[p.param][0]) for p in pieces}))
            misshaped.append(f"{key}: checkpoint {reader.info(key).shape} vs model {shape} ({names})")
    unexpected = [k for k in reader.keys() if k not in tensors and not layout.ignored(k)]
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {reader.path} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise KeyMismatch("\n".join(lines), missing, unexpected, misshaped)
    return {key: pieces for key, (_, pieces) in tensors.items() if not all(p.param in skip for p in pieces)}


def host_buffer(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised host array whose data is ``align``-byte aligned: XLA's CPU client then adopts it
    without a copy (numpy's own large allocations sit 16 bytes past a page boundary, which forces one)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off : off + n].view(dtype).reshape(shape)


def _to_device(buf: np.ndarray, var: nnx.Variable) -> jax.Array:
    # Block so the host buffer is released before the next one is filled: at most one parameter in flight.
    return jax.device_put(buf).block_until_ready()


def _best_layout(params, reader: SafetensorsReader, layouts: dict[str, KeyLayout]) -> str:
    hits = {
        name: sum(layout.locate(k).key in reader for p, v in params for _, k in hf_keys(p, v))
        for name, layout in layouts.items()
    }
    return max(hits, key=hits.get)


def pick_layout(abstract_model: nnx.Module, path: str | os.PathLike, layouts: dict[str, KeyLayout]) -> str:
    """The layout under which the checkpoint holds the most of the model's keys (headers only)."""
    with SafetensorsReader(path) as reader:
        return _best_layout(_params(nnx.state(abstract_model)), reader, layouts)


Source = str | os.PathLike | SafetensorsReader


def load_into(
    abstract_model: nnx.Module,
    path: Source,
    *,
    layouts: dict[str, KeyLayout] | None = None,
    layout: str = "auto",
    dtype=None,
    skip: tuple[str, ...] = (),
    place: Callable[[np.ndarray, nnx.Variable], jax.Array] | None = None,
) -> nnx.Module:
    """Fill ``abstract_model`` (from ``nnx.eval_shape``) with the checkpoint at ``path`` (or an open reader).

    ``layouts`` are the key tables the model knows (default: HF's alone) and ``layout`` names one, or ``"auto"``
    for the one matching the checkpoint best. ``dtype`` overrides the parameter dtype (default: the abstract
    model's). ``skip`` names top-level submodules left abstract (filled from another file by the caller).
    ``place`` turns a host buffer into the device array (default: ``jax.device_put``, zero-copy on CPU; a
    sharded loader passes its own)."""
    layouts = layouts or {"hf": HF}
    if layout != "auto" and layout not in layouts:
        raise ValueError(f"no key layout {layout!r}; known: {sorted(layouts)}")
    place = place or _to_device
    graphdef, state = nnx.split(abstract_model)
    params = _params(state)
    skipped = frozenset(i for i, (p, _) in enumerate(params) if str(p[0]) in skip)
    with path if isinstance(path, SafetensorsReader) else SafetensorsReader(path) as reader:
        if layout == "auto":
            layout = _best_layout(params, reader, layouts)
        by_param: list[list[tuple[str, Piece]]] = [[] for _ in params]
        for key, pieces in _plan(params, reader, layouts[layout], skipped).items():
            for piece in pieces:
                by_param[piece.param].append((key, piece))
        for i, ((_, var), reads) in enumerate(zip(params, by_param)):
            if i in skipped:
                continue
            buf = host_buffer(var.shape, dtype or var.dtype)
            for key, piece in reads:
                if piece.blocks is None:
                    reader.read(key, out=buf[piece.index])
                for dst, src, rows in piece.blocks or ():
                    reader.read(key, out=buf[piece.index][dst : dst + rows], rows=(src, src + rows))
            var.set_value(place(buf, var))
            del buf
    return nnx.merge(graphdef, state)


def _host(x: jax.Array) -> np.ndarray:
    # a parameter split over several processes' devices is gathered (every process takes part)
    return np.asarray(x if x.is_fully_addressable else process_allgather(x, tiled=True))


def _assemble(shape, dtype, pieces: list[Piece], arrays) -> np.ndarray:
    if pieces[0].blocks is None:
        return np.asarray(_host(arrays[pieces[0].param])[pieces[0].index], dtype)
    out = np.empty(shape, dtype)
    for p in pieces:
        part = np.asarray(_host(arrays[p.param])[p.index], dtype)
        for dst, src, n in p.blocks:
            out[src : src + n] = part[dst : dst + n]
    return out


def tensor_specs(model: nnx.Module, *, layout: KeyLayout = HF, dtype=None) -> list[TensorSpec]:
    """The checkpoint tensors of ``model`` in ``layout``, each fetched from the device only when written."""
    params = _params(nnx.state(model))
    arrays = [var.get_value() for _, var in params]
    specs = []
    for key, (shape, pieces) in _tensors(params, layout).items():
        out_dtype = np.dtype(dtype or arrays[pieces[0].param].dtype)
        specs.append(TensorSpec(key, out_dtype, shape, partial(_assemble, shape, out_dtype, pieces, arrays)))
    return specs


def save(
    model: nnx.Module, out_dir: str | os.PathLike, *, layout: KeyLayout = HF, dtype=None, max_shard_bytes: int = 4 << 30
) -> list:
    """Writes the checkpoint (process 0 of a multi-process run; the others only help gather each tensor)."""
    specs = tensor_specs(model, layout=layout, dtype=dtype)
    if jax.process_index() != 0:
        for spec in specs:  # the same gathers in the same order as process 0's writer
            spec.fetch()
        return []
    return write(out_dir, specs, max_shard_bytes=max_shard_bytes)
