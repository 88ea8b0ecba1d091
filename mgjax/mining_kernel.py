"""The Pallas TPU kernel of patch info mining's window attention, forward and backward.

Layout: tokens flattened, ``q [T, C]``, ``k, v [T, W, C]`` (W = M² window slots, the layout ``mining.windows``
produces), so a block of ``bt`` tokens is ``(bt, C)`` / ``(bt, W, C)`` whose trailing dims are whole: legal TPU
blocks for any W, no transposes before the kernel. Each grid step is independent ("parallel": split across
TensorCores). The op is memory-bound (about one FLOP per byte), so the kernels read every input once and keep
everything else in VMEM; the backward recomputes the softmax from q and k instead of storing it.

Numerics follow ``mining.reference`` (MGM's): logits rounded to the input dtype and passed through nan_to_num,
a float32 softmax, probabilities rounded to v's dtype, float32 accumulation.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32
VMEM_BUDGET = 8 << 20  # per kernel instance, inside the default scoped VMEM limit of every TPU generation


def block_tokens(w: int, c: int, itemsize: int) -> int:
    """Tokens per block: double-buffered blocks of every operand and two float32 [bt, W, C] temporaries within
    ``VMEM_BUDGET``; a multiple of 16 (bf16 packs two rows per sublane), at least 16."""
    per_token = 2 * (3 + 4 * w) * c * itemsize + 2 * w * c * 4  # the backward's operands, the larger set
    return max(16, min(512, VMEM_BUDGET // per_token // 16 * 16))


def _probs(q, k, dtype):
    """[bt, W] float32 probabilities, rounded as the reference rounds them."""
    inv = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.sum(q.astype(F32)[:, None, :] * k.astype(F32), axis=-1) * inv
    logits = jnp.nan_to_num(logits.astype(dtype)).astype(F32)
    return jax.nn.softmax(logits, axis=-1)


def _forward_kernel(q_ref, k_ref, v_ref, o_ref):
    p = _probs(q_ref[...], k_ref[...], q_ref.dtype).astype(v_ref.dtype).astype(F32)
    o_ref[...] = jnp.sum(p[:, :, None] * v_ref[...].astype(F32), axis=1).astype(o_ref.dtype)


def _backward_kernel(q_ref, k_ref, v_ref, do_ref, dq_ref, dk_ref, dv_ref):
    q, k, v, do = (r[...].astype(F32) for r in (q_ref, k_ref, v_ref, do_ref))
    inv = 1.0 / math.sqrt(q.shape[-1])
    p = _probs(q_ref[...], k_ref[...], q_ref.dtype)
    dp = jnp.sum(do[:, None, :] * v, axis=-1)  # [bt, W]
    ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * inv
    dq_ref[...] = jnp.sum(ds[:, :, None] * k, axis=1).astype(dq_ref.dtype)
    dk_ref[...] = (ds[:, :, None] * q[:, None, :]).astype(dk_ref.dtype)
    dv_ref[...] = (p[:, :, None] * do[:, None, :]).astype(dv_ref.dtype)


def _call(kernel, inputs, outputs, block: int, interpret):
    """One ``pallas_call`` over blocks of ``block`` tokens; every operand is [T, C] or [T, W, C]."""
    spec = lambda x: pl.BlockSpec((block, *x.shape[1:]), lambda i: (i,) + (0,) * (x.ndim - 1))  # noqa: E731
    tpu = interpret is False or isinstance(interpret, pltpu.InterpretParams)
    return pl.pallas_call(
        kernel, out_shape=outputs, grid=(pl.cdiv(inputs[0].shape[0], block),),
        in_specs=[spec(x) for x in inputs], out_specs=[spec(x) for x in outputs],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)) if tpu else None,
        interpret=interpret)(*inputs)


def _forward(q, k, v, block, interpret):
    [out] = _call(_forward_kernel, (q, k, v), [jax.ShapeDtypeStruct(q.shape, v.dtype)], block, interpret)
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int, interpret) -> jax.Array:
    """q [T, C], k/v [T, W, C] -> [T, C] in v's dtype. ``interpret``: False on a TPU, True or
    ``pltpu.InterpretParams`` anywhere (CPU tests)."""
    return _forward(q, k, v, block, interpret)


def _attention_fwd(q, k, v, block, interpret):
    return _forward(q, k, v, block, interpret), (q, k, v)  # nothing else: the backward recomputes the softmax


def _attention_bwd(block, interpret, saved, do):
    q, k, v = saved
    like = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    return tuple(_call(_backward_kernel, (q, k, v, do.astype(v.dtype)), like, block, interpret))


attention.defvjp(_attention_fwd, _attention_bwd)
