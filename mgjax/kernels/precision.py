"""Pallas TPU kernels traced at the precision Mosaic accepts.

Mosaic refuses a bfloat16 matmul asked for at "highest" precision ("Bad lhs type"), which a process-wide
``jax_default_matmul_precision`` setting requests of every dot, a kernel's included (some users set it; our tests do,
for float32 parity). For bfloat16 operands it means nothing: their products are exact in float32 accumulators.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _scope(args):
    bf16 = any(getattr(a, "dtype", None) == jnp.bfloat16 for a in jax.tree.leaves(args))
    return jax.default_matmul_precision("default" if bf16 else None)


def default_for_bfloat16(fn):
    """``fn`` traced, forward and backward, at the default matmul precision when any of its arguments is
    bfloat16 (the backward is traced later than the forward, outside any scope the caller opens: hence a VJP of
    its own). Integer arguments get no gradient."""

    @jax.custom_vjp
    def run(*args):
        with _scope(args):
            return fn(*args)

    def forward(*args):
        with _scope(args):
            out, back = jax.vjp(fn, *args)
        return out, (back, args)

    def backward(saved, g):
        back, args = saved
        with _scope(args):
            return back(g)

    run.defvjp(forward, backward)
    return run
