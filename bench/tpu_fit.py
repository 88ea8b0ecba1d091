"""The smallest TPU slice on which a released recipe's training step fits, by XLA's TPU compiler on this machine.

    python bench/tpu_fit.py [--configs configs/mgm/MGM-7B/stage2.yaml ...] [--generations v5p v5e]
                            [--set train.micro_batches=4] [--out bench/results/tpu_fit.jsonl]

For each config and generation: start at the smallest slice on which the plan's estimate, less its 15% error
bound, fits a chip's HBM; compile the step there (deviceless, ``mgjax.train.plan``'s ``--compile`` path, the program
``mgjax.train`` compiles); go to the next larger slice until the compiled peak fits, then back down while it still
fits.
A slice on which the recipe's batch does not split is passed over. One JSON line per compile, written as soon as
it ends: an interrupted run resumes where it stopped (a 7B step takes 5-7 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile only: TPU devices come from libtpu, deviceless

from mgjax import config as cfg  # noqa: E402
from mgjax.train import plan  # noqa: E402
from mgjax.train.run_config import RunConfig  # noqa: E402

GiB = 1 << 30
ROOT = Path(__file__).resolve().parents[1]
CHIPS = (4, 8, 16, 32, 64, 128, 256)
MGM_RELEASES = ("MGM-2B", "MGM-7B", "MGM-8B", "MGM-13B", "MGM-34B", "MGM-8x7B")
DEFAULT_CONFIGS = [f"configs/mgm/{r}{hd}/stage2.yaml" for hd in ("", "-HD") for r in MGM_RELEASES] + [
    f"configs/internvl/InternVL2-{r}/{mode}.yaml" for r in ("1B", "2B", "4B") for mode in ("lora", "full")
]
ERROR = 0.15  # mgjax.train.plan's estimate is within 15% of the compiled peak (tests/test_plan.py)


def slice_name(gen: str, chips: int) -> str:
    return f"{gen}-{chips * 2 if gen in ('v4', 'v5p') else chips}"


def done(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []


def fit(config: str, sets: list[str], gen: str, out: Path) -> dict | None:
    """The smallest slice of ``gen`` the step fits (its row), or None: none up to 256 chips."""
    row = _grow(config, sets, gen, out)
    while row is not None and row["chips"] > CHIPS[0]:
        smaller = _compile(config, sets, gen, out, CHIPS[CHIPS.index(row["chips"]) - 1])
        if smaller is None or not smaller["fits"]:
            break
        row = smaller
    return row


def _grow(config: str, sets: list[str], gen: str, out: Path) -> dict | None:
    """Compile on growing slices of ``gen`` until the step fits; the fitting row (or None: none up to 256 chips).
    Slices the estimate rules out even at its error bound are passed over; if it rules out every one, the largest
    is compiled all the same, so that no answer rests on the estimate alone."""
    c = cfg.load(RunConfig, config, sets)
    largest = None
    for chips in CHIPS:
        name = slice_name(gen, chips)
        try:
            estimate = plan.report(c, name)["bytes_per_device"]["total"]
        except plan.PlanError as e:  # the batch does not split over this slice
            print(f"{config} on {name}: passed over ({e})", flush=True)
            continue
        largest = chips
        if _seen(out, config, sets, name) is None and estimate * (1 - ERROR) > plan.topology(name).hbm_bytes:
            print(
                f"{config} on {name}: estimate {estimate / GiB:.1f} GiB, more than the HBM even {ERROR:.0%} "
                "lower; next",
                flush=True,
            )
            continue
        row = _compile(config, sets, gen, out, chips)
        if row["fits"]:
            return row
        largest = None  # compiled
    if largest is not None:
        row = _compile(config, sets, gen, out, largest)
        return row if row["fits"] else None
    return None


def _seen(out: Path, config: str, sets: list[str], name: str) -> dict | None:
    return next((r for r in done(out) if r["config"] == config and r["set"] == sets and r["slice"] == name), None)


def _compile(config: str, sets: list[str], gen: str, out: Path, chips: int) -> dict | None:
    """The row of one compile (read back if an earlier run made it); None where the batch does not split."""
    c, name = cfg.load(RunConfig, config, sets), slice_name(gen, chips)
    if seen := _seen(out, config, sets, name):
        return seen
    start = time.time()
    try:
        r = plan.report(c, name, compile=True)  # the estimate too
    except plan.PlanError:
        return None
    estimate, xla = r["bytes_per_device"]["total"], r["compiled_bytes_per_device"]
    row = {
        "config": config,
        "set": sets,
        "release": r["release"],
        "slice": name,
        "chips": r["topology"]["chips"],
        "mesh": r["mesh"],
        "batch": r["batch"],
        "remat": r["remat"],
        "estimate_gib": round(estimate / GiB, 2),
        "compiled_gib": round(xla["peak"] / GiB, 2) if "peak" in xla else None,
        "parts_gib": round(xla["parts"] / GiB, 2) if "parts" in xla else None,
        "temporaries_gib": round(xla["temporaries"] / GiB, 2) if xla.get("temporaries") else None,
        "refused": xla.get("refused"),
        "hbm_gib": round(r["topology"]["hbm_bytes"] / GiB, 2),
        "fits": r["fits"],
        "compile_s": round(time.time() - start),
        "date": date.today().isoformat(),
        "commit": _commit(),
    }
    with out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)
    return row


def estimate_now(row: dict) -> float:
    """``mgjax.train.plan``'s estimate for a row's step with today's code (the row keeps the one of its commit)."""
    c = cfg.load(RunConfig, row["config"], row["set"])
    r = plan.report(c, row["slice"], batch=row["batch"]["global"], seq_len=row["batch"]["seq_len"])
    return round(r["bytes_per_device"]["total"] / GiB, 2)


