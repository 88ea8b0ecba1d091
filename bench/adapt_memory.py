"""What Mini-InternVL's adaptation modes cost in device memory, measured by XLA on the compiled training step.

For each mode (full, frozen_vit, lora) of an InternVL2 release, its run config's step (``mgjax.train.plan``'s
compile path, at the shapes given here, unpacked) is compiled ahead of time from shapes alone (nothing is allocated,
so the 1B-4B releases compile on a laptop) for the local devices, and XLA's memory analysis gives the bytes per
device; the optimizer state is counted from the same abstract model. Printed side by side, with each mode's saving
against full:

    python bench/adapt_memory.py [--release InternVL2-1B] [--batch 1] [--seq 4096] [--tiles 7] [--dtype bfloat16]
                                 [--topology v5e-4] [--modes full lora]

``--topology`` compiles for a TPU slice instead (deviceless, with libtpu: ``mgjax.parallel.topology``); a step the
TPU compiler refuses prints its temporaries and "refused".
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

from mgjax import config as cfg
from mgjax.nn import params
from mgjax.parallel import mesh, topology
from mgjax.recipes import adapt, internvl_releases
from mgjax.train import plan
from mgjax.train.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def measure(
    release: str, mode: str, *, batch: int, seq: int, tiles: int, dtype: str, remat: str, devices
) -> dict[str, float]:
    """The mode's run config (``configs/internvl/<release>/<mode>.yaml``) at the given shapes, unpacked, compiled
    through ``mgjax.train.plan``: the program ``mgjax.train`` would run."""
    sets = [
        f"model.compute_dtype={dtype}",
        f"model.remat={remat}",
        f"data.max_length={seq}",
        "data.pack_length=0",
        f"data.tile_slots={tiles}",
        "train.micro_batches=1",
    ]
    c = cfg.load(RunConfig, ROOT / "configs" / "internvl" / release / f"{mode}.yaml", sets)
    model, trainable = plan.abstract_model(c), plan.trainable_filter(c)
    start = time.perf_counter()
    use = plan.compiled(c, mesh.MeshConfig(), global_batch=batch * len(devices), seq_len=seq, devices=devices)
    return {
        "refused": "refused" in use,
        "trainable": params.count_params(model, trainable),
        "params": params.count_params(model),
        "optimizer_gib": 2 * 4 * params.count_params(model, trainable) / GiB,  # AdamW's two float32 moments
        "peak_gib": use.get("peak", use["temporaries"]) / GiB,
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
    ap.add_argument("--topology", default="", help="a TPU slice (v5e-4, v5p-8, ...) to compile for, deviceless")
    ap.add_argument("--modes", nargs="+", default=list(adapt.MODES), choices=adapt.MODES)
    args = ap.parse_args()
    devices = topology.devices(args.topology) if args.topology else jax.devices()
    print(
        f"{args.release} on {devices[0].device_kind} x{len(devices)}: batch {args.batch} x "
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
            dtype=args.dtype,
            remat=args.remat,
            devices=devices,
        )
        for mode in args.modes
    }
    full = rows[args.modes[0]]["peak_gib"]
    for mode, r in rows.items():
        refused = " (refused: temporaries alone)" if r["refused"] else ""
        print(
            f"{mode:11s} {r['trainable'] / 1e6:11.1f}M {r['optimizer_gib']:8.2f}GiB {r['peak_gib']:8.2f}GiB "
            f"{full - r['peak_gib']:8.2f}GiB ({1 - r['peak_gib'] / full:4.0%}) {r['compile_s']:7.1f}s{refused}"
        )


if __name__ == "__main__":
    main()
