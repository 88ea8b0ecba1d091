"""Scaled dot-product attention behind one call, with interchangeable backends (as Levanter's ``AttentionBackend``).

- ``xla``: the reference: einsum logits ``[B, KVH, G, T, S]`` in float32, a float32 softmax, a dense boolean mask.
  Runs everywhere and is what every other backend is tested against.
- ``splash``: the Pallas TPU kernel ``jax.experimental.pallas.ops.tpu.splash_attention`` (block-sparse flash
  attention: no ``T x S`` logits in HBM, masked-out blocks skipped). Per batch shard (and per tensor shard of the
  heads) under a mesh; in Pallas interpret mode on CPUs (tests).
- ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")``, cuDNN's fused attention on NVIDIA GPUs.
- ``auto``: splash when compiling for a TPU, cuDNN for a GPU, xla for a CPU (``topology.target()``).

The mask is given as structure (``Mask``: causal, a sliding window, segment ids, valid keys, a cache offset), not as
an array, so that a kernel can skip whole blocks; ``Mask.dense`` is the same mask as a boolean array. Where a backend
cannot serve a case (splash: a KV cache, whose offset is traced; cuDNN: packed segments; either: a dtype it does not
take) the call falls back to ``xla`` and prints the reason once.
"""

from __future__ import annotations

import dataclasses
import sys
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mgjax.kernels import precision
from mgjax.parallel import sharding, topology

BACKENDS = ("auto", "xla", "splash", "cudnn")
SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides the (padded) length; 128 is a TPU lane
SPLASH_ALIGN = 128


