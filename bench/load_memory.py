"""Peak host memory of ``mgjax.from_pretrained`` on a ~1.2B-parameter Llama checkpoint in bf16.

Writes a random Llama-3.2-1B-shaped checkpoint (sharded safetensors, like the hub's) to a temporary
directory, then loads it in a fresh process and prints the peak resident memory against the checkpoint size.

    python bench/load_memory.py [--layers 16] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np

CONFIG = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)


def shapes(c: dict) -> dict[str, tuple[int, ...]]:
    h, i, q, kv = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_attention_heads"] * c["head_dim"],
        c["num_key_value_heads"] * c["head_dim"],
    )
    out = {"model.embed_tokens.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out.update(
            {
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    return out


def write_checkpoint(path: Path, config: dict) -> int:
    from mgjax.convert.safetensors_io import TensorSpec, write

    rng = np.random.default_rng(0)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    specs = [
        TensorSpec(k, bf16, s, lambda s=s: (rng.standard_normal(s, np.float32) * 0.02).astype(bf16))
        for k, s in shapes(config).items()
    ]
    write(path, specs, max_shard_bytes=1 << 30)
    (path / "config.json").write_text(json.dumps(config))
    return sum(s.nbytes for s in specs)


def rss_gb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def load(path: str) -> None:
    """Runs in a fresh process: baseline after JAX starts, then the load, then the peak."""
    import jax
    import jax.numpy as jnp

    import mgjax

    jax.devices()
    base = rss_gb()
    t = time.perf_counter()
    model = mgjax.from_pretrained(path, dtype=jnp.bfloat16)
    jax.block_until_ready(jax.tree.leaves(model))
    secs = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB
    print(json.dumps({"baseline_gb": base, "peak_gb": peak, "seconds": secs}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    ap.add_argument("--keep", help="write the checkpoint here and keep it")
    ap.add_argument("--load", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        return load(args.load)
    config = {**CONFIG, "num_hidden_layers": args.layers}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.keep or tmp)
        t = time.perf_counter()
        size = write_checkpoint(path, config)
        params = size // 2
        print(
            f"wrote {params / 1e9:.3f}B parameters, {size / 1e9:.3f} GB bf16 in "
            f"{len(list(path.glob('*.safetensors')))} shards ({time.perf_counter() - t:.0f} s)"
        )
        out = subprocess.run(
            [sys.executable, __file__, "--load", str(path)], check=True, capture_output=True, text=True
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        gb = size / 1e9
        print(f"load: {r['seconds']:.1f} s ({gb / r['seconds']:.2f} GB/s)")
        print(
            f"peak RSS {r['peak_gb']:.3f} GB = {r['peak_gb'] / gb:.3f} x checkpoint "
            f"(JAX baseline {r['baseline_gb']:.3f} GB; above baseline {(r['peak_gb'] - r['baseline_gb']) / gb:.3f} x)"
        )


if __name__ == "__main__":
    main()