def table(rows: list[dict]) -> str:
    """The docs' table: per recipe and generation, the smallest slice compiled that fits (with the plan's
    estimate for it today) and the next smaller one compiled (which did not)."""
    out = [
        "| recipe | generation | smallest fitting slice | per-device batch | compiled peak GiB (estimate) | "
        "HBM GiB | compile s | one size smaller |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seen = dict.fromkeys((r["config"], r["slice"].split("-")[0]) for r in rows)
    order = {c: i for i, c in enumerate(DEFAULT_CONFIGS)}  # the defaults' order, then the rest as compiled
    for config, gen in sorted(seen, key=lambda k: (order.get(k[0], len(order)), k[1] != "v5p")):
        mine = sorted(
            (r for r in rows if r["config"] == config and r["slice"].startswith(gen + "-")), key=lambda r: r["chips"]
        )
        fits = [r for r in mine if r["fits"]]
        if not fits:
            continue
        best = fits[0]
        smaller = [r for r in mine if r["chips"] < best["chips"]]
        b = best["batch"]
        tiles = f", {b['tiles']} tiles" if "tiles" in b else ""
        below = (
            "not compiled"
            if not smaller
            else (
                f"{smaller[-1]['slice']}: refused ({smaller[-1]['temporaries_gib']} GiB temporaries)"
                if smaller[-1]["refused"]
                else f"{smaller[-1]['slice']}: {smaller[-1]['compiled_gib']} GiB"
            )
        )
        recipe = f"{best['release']} {Path(config).stem.replace('stage', 'stage ')}"
        out.append(
            f"| {recipe} | {gen} | {best['slice']} ({best['chips']} chips, fsdp {best['mesh']['fsdp']}) | "
            f"{b['per_device']} × {b['seq_len']}{tiles} | "
            f"{best['compiled_gib']} ({estimate_now(best)}) | {best['hbm_gib']:g} | {best['compile_s']} | "
            f"{below} |"
        )
    return "\n".join(out)


def _commit() -> str:
    """The code a row was compiled with: HEAD, marked + where the tree differs from it."""
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return run("rev-parse", "--short", "HEAD") + ("+" if run("status", "--porcelain", "--untracked-files=no") else "")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    ap.add_argument("--generations", nargs="+", default=["v5p", "v5e"])
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", type=Path, default=Path("bench/results/tpu_fit.jsonl"))
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out's rows and stop")
    args = ap.parse_args(argv)
    if args.table:
        print(table(done(args.out)))
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for config in args.configs:
        for gen in args.generations:
            row = fit(config, args.set, gen, args.out)
            print(
                f"== {config} {args.set} on {gen}: "
                + (
                    f"fits on {row['slice']} ({row['compiled_gib']} of {row['hbm_gib']} GiB per chip)"
                    if row
                    else "no slice up to 256 chips"
                ),
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