@partial(
    jax.tree_util.register_dataclass,
    data_fields=("segment_ids", "key_valid", "offset"),
    meta_fields=("causal", "window"),
)
@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query attends to. ``causal``: keys at or before the query's position; ``window``: only the
    last ``window`` positions (itself included; with ``causal``); ``segment_ids`` [B, T]: only keys of the query's
    own segment (packed rows; queries and keys are the same positions, no cache); ``key_valid`` [B, S]: keys that
    are real tokens; ``offset``: the first query's position among the keys (a KV cache's fill index; [B]: per row)."""

    causal: bool = False
    window: int | None = None
    segment_ids: jax.Array | None = None
    key_valid: jax.Array | None = None
    offset: jax.Array | int = 0

    def dense(self, t: int, s: int) -> jax.Array | None:
        """The mask as booleans broadcastable to [B, 1, T, S] (True = attend); None: every key."""
        key = jnp.arange(s, dtype=jnp.int32)[None, None, None, :]
        # a vector offset: each row's own fill index (continuous batching's slots)
        query = jnp.reshape(self.offset, (-1, 1, 1, 1)) + jnp.arange(t, dtype=jnp.int32)[None, None, :, None]
        mask = None

        def both(a, b):
            return b if a is None else a & b

        if self.causal:
            mask = key <= query
        if self.window is not None:
            mask = both(mask, key > query - self.window)
        if self.key_valid is not None:
            mask = both(mask, self.key_valid.astype(bool)[:, None, None, :])
        if self.segment_ids is not None:
            mask = both(mask, self.segment_ids[:, None, :, None] == self.segment_ids[:, None, None, :])
        return mask


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, mask: Mask | None = None, impl: str = "auto"
) -> jax.Array:
    """Grouped-query attention: q [B, T, H, D]; k, v [B, S, KVH, D] with H a multiple of KVH (query head h reads
    key head h // (H / KVH), as HF's ``repeat_kv``). Returns [B, T, H, D] in q's dtype."""
    mask = mask or Mask()
    impl = backend(impl, q, k, mask)
    if impl == "splash":
        return _splash(q, k, v, scale, mask)
    if impl == "cudnn":
        return _cudnn(q, k, v, scale, mask)
    return reference(q, k, v, scale=scale, mask=mask.dense(q.shape[1], k.shape[1]))


def reference(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, mask: jax.Array | None = None) -> jax.Array:
    """The einsum form with a float32 softmax; ``mask`` boolean, broadcastable to [B, 1, T, S]."""
    b, t, h, d = q.shape
    kvh = k.shape[2]
    q = q.reshape(b, t, kvh, h // kvh, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


# ---------------------------------------------------------------------------------------------------------------
# Choosing a backend
# ---------------------------------------------------------------------------------------------------------------

_SAID: set[str] = set()


def backend(impl: str, q: jax.Array, k: jax.Array, mask: Mask) -> str:
    """The backend that runs: ``impl`` (``auto``: the platform's) where it can serve this call, else ``xla``."""
    if impl not in BACKENDS:
        raise ValueError(f"attention_impl must be one of {BACKENDS}, not {impl!r}")
    if impl == "auto":
        impl = {"tpu": "splash", "gpu": "cudnn"}.get(topology.target().platform, "xla")
    reason = {"splash": _splash_refuses, "cudnn": _cudnn_refuses}.get(impl, lambda *a: None)(q, k, mask)
    if reason is None:
        return impl
    line = f"attention: {impl} cannot serve q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}: {reason}; using xla"
    if line not in _SAID:
        _SAID.add(line)
        print(line, file=sys.stderr)
    return "xla"


def _splash_refuses(q, k, mask: Mask) -> str | None:
    if not isinstance(mask.offset, int) or mask.offset != 0 or q.shape[1] != k.shape[1]:
        return "queries are not the keys (a KV cache)"
    if q.dtype not in (jnp.float32, jnp.bfloat16):
        return f"dtype {q.dtype}"
    return None


def _cudnn_refuses(q, k, mask: Mask) -> str | None:
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN's fused attention takes bfloat16/float16, not {q.dtype}"
    if mask.segment_ids is not None:
        return "packed segments"
    if not isinstance(mask.offset, int) or mask.offset != 0 or q.shape[1] != k.shape[1]:
        return "queries are not the keys (a KV cache)"
    if q.shape[-1] > 128 or q.shape[-1] % 8:
        return f"head_dim {q.shape[-1]}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# cuDNN
# ---------------------------------------------------------------------------------------------------------------


def _cudnn(q, k, v, scale: float, mask: Mask) -> jax.Array:
    valid = None if mask.key_valid is None else mask.key_valid.astype(bool)[:, None, None, :]
    window = None if mask.window is None else (mask.window - 1, 0)
    return jax.nn.dot_product_attention(
        q, k, v, mask=valid, scale=scale, is_causal=mask.causal, local_window_size=window, implementation="cudnn"
    )


# ---------------------------------------------------------------------------------------------------------------
# Splash (TPU)
# ---------------------------------------------------------------------------------------------------------------


def _splash(q, k, v, scale: float, mask: Mask) -> jax.Array:
    """Pads the length to a multiple of 128 (padding in its own segment, 0, which real tokens never see), then runs
    the kernel per example over [H, T, D] heads, per batch (and head) shard of the mesh being traced under."""
    b, t, h, d = q.shape
    ids = _segment_ids(mask, b, t)
    pad = -t % SPLASH_ALIGN
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        ids = jnp.pad(ids if ids is not None else jnp.ones((b, t), jnp.int32), ((0, 0), (0, pad)))
    interpret = topology.target().platform != "tpu"
    q = (q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3)  # the kernel does not scale
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    run = precision.default_for_bfloat16(
        partial(_splash_local, causal=mask.causal, window=mask.window, interpret=interpret)
    )
    out = _per_shard(run, q, k, v, ids)
    return out.transpose(0, 2, 1, 3)[:, :t]


def _segment_ids(mask: Mask, b: int, t: int) -> jax.Array | None:
    """Packed segments and padding as one id per position: a real token's segment + 1, padding 0 (padding queries
    then see padding keys, never an empty row, and real queries never see padding)."""
    if mask.segment_ids is None and mask.key_valid is None:
        return None
    seg = jnp.zeros((b, t), jnp.int32) if mask.segment_ids is None else mask.segment_ids.astype(jnp.int32)
    valid = jnp.ones((b, t), bool) if mask.key_valid is None else mask.key_valid.astype(bool)
    return jnp.where(valid, seg + 1, 0)


def _splash_local(q, k, v, ids, *, causal: bool, window: int | None, interpret: bool):
    """q [B, H, T, D], k/v [B, KVH, T, D], ids [B, T] or None, on one device's shard."""
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415 (TPU-only kernels)
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks  # noqa: PLC0415

    h, t = q.shape[1], q.shape[2]
    if window is not None:
        one = masks.LocalMask((t, t), window_size=(window - 1, 0 if causal else None), offset=0)  # as Mask.dense
    elif causal:
        one = masks.CausalMask((t, t))
    else:
        one = masks.FullMask((t, t))
    block = next(s for s in SPLASH_BLOCKS if t % s == 0)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    kernel = splash.make_splash_mha(
        masks.MultiHeadMask([one] * h),
        block_sizes=sizes,
        head_shards=1,
        q_seq_shards=1,
        residual_checkpoint_name="context",  # kept with the output by the policies that keep "context"
        interpret=interpret,
    )
    if ids is None:
        return jax.vmap(kernel)(q, k, v)
    return jax.vmap(lambda q, k, v, i: kernel(q, k, v, segment_ids=splash.SegmentIds(i, i)))(q, k, v, ids)


def _per_shard(fn, q, k, v, ids):
    """``fn`` on each device's rows of the batch and, where the mesh has a ``tensor`` axis that divides the key
    heads, its heads: XLA's partitioner cannot see into a kernel, and would gather everything onto every device."""
    rows = sharding.traced_batch_axes(q.shape[0])
    mesh = jax.sharding.get_abstract_mesh()
    tensor = "tensor" if not mesh.empty and mesh.shape.get("tensor", 1) > 1 else None
    if tensor and k.shape[1] % mesh.shape["tensor"]:
        tensor = None
    if not rows and not tensor:
        return fn(q, k, v, ids)
    heads = PartitionSpec(rows or None, tensor)
    specs = (heads, heads, heads, None if ids is None else PartitionSpec(rows or None))
    local = (lambda q, k, v: fn(q, k, v, None)) if ids is None else fn
    args = (q, k, v) if ids is None else (q, k, v, ids)
    return jax.shard_map(local, in_specs=specs[: len(args)], out_specs=heads, check_vma=False)(*args)
