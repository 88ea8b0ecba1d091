"""Mixtral MoE block: the grouped (ragged_dot) dispatch against the dense reference, side by side.

    python bench/moe.py [--tokens 4096] [--hidden 1024] [--inner 3584] [--experts 8] [--top-k 2] [--dtype bfloat16]

Prints the median time of each path's forward (and forward+backward), the ratio dense/grouped, and the max-abs
difference between their outputs. Defaults are Mixtral-8x7B's expert shape scaled down 4x in width. On a GPU the
grouped path is also timed with JAX's Pallas/Triton lowering of ``ragged_dot``
(``jax_ragged_dot_use_gpu_pallas_triton_lowering``) next to XLA's default one.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from timing import median_seconds  # bench/timing.py: the script's folder is on sys.path

from mgjax.models.moe import SparseMoeBlock


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
    blocks = {
        impl: SparseMoeBlock(
            args.hidden,
            args.inner,
            args.experts,
            args.top_k,
            act="silu",
            impl=impl,
            dtype=dtype,
            param_dtype=dtype,
            rngs=nnx.Rngs(0),
        )
        for impl in ("dense", "grouped")
    }
    nnx.update(blocks["grouped"], nnx.state(blocks["dense"]))  # identical weights
    x = jax.random.normal(jax.random.key(1), (1, args.tokens, args.hidden), dtype)
    print(
        f"{jax.devices()[0].device_kind}: {args.tokens} tokens, hidden {args.hidden}, inner {args.inner}, "
        f"{args.experts} experts, top-{args.top_k}, {args.dtype}"
    )
    runs = [("dense", "dense", False), ("grouped", "grouped", False)]
    if jax.default_backend() == "gpu":
        runs.append(("grouped+triton", "grouped", True))
    outs, fwd, bwd = {}, {}, {}
    for name, impl, triton in runs:
        jax.config.update("jax_ragged_dot_use_gpu_pallas_triton_lowering", triton)  # part of the jit cache key
        graphdef, state = nnx.split(blocks[impl])
        f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0])
        g = jax.jit(jax.grad(lambda s, x: nnx.merge(graphdef, s)(x)[0].astype(jnp.float32).sum(), argnums=(0, 1)))
        try:
            outs[name] = np.asarray(f(state, x), np.float32)
            fwd[name] = median_seconds(f, state, x, repeats=args.repeats)
            bwd[name] = median_seconds(g, state, x, repeats=args.repeats)
        except Exception as e:  # a lowering that cannot handle this shape: say so and keep the others
            print(f"  {name:15s} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        print(f"  {name:15s} forward {fwd[name] * 1e3:9.2f} ms   forward+backward {bwd[name] * 1e3:9.2f} ms")
    for name in fwd:
        if name != "dense":
            print(
                f"  dense / {name}: forward {fwd['dense'] / fwd[name]:.2f}x, "
                f"forward+backward {bwd['dense'] / bwd[name]:.2f}x, "
                f"max-abs diff {np.abs(outs[name] - outs['dense']).max():.3e}"
            )
    print(f"  max |out| {float(np.abs(outs['dense']).max()):.3e}")


if __name__ == "__main__":
    main()
