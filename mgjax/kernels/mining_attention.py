"""The Pallas TPU kernel of patch info mining's window attention, forward and backward.

Layout: ``q [B, N, C]``, ``k, v [B, W, N, C]``, slot-major (``mining.windows``): slot ``w`` of every token's
window is one ``[N, C]`` plane, so a block is ``(bt, C)`` per slot, tile-aligned for any W (M=3's W=9
included) and fed to the kernel with no relayout around it. Every per-slot quantity (a logit, a probability) is
a ``[bt, 1]`` column; nothing is ever moved between lanes and sublanes (v4's Mosaic has no sublane gather).

The window axis is cut into chunks of ``wc`` slots so that VMEM holds two chunks of k and v whatever W is
(M=8's W=64 at C=1024 does not fit v4's 16 MiB whole). Each kernel sweeps the chunks twice (grid axes
``phase, chunk``) and still reads every operand once, because a block whose index does not change is not
fetched again:

* forward: phase 0 reads k and keeps the logits; phase 1 takes the softmax statistics and reads v. Besides the
  output it returns each token's max and sum (float32), the residuals of the backward.
* backward: phase 0 reads k and v with the saved statistics, writes dv and keeps each slot's p and dp (= do·v);
  phase 1 has ``D = Σ p·dp`` and writes dk and dq (dq accumulated as ``Σ p·dp·k - D·Σ p·k`` in phase 0).

Numerics follow ``mining.reference`` (MGM's): logits rounded to the input dtype and passed through nan_to_num,
a float32 softmax, probabilities rounded to v's dtype, float32 accumulation.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

F32 = jnp.float32
BLOCK_TOKENS = (512, 256, 128)  # a block's tokens are the lanes of its saved statistics
LANES = 128
MAX_SLOTS = 4  # slots per chunk: each is unrolled in the kernels, and 4 already move 0.5-4 MiB per step


@dataclass(frozen=True)
class Blocks:
    """``tokens`` per block (bt) and window slots per chunk (wc, a divisor of W); ``vmem_limit``: the scoped VMEM
    the compiler is given, bytes."""

    tokens: int
    slots: int
    vmem_limit: int


def vmem_need(bt: int, wc: int, c: int, itemsize: int) -> int:
    """VMEM bytes of one backward grid step (the larger kernel): double-buffered q, do, dq blocks and chunks of
    k, v, dk, dv; float32 copies of q and do, two float32 accumulators and two of the current slot's
    temporaries; three [bt, 128] float32 tiles of per-slot values."""
    blocks = 2 * (3 * bt * c + 4 * wc * bt * c) * itemsize
    return blocks + 6 * bt * c * 4 + 3 * bt * LANES * 4


def blocks(w: int, c: int, itemsize: int, vmem_bytes: int, tokens: int) -> Blocks | None:
    """The largest token block, then the largest chunk of at most ``MAX_SLOTS`` slots, whose step fits three
    quarters of ``vmem_bytes`` (a TensorCore's VMEM, all of which the compiler is allowed); None when not even
    128 tokens of one slot fit, or W exceeds 128 (M > 11). Token blocks are multiples of 128 unless one block
    takes all ``tokens``."""
    if w > LANES:
        return None
    for bt in BLOCK_TOKENS:
        bt = min(bt, tokens)
        for wc in sorted((d for d in range(1, min(w, MAX_SLOTS) + 1) if w % d == 0), reverse=True):
            if vmem_need(bt, wc, c, itemsize) <= vmem_bytes * 3 // 4:
                return Blocks(bt, wc, vmem_bytes)
    return None


def _logit(q, k, dtype, scale):
    """[bt, C] float32 query x one slot's [bt, C] keys -> [bt, 1] float32 logits, rounded as the reference."""
    logit = jnp.sum(q * k.astype(F32), axis=-1, keepdims=True) * scale
    return jnp.nan_to_num(logit.astype(dtype)).astype(F32)


def _column(tile, lanes, slot):
    """Slot ``slot``'s [bt, 1] column of a [bt, 128] tile (exact: the other lanes add zeros)."""
    return jnp.sum(jnp.where(lanes == slot, tile, 0.0), axis=-1, keepdims=True)


def _stats_rows(top, total):
    """Two [bt, 1] columns -> an [8, bt] tile holding them in rows 0 and 1: saved lane-dense, a column would
    pad each float to 128 lanes in HBM."""
    lane = jax.lax.broadcasted_iota(jnp.int32, (top.shape[0], LANES), 1)
    return jnp.where(lane == 0, top, jnp.where(lane == 1, total, 0.0)).T[:8]


def _stats_columns(rows):
    """The inverse of ``_stats_rows``."""
    columns = jnp.concatenate([rows, jnp.zeros((LANES - 8, rows.shape[1]), F32)], axis=0).T
    return columns[:, 0:1], columns[:, 1:2]


def _forward_kernel(w, q_ref, k_ref, v_ref, o_ref, stats_ref, logits_ref, acc_ref, top_ref, total_ref):
    """Slot s's logit lives in lane s of ``logits_ref`` [bt, 128] (lanes >= W unused)."""
    phase, j, chunks = pl.program_id(2), pl.program_id(3), pl.num_programs(3)
    wc, scale = k_ref.shape[0], 1.0 / math.sqrt(q_ref.shape[-1])
    lanes = jax.lax.broadcasted_iota(jnp.int32, logits_ref.shape, 1)

    @pl.when(phase == 0)
    def _():
        q, logits = q_ref[...].astype(F32), logits_ref[...]
        for i in range(wc):
            logits = jnp.where(lanes == j * wc + i, _logit(q, k_ref[i], q_ref.dtype, scale), logits)
        logits_ref[...] = logits

    @pl.when((phase == 1) & (j == 0))
    def _():
        logits = logits_ref[...]
        top = jnp.max(jnp.where(lanes < w, logits, -jnp.inf), axis=-1, keepdims=True)
        total = jnp.sum(jnp.where(lanes < w, jnp.exp(logits - top), 0.0), axis=-1, keepdims=True)
        top_ref[...], total_ref[...] = top, total
        acc_ref[...] = jnp.zeros(acc_ref.shape, F32)
        if stats_ref is not None:
            stats_ref[...] = _stats_rows(top, total)

    @pl.when(phase == 1)
    def _():
        probs = (jnp.exp(logits_ref[...] - top_ref[...]) / total_ref[...]).astype(v_ref.dtype).astype(F32)
        acc = acc_ref[...]
        for i in range(wc):
            acc = acc + _column(probs, lanes, j * wc + i) * v_ref[i].astype(F32)
        acc_ref[...] = acc

        @pl.when(j == chunks - 1)
        def _():
            o_ref[...] = acc.astype(o_ref.dtype)


def _backward_kernel(
    w, q_ref, k_ref, v_ref, do_ref, stats_ref, dq_ref, dk_ref, dv_ref, p_ref, dp_ref, pdpk_ref, pk_ref
):
    """Slot s's probability and do·v live in lane s of ``p_ref`` and ``dp_ref`` [bt, 128] (others zero)."""
    phase, j = pl.program_id(2), pl.program_id(3)
    wc, scale = k_ref.shape[0], 1.0 / math.sqrt(q_ref.shape[-1])
    lanes = jax.lax.broadcasted_iota(jnp.int32, p_ref.shape, 1)

    @pl.when((phase == 0) & (j == 0))
    def _():
        for ref in (p_ref, dp_ref, pdpk_ref, pk_ref):
            ref[...] = jnp.zeros(ref.shape, F32)

    @pl.when(phase == 0)
    def _():
        q, do = q_ref[...].astype(F32), do_ref[...].astype(F32)
        top, total = _stats_columns(stats_ref[...])
        probs, dps, pdpk, pk = p_ref[...], dp_ref[...], pdpk_ref[...], pk_ref[...]
        for i in range(wc):
            k = k_ref[i].astype(F32)
            p = jnp.exp(_logit(q, k, q_ref.dtype, scale) - top) / total
            dp = jnp.sum(do * v_ref[i].astype(F32), axis=-1, keepdims=True)
            probs, dps = jnp.where(lanes == j * wc + i, p, probs), jnp.where(lanes == j * wc + i, dp, dps)
            pdpk, pk = pdpk + (p * dp) * k, pk + p * k
            dv_ref[i] = (p.astype(v_ref.dtype).astype(F32) * do).astype(dv_ref.dtype)
        p_ref[...], dp_ref[...], pdpk_ref[...], pk_ref[...] = probs, dps, pdpk, pk

    @pl.when(phase == 1)
    def _():
        probs, dps = p_ref[...], dp_ref[...]
        d = jnp.sum(probs * dps, axis=-1, keepdims=True)
        ds = probs * (dps - d) * scale
        q = q_ref[...].astype(F32)
        for i in range(wc):
            dk_ref[i] = (_column(ds, lanes, j * wc + i) * q).astype(dk_ref.dtype)

        @pl.when(j == 0)
        def _():
            dq_ref[...] = ((pdpk_ref[...] - d * pk_ref[...]) * scale).astype(dq_ref.dtype)


def _specs(b: Blocks, c: int, chunks: int):
    """BlockSpecs over the grid (batch, token block, phase, chunk): a token block's [bt, C] row, its stats
    column, and chunks of slots read in phase 0 / phase 1 (pinned to the neighbouring chunk in the other phase,
    so nothing is fetched or written back twice)."""
    row = pl.BlockSpec((None, b.tokens, c), lambda n, i, ph, j: (n, i, 0))
    stat = pl.BlockSpec((None, 8, b.tokens), lambda n, i, ph, j: (n, 0, i))
    first = pl.BlockSpec((None, b.slots, b.tokens, c), lambda n, i, ph, j: (n, j * (1 - ph) + (chunks - 1) * ph, i, 0))
    second = pl.BlockSpec((None, b.slots, b.tokens, c), lambda n, i, ph, j: (n, j * ph, i, 0))
    return row, stat, first, second


def _call(kernel, inputs, in_specs, outputs, out_specs, scratch, b: Blocks, interpret):
    q = inputs[0]
    chunks = inputs[1].shape[1] // b.slots
    tpu = interpret is False or isinstance(interpret, pltpu.InterpretParams)
    params = (
        pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary", "arbitrary"), vmem_limit_bytes=b.vmem_limit
        )
        if tpu
        else None
    )
    return pl.pallas_call(
        kernel,
        out_shape=outputs,
        grid=(q.shape[0], pl.cdiv(q.shape[1], b.tokens), 2, chunks),
        in_specs=in_specs,
        out_specs=out_specs,
        scratch_shapes=scratch,
        compiler_params=params,
        interpret=interpret,
    )(*inputs)


