"""``python -m mgjax.data.convert``: a LLaVA JSON/JSONL file and its image folder, or an InternVL meta file and its
datasets, as ArrayRecord shard datasets with the images inside (``data.shards``), for ``data.path`` / ``data.meta``.

A meta file becomes one shard dataset per dataset, ``OUT/<name>/``, and ``OUT/meta.json`` naming them (its
``repeat_time`` and options as they were: the cut and repeats still happen when training reads it). Records the
loader would skip (an unreadable JSONL line, a missing image) are kept as bad entries, so the run's bad-sample
report is the one the JSON file would give; their count is printed here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mgjax.cli import HelpFormatter, integer
from mgjax.data import meta, samples, shards


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mgjax.data.convert", description=__doc__, formatter_class=HelpFormatter
    )
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="a LLaVA-format JSON list or JSONL file")
    source.add_argument("--meta", help="an InternVL meta file ({name: {root, annotation, repeat_time, ...}})")
    ap.add_argument("--image-folder", default="", help="--data's image root (default: the data file's folder)")
    ap.add_argument("--out", required=True, help="the folder to write (must not hold a dataset already)")
    ap.add_argument(
        "--allow-paths-outside",
        action="store_true",
        help="embed images whose paths are absolute or lead out of their folder (else: bad records)",
    )
    ap.add_argument("--records-per-shard", type=integer(1), default=1024, help="records per ArrayRecord file")
    return ap


def _summary(name: str, manifest: dict, out: Path) -> str:
    size = sum((out / s["path"]).stat().st_size for s in manifest["shards"])
    bad = ", ".join(f"{reason}: {n}" for reason, n in manifest["bad"].items()) or "none"
    return (
        f"{name}: {manifest['records']} records in {len(manifest['shards'])} shards, {size / 2**20:.1f} MiB -> {out}"
        f" (bad records kept for the report: {bad})"
    )


def convert_data(data: Path, image_folder: str, out: Path, per_shard: int, anywhere: bool) -> list[str]:
    manifest = shards.write(
        samples.read_records(data), image_folder or data.parent, out, per_shard=per_shard, anywhere=anywhere
    )
    return [_summary(data.name, manifest, out)]


def convert_meta(path: Path, out: Path, per_shard: int, anywhere: bool) -> list[str]:
    sources, lines, entries = meta.read_meta(path, repeat=False), [], {}
    target = out / "meta.json"
    if target.exists():
        raise FileExistsError(f"{target} exists; write elsewhere")
    for source in sources:
        manifest = shards.write(source.records, source.root, out / source.name, per_shard=per_shard, anywhere=anywhere)
        lines.append(_summary(source.name, manifest, out / source.name))
        options = {k: getattr(source, k) for k in meta.OPTIONAL if getattr(source, k) is not None}
        entries[source.name] = {
            "root": source.name,
            "annotation": source.name,
            "repeat_time": source.repeat_time,
            **options,
        }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(entries, indent=2, ensure_ascii=False))
    tmp.replace(target)
    return [*lines, f"meta file: {target}"]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.data:
            lines = convert_data(
                Path(args.data), args.image_folder, Path(args.out), args.records_per_shard, args.allow_paths_outside
            )
        else:
            lines = convert_meta(Path(args.meta), Path(args.out), args.records_per_shard, args.allow_paths_outside)
    except (OSError, ValueError) as e:  # a missing/unreadable input file, a malformed JSON or meta file
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in lines:
        print(line)
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
