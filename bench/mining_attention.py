"""Patch info mining's window attention against the memory roofline: the Pallas kernel and the XLA reference side
by side, plus the K/V heads over MGM's concatenated HR map against the same heads stage by stage.

    python bench/mining_attention.py [--channels 1024] [--window 2 4 8] [--dtype bfloat16 float32]
                                     [--min-bytes 1e9] [--images 16] [--repeats 20]

The op is memory-bound (about one FLOP per byte), so its limit is bytes moved per token: forward
(2 + 2W)·C·s (read q, K, V, write out), forward + backward (5 + 6W)·C·s (the forward, then read q, K, V, dO and
write dq, dK, dV), W = M², s = bytes per element. For each case it prints the median time, those bytes, the
achieved GB/s, the percentage of the chip's datasheet bandwidth and of a copy measured here (``x + 1`` over
1 GiB: the practical ceiling), at a size that moves at least ``--min-bytes`` and at one realistic batch
(``--images`` images of 576 tokens). The kernel runs compiled on TPUs only; elsewhere its rows say why not
(on CPUs Pallas only interprets, which says nothing about speed).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from timing import median_seconds  # bench/timing.py: the script's folder is on sys.path

from mgjax.models import hr_projection, mining
from mgjax.models.hr_projection import PreNormLinear
from mgjax.nn import resize

DATASHEET_BANDWIDTH = {
    "H100": 3.35e12,
    "H200": 4.8e12,
    "A100": 2.04e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 0.82e12,
    "TPU v5e": 0.82e12,
    "TPU v5p": 2.76e12,
    "TPU v5": 2.76e12,
    "TPU v6 lite": 1.64e12,
}
TOKENS_PER_IMAGE = 576
CONVNEXT_L = (192, 384, 768, 1536)  # stage widths: MGM's HR map has 2880 channels


def datasheet() -> float | None:
    kind = jax.devices()[0].device_kind
    return next((bw for name, bw in DATASHEET_BANDWIDTH.items() if name in kind), None)


def copy_bandwidth(repeats: int) -> float:
    x = jnp.zeros((1 << 28,), jnp.float32)  # 1 GiB
    return 2 * x.nbytes / median_seconds(jax.jit(lambda x: x + 1), x, repeats=repeats)


def attention_fns(backend: str):
    fwd = jax.jit(lambda q, k, v: mining.local_window_attention(q, k, v, backend=backend))

    def loss(q, k, v):
        return jnp.sum(mining.local_window_attention(q, k, v, backend=backend).astype(jnp.float32))

    return fwd, jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def row(label: str, seconds: float, nbytes: int, peak: float | None, copy: float) -> str:
    rate = nbytes / seconds
    sheet = f"{rate / peak:6.1%}" if peak else "    - "
    return (
        f"  {label:34s} {seconds * 1e3:9.3f} ms {nbytes / 1e9:8.3f} GB {rate / 1e9:8.1f} GB/s "
        f"{sheet} of datasheet {rate / copy:6.1%} of copy"
    )


def bench_attention(m: int, c: int, dtype, tokens: int, repeats: int, peak, copy) -> None:
    w, s = m * m, jnp.dtype(dtype).itemsize
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, tokens, c)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(1, w, tokens, c)), dtype) for _ in range(2))  # slot-major
    forward, backward = (2 + 2 * w) * c * s * tokens, (5 + 6 * w) * c * s * tokens
    print(f"M={m} (W={w}) C={c} {jnp.dtype(dtype).name} T={tokens:,} ({tokens / TOKENS_PER_IMAGE:.0f} images)")
    for backend in ("xla", "pallas"):
        if backend == "pallas" and jax.devices()[0].platform != "tpu":
            print(f"  {'pallas':34s} not run: the kernel compiles for TPUs only (here: {jax.devices()[0].platform})")
            continue
        fwd, grad = attention_fns(backend)
        print(row(f"{backend} forward", median_seconds(fwd, q, k, v, repeats=repeats), forward, peak, copy))
        print(row(f"{backend} forward+backward", median_seconds(grad, q, k, v, repeats=repeats), backward, peak, copy))


def bench_projection(widths: tuple[int, ...], c: int, side: int, images: int, dtype, repeats: int) -> None:
    """MGM's two LayerNorm+Linear heads over the resized, concatenated HR map against the same heads evaluated
    stage by stage (``hr_projection``), forward and weight gradients, from the ConvNeXt stage maps."""
    rngs = nnx.Rngs(0)
    heads = [PreNormLinear(sum(widths), c, dtype=dtype, param_dtype=jnp.float32, rngs=rngs) for _ in range(2)]
    for i, h in enumerate(heads):  # trained norms are not the identity: make the folding do something
        h.norm.weight[...] = 1 + 0.1 * jax.random.normal(jax.random.key(10 + i), (sum(widths),))
        h.norm.bias[...] = 0.1 * jax.random.normal(jax.random.key(20 + i), (sum(widths),))
    keys = jax.random.split(jax.random.key(1), len(widths))
    shapes = [(images, side >> i, side >> i, w) for i, w in enumerate(widths)]
    stages = [jax.random.normal(k, shape, dtype) for k, shape in zip(keys, shapes)]

    def mgm(heads, stages):
        maps = [stages[0].astype(dtype)] + [resize.bilinear(s, side, side).astype(dtype) for s in stages[1:]]
        full = jnp.concatenate(maps, -1)
        return [h(full) for h in heads]

    def staged(heads, stages):
        return hr_projection.project(stages, hr_projection.upsampling(stages), heads)

    def timed(fn):
        loss = lambda heads, stages: sum(jnp.sum(o.astype(jnp.float32)) for o in fn(heads, stages))  # noqa: E731
        return median_seconds(jax.jit(jax.grad(loss)), heads, stages, repeats=repeats)

    a, b = timed(mgm), timed(staged)
    err = max(
        float(jnp.max(jnp.abs(p.astype(jnp.float32) - r.astype(jnp.float32))))
        for p, r in zip(jax.jit(staged)(heads, stages), jax.jit(mgm)(heads, stages))
    )
    print(
        f"K/V heads over a [{images}, {side}, {side}, {sum(widths)}] {jnp.dtype(dtype).name} HR map -> 2 x {c}, "
        f"forward + weight gradients: MGM's concatenated map {a * 1e3:.2f} ms, stage by stage {b * 1e3:.2f} ms, "
        f"ratio {a / b:.2f}x, max-abs diff {err:.1e}"
    )


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=1024)
    ap.add_argument("--window", type=int, nargs="+", default=[2, 4, 8], help="M: windows of M x M")
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--min-bytes", type=float, default=1e9, help="the large case moves at least this many bytes")
    ap.add_argument("--images", type=int, default=16, help="the realistic case: images of 576 tokens")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument(
        "--projection-side", type=int, default=96, help="HR map side for the projection comparison (MGM: 192 at 768 px)"
    )
    args = ap.parse_args(argv)
    device = jax.devices()[0]
    peak, copy = datasheet(), copy_bandwidth(args.repeats)
    print(
        f"{device.device_kind} ({device.platform}), jax {jax.__version__}; copy (x + 1 over 1 GiB) "
        f"{copy / 1e9:.1f} GB/s" + (f", datasheet {peak / 1e9:.0f} GB/s" if peak else ", no datasheet figure")
    )
    for name in args.dtype:
        dtype = jnp.dtype(name)
        for m in args.window:
            per_token = (2 + 2 * m * m) * args.channels * dtype.itemsize
            large = int(-(-args.min_bytes // per_token))
            for tokens in (large, args.images * TOKENS_PER_IMAGE):
                bench_attention(m, args.channels, dtype, tokens, args.repeats, peak, copy)
        bench_projection(CONVNEXT_L, args.channels, args.projection_side, 1, dtype, args.repeats)


if __name__ == "__main__":
    main()
