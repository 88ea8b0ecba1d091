"""Host-side preprocessing throughput: samples/s of one worker process for MGM's standard and HD images and
InternVL's dynamic tiling (JPEG decode + resize + normalise, then tokenisation), against transformers' image
processors doing the same job on the same images; and from it, the host cores a v5p-8 host needs to keep MGM-7B
stage 2 (and MGM-7B-HD) fed at 40% MFU.

    python bench/loader.py [--images 24] [--sizes 640x480 1024x768 1920x1080] [--mfu 0.4]

It also reads the same images as records, from a JSONL file and its image folder and from ArrayRecord shards.

The images are synthetic photographs (smooth noise, JPEG quality 90) at the given sizes, written once to a
temporary folder; each pipeline reads the same files. transformers' processors are its PIL ones (torchvision, which
its default ones need, breaks transformers' vision imports next to the torch we pin). The tokeniser is the demo's
word-level one: a Llama/Qwen BPE costs the same order (tens of microseconds per sample), far below the images.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import transformers  # noqa: E402
from PIL import Image  # noqa: E402

from mgjax import config as cfg  # noqa: E402
from mgjax.data import preprocess, samples, shards, templates  # noqa: E402
from mgjax.demo import mgm_task  # noqa: E402
from mgjax.train import plan  # noqa: E402
from mgjax.train.run_config import RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MEAN = tuple(int(m * 255) for m in preprocess.OPENAI_CLIP_MEAN)


def write_images(root: Path, sizes: list[tuple[int, int]], n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        w, h = sizes[i % len(sizes)]
        coarse = (rng.random((h // 16 + 1, w // 16 + 1, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)  # smooth, photo-like content for the codec
        noise = rng.integers(-12, 13, (h, w, 3))
        img = Image.fromarray(np.clip(np.asarray(img, np.int16) + noise, 0, 255).astype(np.uint8))
        paths.append(root / f"{i:03d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def clip_processor(size: int):
    return transformers.CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def pipelines() -> dict[str, dict[str, callable]]:
    """name -> {"mgjax": path -> arrays, "transformers": path -> arrays}: the same job both ways."""
    low, aux, hd_low, hd_aux = clip_processor(336), clip_processor(768), clip_processor(672), clip_processor(1536)
    tiles = transformers.GotOcr2ImageProcessorPil(
        crop_to_patches=True, min_patches=1, max_patches=12, size={"height": 448, "width": 448}
    )

    def squared(path):
        return preprocess.expand_to_square(preprocess.load_image(path), MEAN)

    return {
        "MGM standard (336 + 768 px)": {
            "mgjax": lambda p: preprocess.mgm_images(preprocess.load_image(p), image_size_aux=768),
            "transformers": lambda p: (low(squared(p), return_tensors="np"), aux(squared(p), return_tensors="np")),
        },
        "MGM HD (4 crops + global, 1536 px)": {
            "mgjax": lambda p: preprocess.mgm_images(
                preprocess.load_image(p), image_size_aux=1536, image_grid=2, image_global=True
            ),
            "transformers": lambda p: (
                hd_low(squared(p), return_tensors="np"),
                hd_aux(squared(p), return_tensors="np"),
            ),
        },
        "InternVL tiles (<= 12 + thumbnail, 448 px)": {
            "mgjax": lambda p: preprocess.internvl_pixels(preprocess.load_image(p), max_num=12),
            "transformers": lambda p: tiles(preprocess.load_image(p), return_tensors="np"),
        },
    }


def rate(fn, items, repeat: int = 2) -> float:
    """Items per second of ``fn`` over ``items`` (best of ``repeat`` passes, after one warm-up item)."""
    fn(items[0])
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return len(items) / best


def tokenise_rate(root: Path) -> float:
    """Conversations per second through the v1 template and the demo's tokeniser, on the demo's records."""
    train, _ = mgm_task.write_dataset(root, n_train=200, n_eval=1)
    convs = [r["conversations"] for r in json.loads(Path(train).read_text())]
    tok, template = mgm_task.tokenizer(), templates.get("v1")

    def one(conv):
        segments = templates.render(template, conv, sample="bench")
        return templates.encode(segments, tok, sample="bench", image_id=-200, image_tokens=576)

    return rate(one, convs)


def read_rates(root: Path, paths: list[Path]) -> tuple[float, float]:
    """Records/s read with their image decoded (no resizing): a JSONL line plus its image file, against the same
    record read back from an ArrayRecord shard dataset (``python -m mgjax.data.convert``) at random positions."""
    lines = [json.dumps({"id": str(i), "image": p.name, "conversations": []}) for i, p in enumerate(paths)]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    shards.write(samples.read_records(root / "train.jsonl"), paths[0].parent, root / "shards", per_shard=8)
    data = shards.Shards(root / "shards")
    order = np.random.default_rng(0).permutation(len(data)).tolist()

    def from_json(line):
        record = json.loads(line)
        return preprocess.load_image(paths[0].parent / record["image"])

    return rate(from_json, lines), rate(lambda i: preprocess.load_image(data[i]["image"]), order)


def samples_needed(release: str, mfu: float) -> tuple[float, float]:
    """(samples/s, s/step) the release's stage-2 recipe consumes on one v5p-8 host at ``mfu``."""
    c = cfg.load(RunConfig, ROOT / "configs" / "mgm" / release / "stage2.yaml", [])
    r = plan.report(c, "v5p-8", mfu=mfu)
    return c.train.global_batch / r["seconds_per_step"], r["seconds_per_step"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--sizes", nargs="+", default=["640x480", "1024x768", "1920x1080"])
    ap.add_argument("--mfu", type=float, default=0.4)
    args = ap.parse_args()
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_images(Path(tmp), sizes, args.images)
        print(f"{args.images} JPEGs ({', '.join(args.sizes)}), one worker process, samples/s (best of 2 passes)")
        print(f"{'pipeline':45s} {'mgjax':>8s} {'transformers':>13s} {'ratio':>6s}")
        rates = {}
        for name, ways in pipelines().items():
            ours, theirs = rate(ways["mgjax"], paths), rate(ways["transformers"], paths)
            rates[name] = ours
            print(f"{name:45s} {ours:8.1f} {theirs:13.1f} {ours / theirs:6.2f}")
        json_rate, shard_rate = read_rates(Path(tmp), paths)
        print(f"\nrecords/s read and decoded (no resizing): JSONL + image files {json_rate:.1f}, ArrayRecord shards")
        print(f"at random positions {shard_rate:.1f} ({shard_rate / json_rate:.2f}x)")
    with tempfile.TemporaryDirectory() as tmp:
        tokens = tokenise_rate(Path(tmp))
    print(f"{'tokenisation (v1 template, demo tokeniser)':45s} {tokens:8.0f}")
    print(f"\nhost cores one v5p-8 host (4 chips) needs to feed a stage-2 recipe at MFU {args.mfu:.0%}:")
    recipes = (("MGM-7B", "MGM standard (336 + 768 px)"), ("MGM-7B-HD", "MGM HD (4 crops + global, 1536 px)"))
    for release, pipeline in recipes:
        need, step = samples_needed(release, args.mfu)
        per_worker = 1 / (1 / rates[pipeline] + 1 / tokens)
        print(
            f"  {release}: {need:.1f} samples/s ({step:.1f} s/step) / {per_worker:.1f} per worker = "
            f"{need / per_worker:.1f} cores"
        )


if __name__ == "__main__":
    main()