def _tile(b: Blocks):
    return pltpu.VMEM((b.tokens, LANES), F32)


def _forward(q, k, v, b: Blocks, interpret, stats: bool):
    """The output, and with ``stats`` each token's softmax max and sum, [B, 8, N] float32 (rows 0 and 1)."""
    n, t, c = q.shape
    row, stat, first, second = _specs(b, c, k.shape[1] // b.slots)
    column = pltpu.VMEM((b.tokens, 1), F32)
    scratch = [_tile(b), pltpu.VMEM((b.tokens, c), F32), column, column]
    out = jax.ShapeDtypeStruct(q.shape, v.dtype)
    kernel = functools.partial(_forward_kernel, k.shape[1])
    if stats:
        return _call(
            kernel,
            (q, k, v),
            [row, first, second],
            [out, jax.ShapeDtypeStruct((n, 8, t), F32)],
            [row, stat],
            scratch,
            b,
            interpret,
        )
    without = lambda q, k, v, o, *scratch: kernel(q, k, v, o, None, *scratch)  # noqa: E731
    return _call(without, (q, k, v), [row, first, second], [out], [row], scratch, b, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def attention(q: jax.Array, k: jax.Array, v: jax.Array, b: Blocks, interpret) -> jax.Array:
    """q [B, N, C], k/v [B, W, N, C] -> [B, N, C] in v's dtype. ``b``: ``blocks(...)`` for the target chip;
    ``interpret``: False on a TPU, True or ``pltpu.InterpretParams`` anywhere (CPU tests)."""
    [out] = _forward(q, k, v, b, interpret, stats=False)
    return out


def _attention_fwd(q, k, v, b, interpret):
    out, stats = _forward(q, k, v, b, interpret, stats=True)
    return out, (q, k, v, stats)  # the backward recomputes the probabilities from these


def _attention_bwd(b, interpret, saved, do):
    q, k, v, stats = saved
    w, c = k.shape[1], q.shape[-1]
    row, stat, first, second = _specs(b, c, w // b.slots)
    like = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v)]
    scratch = [_tile(b), _tile(b), pltpu.VMEM((b.tokens, c), F32), pltpu.VMEM((b.tokens, c), F32)]
    return tuple(
        _call(
            functools.partial(_backward_kernel, w),
            (q, k, v, do.astype(v.dtype), stats),
            [row, first, first, row, stat],
            like,
            [row, second, first],
            scratch,
            b,
            interpret,
        )
    )


attention.defvjp(_attention_fwd, _attention_bwd)
