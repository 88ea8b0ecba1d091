"""PyTorch-exact image resizes as small matrices.

``jax.image.resize`` uses a different cubic kernel (A = -0.5) and antialiases when shrinking, so it cannot
reproduce ``torch.nn.functional.interpolate``; a resize is linear and separable, so one [out, in] matrix per axis
reproduces it exactly.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np


def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's bicubic resize (A = -0.75, align_corners=False, edge-clamped taps)."""
    a = -0.75
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  |x| <= 1
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  1 < |x| < 2
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = (i + 0.5) * (n_in / n_out) - 0.5
        base = int(np.floor(src))
        t = src - base
        for offset, w in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
            m[i, min(max(base + offset, 0), n_in - 1)] += w
    return m


@lru_cache(maxsize=32)
def _bicubic(n_in: int, n_out: int) -> np.ndarray:
    return bicubic_matrix(n_in, n_out).astype(np.float32)


def bicubic_grid(grid: jax.Array, height: int, width: int) -> jax.Array:
    """Resize ``grid`` [H, W, D] to [height, width, D] as torch bicubic does, in float32.

    HIGHEST precision: a one-off on a small table (position embeddings), and default TPU/GPU matmul precision
    would round it to bf16/tf32."""
    return jnp.einsum(
        "hi,ijd,wj->hwd",
        _bicubic(grid.shape[0], height),
        grid.astype(jnp.float32),
        _bicubic(grid.shape[1], width),
        precision=jax.lax.Precision.HIGHEST,
    )


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of torch's bilinear resize (align_corners=False, antialias=False): two taps at
    half-pixel centres, the source coordinate clamped at 0. Shrinking aliases, as MGM's LR image does."""
    m = np.zeros((n_out, n_in), np.float64)
    for i in range(n_out):
        src = max((i + 0.5) * (n_in / n_out) - 0.5, 0.0)
        lo = int(np.floor(src))
        t = src - lo
        m[i, min(lo, n_in - 1)] += 1 - t
        m[i, min(lo + 1, n_in - 1)] += t
    return m


@lru_cache(maxsize=32)
def _bilinear(n_in: int, n_out: int) -> np.ndarray:
    return bilinear_matrix(n_in, n_out).astype(np.float32)


def bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """Resize ``x`` [..., H, W, C] to [..., height, width, C] as torch bilinear (align_corners=False) does, in
    float32 (MGM resizes its feature maps in float32 too)."""
    h, w = x.shape[-3:-1]
    return jnp.einsum(
        "hi,...ijc,wj->...hwc",
        _bilinear(h, height),
        x.astype(jnp.float32),
        _bilinear(w, width),
        precision=jax.lax.Precision.HIGHEST,
    )
