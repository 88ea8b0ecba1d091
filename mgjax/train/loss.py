"""The next-token losses: summed weighted cross-entropy and summed weights, so that a step averages over the global
batch's target tokens (not a mean of per-device means).

``next_token_loss`` takes the logits; it is the reference. ``chunked_next_token_loss`` takes the final hidden states
and the LM head, and computes the logits a chunk of positions at a time, recomputing each chunk's in the backward:
the float32 ``[rows, positions, vocab]`` logits of a 256,000-word Gemma (31 GiB for 16 x 2048) never exist whole.

Position t predicts label t + 1. A target counts when it is not ``ignore`` and, in a packed row, belongs to the same
segment as its position. Each sample's targets weigh 1 (``token``), 1/n (``sample``) or 1/sqrt(n) (``square``,
InternVL's ``loss_reduction square``), n being that sample's count of targets.
"""

from __future__ import annotations

from math import prod
from typing import Callable

import jax
import jax.numpy as jnp

from mgjax.parallel import sharding

LOSS_WEIGHTS = ("token", "sample", "square")
IGNORE = -100
LOGITS_BUDGET = 256 << 20  # bytes of one chunk's float32 logits per device, for the automatic chunk


def target_weights(
    labels: jax.Array, segment_ids: jax.Array | None = None, weighting: str = "token", ignore: int = IGNORE
) -> tuple[jax.Array, jax.Array]:
    """[B, T] targets (label t + 1; 0 where none) and [B, T] float32 weights (0 where none, the last position too)."""
    if weighting not in LOSS_WEIGHTS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTS}, not {weighting!r}")
    b, t = labels.shape
    nxt = jnp.concatenate([labels[:, 1:], jnp.full((b, 1), ignore, labels.dtype)], axis=1)
    valid = nxt != ignore
    if segment_ids is not None:
        seg = jnp.concatenate([segment_ids[:, 1:], segment_ids[:, -1:]], axis=1)
        valid &= seg == segment_ids
    else:
        seg = jnp.zeros_like(labels)
    w = valid.astype(jnp.float32)
    if weighting != "token":
        # each target's sample size: the valid targets of its row sharing its segment id (ids are < T + 1)
        ids = (jnp.arange(b)[:, None] * (t + 1) + jnp.clip(seg, 0, t)).reshape(-1)
        counts = jax.ops.segment_sum(w.reshape(-1), ids, num_segments=b * (t + 1))
        n = jnp.maximum(counts[ids].reshape(b, t), 1.0)
        w = w * (1.0 / n if weighting == "sample" else jax.lax.rsqrt(n))
    return jnp.where(valid, nxt, 0), w


def next_token_loss(
    logits: jax.Array, labels: jax.Array, segment_ids: jax.Array | None = None, weighting: str = "token"
) -> tuple[jax.Array, jax.Array]:
    """The summed weighted cross-entropy of ``logits`` [B, T, V] against ``labels`` [B, T], and the summed weights."""
    targets, w = target_weights(labels, segment_ids, weighting)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(w * ce), jnp.sum(w)


def chunked_next_token_loss(
    hidden: jax.Array,
    head: Callable[[jax.Array], jax.Array],
    labels: jax.Array,
    segment_ids: jax.Array | None = None,
    weighting: str = "token",
    chunk: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """``next_token_loss(head(hidden), ...)`` with ``hidden`` [B, T, D] cut into chunks of ``chunk`` positions
    (0: ``auto_chunk``); each chunk's logits are computed, reduced and dropped, and recomputed in the backward."""
    targets, w = target_weights(labels, segment_ids, weighting)
    b, t, d = hidden.shape
    chunk = min(chunk or auto_chunk(b, head_vocab(head, hidden)), t)
    n = -(-t // chunk)
    pad = n * chunk - t

    def chunks(x):  # [B, T, ...] -> [n, B, chunk, ...]; padding weighs 0
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def one(h, tgt, wt):
        logits = sharding.constrain(head(h), ("act_batch", "act_len", "act_vocab")).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, tgt[..., None], axis=-1)[..., 0]
        return jnp.sum(wt * (lse - picked))

    def body(total, xs):
        return total + one(*xs), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (chunks(hidden), chunks(targets), chunks(w)))
    return total, jnp.sum(w)


def head_vocab(head: Callable[[jax.Array], jax.Array], hidden: jax.Array) -> int:
    """The head's output width, from its shapes alone."""
    return jax.eval_shape(head, jax.ShapeDtypeStruct((1, 1, hidden.shape[-1]), hidden.dtype)).shape[-1]


def auto_chunk(rows: int, vocab: int, budget: int = LOGITS_BUDGET) -> int:
    """Positions per chunk: the largest power of two whose float32 logits for this device's rows fit ``budget``
    (at least 16). The rows are split over the batch axes of the mesh being traced under."""
    local = rows // prod(jax.sharding.get_abstract_mesh().shape[a] for a in sharding.traced_batch_axes(rows))
    positions = budget // max(1, local * vocab * 4)
    return max(16, 1 << max(0, positions.bit_length() - 1))
