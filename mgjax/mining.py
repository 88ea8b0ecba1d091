"""Patch info mining (MGM): every low-resolution token attends to its own M x M window of the high-resolution map.

As MGM's code computes it (not the paper's Eq. 1): separate LayerNorm+Linear projections for queries (CLIP
features), keys and values (the concatenated ConvNeXt map); keys scaled by 1/sqrt(C); logits passed through
nan_to_num; a float32 softmax over the M^2 window positions; the result added to the *raw* CLIP features.

The windows partition the map, so projecting the whole map once and cutting windows afterwards equals projecting
each window (MGM's order) with nothing duplicated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def windows(x: jax.Array, n: int) -> jax.Array:
    """[B, H, W, C] -> [B, n*n, (H/n)*(W/n), C]: the window of low-res token (row, col) = row*n + col, its
    positions row-major."""
    b, h, w, c = x.shape
    if h % n or w % n:
        raise ValueError(f"a {h}x{w} map does not split into {n}x{n} windows")
    m_h, m_w = h // n, w // n
    return x.reshape(b, n, m_h, n, m_w, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, n * n, m_h * m_w, c)


def local_window_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Single-head attention of each query over its own window: q [B, N, C], k/v [B, N, W, C] -> [B, N, C].

    Scale 1/sqrt(C) on the keys, nan_to_num on the logits (NaN -> 0, +-inf -> the dtype's extremes), float32
    softmax over the W positions; the output is in v's dtype."""
    c = q.shape[-1]
    k = k / jnp.asarray(c ** 0.5, k.dtype)
    logits = jnp.einsum("bnc,bnwc->bnw", q, k, preferred_element_type=jnp.float32).astype(q.dtype)
    logits = jnp.nan_to_num(logits)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum("bnw,bnwc->bnc", probs, v)
