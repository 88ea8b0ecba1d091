"""Patch info mining (MGM): every low-resolution token attends to its own M x M window of the high-resolution map.

As MGM's code computes it (not the paper's Eq. 1): separate LayerNorm+Linear projections for queries (CLIP
features), keys and values (the concatenated ConvNeXt map); keys scaled by 1/sqrt(C); logits passed through
nan_to_num; a float32 softmax over the M^2 window positions; the result added to the *raw* CLIP features.

The windows partition the map, so projecting the whole map once and cutting windows afterwards equals projecting
each window (MGM's order) with nothing duplicated.

``local_window_attention`` has two implementations behind one switch: ``reference`` (jnp; XLA fuses it) and the
Pallas kernel of ``mgjax.kernels.mining_attention`` (TPU; anywhere in interpret mode). ``auto`` takes the kernel when
compiling for a TPU (``topology.target()``: the mesh's chips, deviceless ones included) and the reference
elsewhere: on CPUs the kernel only runs interpreted, and on GPUs the reference has not yet been measured against
the copy bandwidth that would justify a Mosaic GPU kernel (issue 7; no GPU was available). Where no kernel block
fits the chip's VMEM, ``auto`` takes the reference and prints why.

Windows are slot-major, ``[B, W, N, C]``: slot ``w`` of every window is one ``[N, C]`` plane, the layout the
kernel reads without a relayout (W = M² need not be a multiple of a TPU tile).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mgjax.kernels import mining_attention
from mgjax.parallel import sharding, topology

BACKENDS = ("auto", "xla", "pallas")


def windows(x: jax.Array, n: int) -> jax.Array:
    """[B, H, W, C] -> [B, (H/n)*(W/n), n*n, C]: ``[:, s, t]`` is position s (row-major within the window) of
    the window of low-res token t = row*n + col."""
    b, h, w, c = x.shape
    if h % n or w % n:
        raise ValueError(f"a {h}x{w} map does not split into {n}x{n} windows")
    m_h, m_w = h // n, w // n
    return x.reshape(b, n, m_h, n, m_w, c).transpose(0, 2, 4, 1, 3, 5).reshape(b, m_h * m_w, n * n, c)


def local_window_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "auto", interpret=None
) -> jax.Array:
    """Single-head attention of each query over its own window: q [B, N, C], k/v [B, W, N, C] (``windows``) ->
    [B, N, C] in v's dtype. ``backend``: auto | xla (``reference``) | pallas (``interpret``: None = on CPUs, or
    True / ``pltpu.InterpretParams``). Inside a mesh context (``jax.set_mesh``) the kernel runs per batch shard."""
    if backend not in BACKENDS:
        raise ValueError(f"mining backend must be one of {BACKENDS}, not {backend!r}")
    device = topology.target()
    if backend == "xla" or (backend == "auto" and device.platform != "tpu"):
        return reference(q, k, v)
    if interpret is None:
        interpret = device.platform == "cpu"
    elif device.platform == "gpu" and not interpret:
        raise ValueError("the mining kernel is written for TPUs; on GPUs use backend 'xla' (or interpret mode)")
    blocks = kernel_blocks(k.shape, k.dtype, device)
    if blocks is None:
        reason = (
            f"mining: no kernel block of {k.shape[1]} slots x {k.shape[-1]} channels ({k.dtype}) fits "
            f"{device.device_kind}'s VMEM"
        )
        if backend == "pallas":
            raise ValueError(reason)
        print(reason + "; using the XLA reference", file=sys.stderr)
        return reference(q, k, v)
    return _per_batch_shard(lambda q, k, v: mining_attention.attention(q, k, v, blocks, interpret), q, k, v)


def kernel_blocks(shape, dtype, device) -> mining_attention.Blocks | None:
    """The kernel's blocks for k/v of ``shape`` [B, W, N, C] on ``device``: from its generation's VMEM per
    TensorCore (an unknown TPU or another platform: the smallest, v4's 16 MiB)."""
    gen = topology.generation(device)
    vmem = (gen.vmem_mib if gen else min(g.vmem_mib for g in topology.GENERATIONS.values())) << 20
    _, w, n, c = shape
    return mining_attention.blocks(w, c, jnp.dtype(dtype).itemsize, vmem, n)


def _per_batch_shard(fn, q, k, v):
    """``fn`` on each device's rows of the batch: XLA's partitioner cannot see into a kernel, and would gather
    the whole batch onto every device."""
    axes = sharding.traced_batch_axes(q.shape[0])
    if not axes:
        return fn(q, k, v)
    spec = PartitionSpec(axes)
    return jax.shard_map(fn, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)


def reference(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """The jnp form, as MGM computes it: scale 1/sqrt(C) on the keys, nan_to_num on the logits (NaN -> 0, +-inf
    -> the dtype's extremes), float32 softmax over the W positions; the output is in v's dtype."""
    c = q.shape[-1]
    k = k / jnp.asarray(c**0.5, k.dtype)
    logits = jnp.einsum("bnc,bwnc->bwn", q, k, preferred_element_type=jnp.float32).astype(q.dtype)
    logits = jnp.nan_to_num(logits)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=1).astype(v.dtype)
    return jnp.einsum("bwn,bwnc->bnc", probs, v)
