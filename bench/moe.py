"""Mixtral MoE block: the grouped (ragged_dot) dispatch against the dense reference, side by side.

    python bench/moe.py [--tokens 4096] [--hidden 1024] [--inner 3584] [--experts 8] [--top-k 2] [--dtype bfloat16]

Prints the median time of each path's forward (and forward+backward), the ratio dense/grouped, and the max-abs
difference between their outputs. Defaults are Mixtral-8x7B's expert shape scaled down 4x in width.
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgjax.models.moe import SparseMoeBlock


def median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inner", type=int, default=3584)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    dtype = jnp.dtype(args.dtype)
    blocks = {impl: SparseMoeBlock(args.hidden, args.inner, args.experts, args.top_k, act="silu", impl=impl,
                                   dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)) for impl in ("dense", "grouped")}
    nnx.update(blocks["grouped"], nnx.state(blocks["dense"]))  # identical weights
    x = jax.random.normal(jax.random.key(1), (1, args.tokens, args.hidden), dtype)
    print(f"{jax.devices()[0].device_kind}: {args.tokens} tokens, hidden {args.hidden}, inner {args.inner}, "
          f"{args.experts} experts, top-{args.top_k}, {args.dtype}")
    outs, fwd, bwd = {}, {}, {}
    for impl, block in blocks.items():
        graphdef, state = nnx.split(block)
        f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
        g = jax.jit(jax.grad(lambda s, x: nnx.merge(graphdef, s)(x)[0].astype(jnp.float32).sum(), argnums=(0, 1)))
        outs[impl] = np.asarray(f(state, x), np.float32)
        fwd[impl] = median_time(f, state, x, repeats=args.repeats)
        bwd[impl] = median_time(g, state, x, repeats=args.repeats)
        print(f"  {impl:8s} forward {fwd[impl] * 1e3:9.2f} ms   forward+backward {bwd[impl] * 1e3:9.2f} ms")
    print(f"  dense / grouped: forward {fwd['dense'] / fwd['grouped']:.2f}x, "
          f"forward+backward {bwd['dense'] / bwd['grouped']:.2f}x")
    scale = float(np.abs(outs["dense"]).max())
    print(f"  max-abs(grouped - dense) = {np.abs(outs['grouped'] - outs['dense']).max():.3e} (max |out| {scale:.3e})")


if __name__ == "__main__":
    main()
