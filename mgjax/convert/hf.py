"""Load an NNX model from safetensors and write it back, one tensor at a time.

Loading starts from the *abstract* model (shapes only), checks every key and shape against the checkpoint
header before reading a byte, then materialises one parameter at a time: host buffer -> device array -> buffer
freed. On CPU the device array adopts the aligned host buffer, so the peak is the model itself; elsewhere at
most one parameter's host buffer exists at a time.
"""
from __future__ import annotations

import os
from typing import Callable

import jax
import numpy as np
from flax import nnx

from mgjax.convert.keymap import HF, KeyLayout, hf_keys, path_name, stack_depth
from mgjax.convert.safetensors_io import CheckpointError, SafetensorsReader, TensorSpec, write


def _params(state) -> list[tuple[tuple, nnx.Variable]]:
    return [(path, var) for path, var in nnx.to_flat_state(state) if isinstance(var, nnx.Param)]


def _plan(params, reader: SafetensorsReader, layout: KeyLayout) -> list[list[tuple[tuple[int, ...], str]]]:
    """``(index, checkpoint key)`` for every parameter; raise one error listing every missing, extra or
    mis-shaped key."""
    plan, missing, misshaped, used = [], [], [], set()
    for path, var in params:
        entries = [(i, layout.rename(k)) for i, k in hf_keys(path, var)]
        keys = [k for _, k in entries]
        want = var.shape[stack_depth(var):]
        for k in keys:
            if k not in reader:
                missing.append(k)
            elif reader.info(k).shape != tuple(want):
                misshaped.append(f"{k}: checkpoint {reader.info(k).shape} vs model {tuple(want)} ({path_name(path)})")
        used.update(keys)
        plan.append(entries)
    unexpected = [k for k in reader.keys() if k not in used and not layout.ignored(k)]
    if missing or unexpected or misshaped:
        lines = [f"checkpoint {reader.path} does not match the model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshaped)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    return plan


def host_buffer(shape, dtype, align: int = 64) -> np.ndarray:
    """An uninitialised host array whose data is ``align``-byte aligned: XLA's CPU client then adopts it
    without a copy (numpy's own large allocations sit 16 bytes past a page boundary, which forces one)."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + align, np.uint8)
    off = (-raw.ctypes.data) % align
    return raw[off:off + n].view(dtype).reshape(shape)


def _to_device(buf: np.ndarray, var: nnx.Variable) -> jax.Array:
    # Block so the host buffer is released before the next one is filled: at most one parameter in flight.
    return jax.device_put(buf).block_until_ready()


def _best_layout(params, reader: SafetensorsReader, layouts: dict[str, KeyLayout]) -> str:
    hits = {name: sum(layout.rename(k) in reader for p, v in params for _, k in hf_keys(p, v))
            for name, layout in layouts.items()}
    return max(hits, key=hits.get)


def pick_layout(abstract_model: nnx.Module, path: str | os.PathLike, layouts: dict[str, KeyLayout]) -> str:
    """The layout under which the checkpoint holds the most of the model's keys (headers only)."""
    with SafetensorsReader(path) as reader:
        return _best_layout(_params(nnx.state(abstract_model)), reader, layouts)


def load_into(abstract_model: nnx.Module, path: str | os.PathLike, *, layouts: dict[str, KeyLayout] | None = None,
              layout: str = "auto", dtype=None,
              place: Callable[[np.ndarray, nnx.Variable], jax.Array] | None = None) -> nnx.Module:
    """Fill ``abstract_model`` (from ``nnx.eval_shape``) with the checkpoint at ``path``.

    ``layouts`` are the key tables the model knows (default: HF's alone) and ``layout`` names one, or ``"auto"``
    for the one matching the checkpoint best. ``dtype`` overrides the parameter dtype (default: the abstract
    model's). ``place`` turns a host buffer into the device array (default: ``jax.device_put``, zero-copy on
    CPU; a sharded loader passes its own)."""
    layouts = layouts or {"hf": HF}
    if layout != "auto" and layout not in layouts:
        raise ValueError(f"no key layout {layout!r}; known: {sorted(layouts)}")
    place = place or _to_device
    graphdef, state = nnx.split(abstract_model)
    params = _params(state)
    with SafetensorsReader(path) as reader:
        if layout == "auto":
            layout = _best_layout(params, reader, layouts)
        plan = _plan(params, reader, layouts[layout])
        for (p, var), entries in zip(params, plan):
            buf = host_buffer(var.shape, dtype or var.dtype)
            for index, k in entries:
                reader.read(k, out=buf[index])
            var.set_value(place(buf, var))
            del buf
    return nnx.merge(graphdef, state)


def tensor_specs(model: nnx.Module, *, dtype=None) -> list[TensorSpec]:
    """HF-named tensors of ``model``, each fetched from the device only when written."""
    specs = []
    for path, var in _params(nnx.state(model)):
        arr = var.get_value()
        out_dtype = np.dtype(dtype or arr.dtype)
        shape = tuple(arr.shape[stack_depth(var):])
        for index, k in hf_keys(path, var):
            specs.append(TensorSpec(k, out_dtype, shape, lambda a=arr, i=index: np.asarray(a[i])))
    return specs


def save(model: nnx.Module, out_dir: str | os.PathLike, *, dtype=None, max_shard_bytes: int = 4 << 30):
    return write(out_dir, tensor_specs(model, dtype=dtype), max_shard_bytes=max_shard_bytes)
