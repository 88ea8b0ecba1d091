"""MGM's mining projections (``LayerNorm -> Linear`` over the HR map), evaluated stage by stage.

MGM resizes each ConvNeXt stage map ``S_i`` [B, h_i, w_i, C_i] bilinearly to the first stage's size, concatenates
them on channels and runs its key and value heads over that map. For ConvNeXt-L at 768 pixels the map is
[B, 192, 192, 2880]; built whole it was the step's peak (MGM-2B, 16 rows per v5p chip: the concatenation and its
resized pieces 6.2 GiB in the forward, the map and a normalised copy 6.5 GiB where the backward recomputes them).

A resize is linear and, per channel, keeps constants (its rows sum to one), and a head is linear once normalised, so
with ``W' = W diag(g)`` (``g``, ``beta``: the LayerNorm's scale and shift; ``W``, ``b``: the Linear's) a head is

    y(p) = r(p) * [sum_i up_i(Sc_i @ W'_i)(p) + sum_i d_i(p) * colsum(W'_i)] + (W beta + b)

``Sc_i`` is stage i centred on its own per-pixel channel mean ``mu_i``, ``d_i = up_i(mu_i) - mean(p)`` the gap
between that mean and the whole map's, and ``r(p)`` the reciprocal standard deviation, whose variance
``(1/C) sum_i (|up_i(Sc_i)(p)|^2 + C_i d_i(p)^2)`` comes from Gram matrices of the half-resized stages, never the
map. Centring each stage first keeps the bracket's terms at the map's spread, not its mean, so bfloat16 matmuls
lose no more than MGM's own. Only the heads' outputs are ever full resolution; the backward reaches the weights
through small transposed resizes.

A deliberate deviation, numerically: MGM rounds the resized map to the compute dtype before normalising; this
never forms it, so in bfloat16 it rounds the terms above instead (float32 runs agree to ~1e-6).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgjax.nn import layers, resize
from mgjax.parallel import sharding

HIGHEST = jax.lax.Precision.HIGHEST
Resize = tuple[np.ndarray, np.ndarray] | None  # (rows [H, h], columns [W, w]) of one stage; None: already H x W


class PreNormLinear(nnx.Module):
    """MGM's mining projections: ``Sequential(LayerNorm (eps 1e-5), Linear)``."""

    def __init__(self, d_in: int, d_out: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.norm = layers.LayerNorm(d_in, eps=1e-5, param_dtype=param_dtype, rngs=rngs)
        self.linear = layers.Linear(
            d_in, d_out, axes=("embed", "mlp"), bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x):
        return self.linear(self.norm(x))


def upsampling(stages: Sequence[jax.Array]) -> list[Resize]:
    """Each stage's bilinear resize to the first stage's size (MGM's HR map)."""
    h, w = stages[0].shape[1:3]
    return [None] + [(resize.bilinear_matrix(s.shape[1], h), resize.bilinear_matrix(s.shape[2], w)) for s in stages[1:]]


def then(resizes: Sequence[Resize], rows: np.ndarray, cols: np.ndarray) -> list[Resize]:
    """``resizes`` followed by one more linear map of the whole grid (e.g. MGM-HD's 2x2 average for its global
    view): the composed matrices."""
    return [(rows, cols) if r is None else (rows @ r[0], cols @ r[1]) for r in resizes]


def _resized(m: Resize, x: jax.Array) -> jax.Array:
    """``x`` [B, h, w, C] resized by ``m`` in float32 at full precision (TPUs would round it to bfloat16)."""
    if m is None:
        return x
    x = jnp.einsum("yr,brsc->bysc", m[0], x, precision=HIGHEST)
    return jnp.einsum("xs,bysc->byxc", m[1], x, precision=HIGHEST)


def _stage_statistics(stages, resizes, eps):
    """Per stage the centred map ``Sc_i`` (float32) and the gap ``d_i`` [B, H, W]; the reciprocal std ``r``."""
    channels = sum(s.shape[-1] for s in stages)
    centred, means = [], []
    for s, m in zip(stages, resizes):
        x = sharding.constrain_batch(s.astype(jnp.float32))
        mu = x.mean(-1, keepdims=True)
        centred.append(x - mu)
        means.append(_resized(m, mu)[..., 0])
    mean = sum(s.shape[-1] * mu for s, mu in zip(stages, means)) / channels
    gaps = [mu - mean for mu in means]
    square = 0.0
    for c, m, d in zip(centred, resizes, gaps):
        square = square + _squared_norm(c, m) + c.shape[-1] * jnp.square(d)
    return centred, gaps, jax.lax.rsqrt(square / channels + eps)


def _squared_norm(x: jax.Array, m: Resize) -> jax.Array:
    """``|resized(x)(p)|^2`` over channels [B, H, W], through the Gram matrix of x resized along rows only:
    ``sum_{s,t} A[p, s] A[p, t] <T[s], T[t]>``."""
    if m is None:
        return jnp.square(x).sum(-1)
    rows = jnp.einsum("yr,brsc->bysc", m[0], x, precision=HIGHEST)
    gram = jnp.einsum("bysc,bytc->byst", rows, rows, precision=HIGHEST)
    return jnp.einsum("xs,byst,xt->byx", m[1], gram, m[1], precision=HIGHEST)


def _folded(head: PreNormLinear) -> tuple[jax.Array, jax.Array]:
    """The head's Linear with the LayerNorm's affine folded in: ``W diag(g)`` [out, in] and ``W beta + b``."""
    f32 = lambda v: v[...].astype(jnp.float32)  # noqa: E731
    lin, norm = head.linear, head.norm
    weight = f32(lin.weight)
    if lin.lora_a is not None:
        weight = weight + lin.lora_scale * f32(lin.lora_b) @ f32(lin.lora_a)
    # whole on every chip, as FSDP gathers any weight: split by stage, its sharded input axis would be resharded
    return sharding.gathered(weight * f32(norm.weight)), sharding.gathered(weight @ f32(norm.bias) + f32(lin.bias))


def project(stages: Sequence[jax.Array], resizes: Sequence[Resize], heads: Sequence[PreNormLinear]) -> list[jax.Array]:
    """``[head(concat_i resized_i(stages[i])) for head in heads]``, [B, H, W, out] each in the heads' dtype, without
    building the concatenated map (module docstring)."""
    centred, gaps, rstd = _stage_statistics(stages, resizes, heads[0].norm.eps)
    widths = np.cumsum([s.shape[-1] for s in stages])[:-1]
    return [_head(head, centred, resizes, gaps, rstd, widths) for head in heads]


def _head(head, centred, resizes, gaps, rstd, widths):
    """One head. The resized stages' products are summed by one matmul over their row-resized maps side by side,
    so a head holds at most three maps of its output's size at once (the unresized stage's product, the resized
    ones' sum and the result), and their gradients stay in the compute dtype."""
    dtype = head.linear.dtype
    kw = dict(precision=HIGHEST if dtype == jnp.float32 else None, preferred_element_type=jnp.float32)
    weight, bias = _folded(head)
    shift, full, rows, cols = 0.0, 0.0, [], []
    for c, m, d, w in zip(centred, resizes, gaps, jnp.split(weight.astype(dtype), widths, axis=1)):
        shift = shift + d[..., None] * w.astype(jnp.float32).sum(1)
        p = sharding.constrain_batch(jnp.einsum("byxc,dc->byxd", c.astype(dtype), w, **kw).astype(dtype))
        if m is None:
            full = full + p
        else:
            rows.append(
                sharding.constrain_batch(jnp.einsum("yr,brsd->bysd", m[0].astype(dtype), p, **kw).astype(dtype))
            )
            cols.append(m[1])
    if rows:
        cols = jnp.asarray(np.concatenate(cols, axis=1), dtype)
        full = full + jnp.einsum("xs,bysd->byxd", cols, jnp.concatenate(rows, axis=2), **kw).astype(dtype)
    # in the compute dtype: float32 here would turn the mining attention's key/value gradients float32 (2x memory)
    return sharding.constrain_batch(
        full * rstd[..., None].astype(dtype) + (shift * rstd[..., None] + bias).astype(dtype)
    )
