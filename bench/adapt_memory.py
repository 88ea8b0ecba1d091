"""What Mini-InternVL's adaptation modes cost in device memory, measured by XLA on the compiled training step.

For each mode (full, frozen_vit, lora) of an InternVL2 release, the step is compiled ahead of time from shapes
alone (nothing is allocated, so the 1B-4B releases compile on a laptop) for the local devices, and XLA's memory
analysis gives the bytes per device; the optimizer state is counted from the same abstract model. Printed side
by side, with each mode's saving against full:

    python bench/adapt_memory.py [--release InternVL2-1B] [--batch 1] [--seq 4096] [--tiles 7] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.models.internvl import InternVLChatModel
from mgjax.nn import params
from mgjax.parallel import mesh
from mgjax.recipes import adapt, internvl_releases
from mgjax.train import optim
from mgjax.train.step import ShardedStep, make_optimizer, memory

GiB = 2**30


def measure(release: str, mode: str, *, batch: int, seq: int, tiles: int, dtype, remat: str) -> dict[str, float]:
    recipe = internvl_releases.recipe(mode)
    config = internvl_releases.shapes_config(
        release, dtype=dtype, param_dtype=jnp.float32, remat=remat, image_token_id=0
    )

    def build():
        model = InternVLChatModel(config, rngs=nnx.Rngs(0))
        m = adapt.prepare(model, mode, rank=recipe.lora_rank or 16, alpha=recipe.lora_alpha or 32.0)
        return model, make_optimizer(model, m.trainable, optim.OptimConfig(), 1, frozen=m.frozen)

    model, opt = nnx.eval_shape(build)
    m = mesh.make_mesh(mesh.MeshConfig())
    s = config.vision.image_size
    spec = {
        "input_ids": ((1, batch, seq), jnp.int32),
        "labels": ((1, batch, seq), jnp.int32),
        "pixel_values": ((1, batch, tiles, 3, s, s), jnp.float32),
    }
    inputs = {
        k: jax.ShapeDtypeStruct(shape, dt, sharding=mesh.batch_sharding(m, len(shape)))
        for k, (shape, dt) in spec.items()
    }
    start = time.perf_counter()
    use = memory(ShardedStep(model, opt, m).compile(model, opt, inputs))
    return {
        "trainable": params.count_params(model, opt.wrt),
        "params": params.count_params(model),
        "optimizer_gib": sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(nnx.state(opt, nnx.OptState))) / GiB,
        "peak_gib": use["peak"] / GiB,
        "temporaries_gib": use["temporaries"] / GiB,
        "compile_s": time.perf_counter() - start,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--release", default="InternVL2-1B", choices=internvl_releases.NAMES)
    ap.add_argument("--batch", type=int, default=1, help="samples per device")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--tiles", type=int, default=7, help="tile slots per sample (6 tiles + thumbnail)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--remat", default="full")
    args = ap.parse_args()
    print(
        f"{args.release} on {jax.devices()[0].device_kind} x{jax.device_count()}: batch {args.batch} x "
        f"{args.seq} tokens, {args.tiles} tiles, compute {args.dtype}, remat {args.remat} (float32 weights)"
    )
    print(f"{'mode':11s} {'trainable':>12s} {'optimizer':>10s} {'step peak':>10s} {'saving':>16s} {'compile':>8s}")
    rows = {
        mode: measure(
            args.release,
            mode,
            batch=args.batch,
            seq=args.seq,
            tiles=args.tiles,
            dtype=jnp.dtype(args.dtype),
            remat=args.remat,
        )
        for mode in adapt.MODES
    }
    full = rows["full"]["peak_gib"]
    for mode, r in rows.items():
        print(
            f"{mode:11s} {r['trainable'] / 1e6:11.1f}M {r['optimizer_gib']:8.2f}GiB {r['peak_gib']:8.2f}GiB "
            f"{full - r['peak_gib']:8.2f}GiB ({1 - r['peak_gib'] / full:4.0%}) {r['compile_s']:7.1f}s"
        )


if __name__ == "__main__":
    main()
