"""Train an MGM model: ``python -m mgjax.train --config configs/demo.yaml [--set key=value ...] [--resume]``.

``--help`` lists every config field. The demo config (``model.init: demo``) writes a synthetic captioning set and
trains a tiny MGM on it, on a CPU, in a couple of minutes.
"""
from __future__ import annotations

import argparse
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import jax.numpy as jnp
from PIL import Image, ImageDraw

import mgjax
from mgjax import config as cfg
from mgjax import demo_data, loader, optim, samples
from mgjax.checkpoint import Checkpoints
from mgjax.train_step import make_optimizer, train_step

STAGES = {"stage1": optim.MGM_STAGE1, "stage2": optim.MGM_STAGE2}


@dataclass(frozen=True)
class ModelSection:
    init: str = field(default="demo", metadata={"help": "'demo' (a tiny random MGM) or 'pretrained'"})
    path: str = field(default="", metadata={"help": "converted MGM checkpoint directory (with tokenizer files)"})


@dataclass(frozen=True)
class DataSection:
    path: str = field(default="", metadata={"help": "LLaVA-format JSON/JSONL; empty with the demo: synthetic"})
    image_folder: str = ""
    template: str = demo_data.TEMPLATE
    max_length: int = 2048
    pad_to_square: bool = field(default=True, metadata={"help": "stage 2 pads to square; stage 1 crops"})
    workers: int = 0
    max_bad_fraction: float = 0.01
    seed: int = 42


@dataclass(frozen=True)
class TrainSection:
    stage: str = field(default="stage2", metadata={"help": "stage1 | stage2: which parameters train"})
    global_batch: int = 128
    micro_batches: int = 1
    epochs: int = 1
    steps: int = field(default=0, metadata={"help": "0: as many as the epochs give"})
    log_every: int = 10
    out_dir: str = "runs/mgm"


@dataclass(frozen=True)
class CheckpointSection:
    every: int = 1000
    keep: int = 1


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: optim.OptimConfig = field(default_factory=optim.OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)


def _model_and_data(c: RunConfig, out: Path):
    if c.model.init == "demo":
        model, tok = mgjax.init(demo_data.model_config(), seed=0), demo_data.tokenizer()
        path = Path(c.data.path) if c.data.path else demo_data.write_dataset(out / "data")
        return model, tok, path, Path(c.data.image_folder or path.parent)
    if c.model.init != "pretrained":
        raise cfg.ConfigError(f"model.init must be 'demo' or 'pretrained', not {c.model.init!r}")
    from transformers import AutoTokenizer
    return (mgjax.from_pretrained(c.model.path), AutoTokenizer.from_pretrained(c.model.path), Path(c.data.path),
            Path(c.data.image_folder))


def _loss_png(path: Path, losses: list[float]) -> None:
    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(losses), max(losses)
    pts = [(pad + i * (w - 2 * pad) / max(len(losses) - 1, 1), h - pad - (v - lo) / max(hi - lo, 1e-9) * (h - 2 * pad))
           for i, v in enumerate(losses)]
    draw.rectangle([pad, pad, w - pad, h - pad], outline="gray")
    draw.line(pts, fill="blue", width=2)
    draw.text((pad, 10), f"loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps", fill="black")
    img.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mgjax.train", description=__doc__.split("\n\n")[0],
                                 epilog="config fields (set with --set key=value):\n  "
                                        + "\n  ".join(cfg.describe(RunConfig)),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a YAML run config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    args = ap.parse_args(argv)
    try:
        c = cfg.load(RunConfig, args.config, args.set)
        if c.train.stage not in STAGES:
            raise cfg.ConfigError(f"train.stage must be one of {sorted(STAGES)}, not {c.train.stage!r}")
    except cfg.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(c.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- model, data, optimizer
    try:  # a missing model or data file, an unreadable JSON, a batch that does not split: one line, exit 2
        model, tok, data_path, images = _model_and_data(c, out)
        records = list(samples.read_records(data_path))
        make = samples.MGMSamples(model.config, tok, c.data.template, str(images), max_length=c.data.max_length,
                                  pad_to_square=c.data.pad_to_square, pad_id=tok.pad_token_id or 0)
        per_host = c.train.global_batch // jax.process_count()
        steps = c.train.steps or c.train.epochs * len(records) // c.train.global_batch
        report = samples.BadSamples(max_fraction=c.data.max_bad_fraction)
        batches = loader.Batches(records, make, batch=per_host, micro_batches=c.train.micro_batches,
                                 seed=c.data.seed, epochs=c.train.epochs, process_index=jax.process_index(),
                                 process_count=jax.process_count(), workers=c.data.workers, report=report)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    opt = make_optimizer(model, STAGES[c.train.stage], c.optim, steps)
    lr = optim.schedule(c.optim, steps)
    ckpts = Checkpoints(out / "checkpoints", keep=c.checkpoint.keep)
    if ckpts.latest() is not None and not args.resume:
        print(f"error: {out / 'checkpoints'} already holds step {ckpts.latest()}; pass --resume to continue it, or "
              "set train.out_dir to a new directory", file=sys.stderr)
        return 2
    start = 0
    if args.resume and ckpts.latest() is not None:
        start, state = ckpts.restore(model, opt)
        batches.set_state(state)
        print(f"resumed from step {start}")
    print(f"{optim.count_params(model):,} parameters, "
          f"{optim.count_params(model, opt.wrt):,} trainable ({c.train.stage}); "
          f"{steps} steps of {c.train.global_batch}")

    # ---------------------------------------------------------------- the loop (metrics fetched one step behind)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    log, losses, pending, last_saved = open(out / "metrics.jsonl", "a"), [], None, None
    tick = time.perf_counter()

    def record(step_metrics, step, seconds):
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss became {values['loss']} at step {step}; the last good checkpoint is "
                                     f"step {last_saved} in {out / 'checkpoints'}")
        values.update(step=step, lr=float(lr(step - 1)), tokens_per_s=values["tokens"] / seconds,
                      samples_per_s=c.train.global_batch / seconds)
        log.write(json.dumps(values) + "\n")
        losses.append(values["loss"])
        if step % c.train.log_every == 0 or step == steps:
            print(f"step {step:5d}  loss {values['loss']:.4f}  grad {values['grad_norm']:.3f}  lr {values['lr']:.2e}"
                  f"  {values['tokens_per_s']:.0f} tok/s", flush=True)

    step = start
    try:
        for step in range(start + 1, steps + 1):
            metrics = train_step(model, opt, {k: jnp.asarray(v) for k, v in next(batches).items()
                                              if k in ("input_ids", "labels", "images", "images_aux")})
            now = time.perf_counter()
            if pending is not None:
                record(*pending)
            pending, tick = (metrics, step, now - tick), now
            if step % c.checkpoint.every == 0 or stop:
                record(*pending)  # never checkpoint past a non-finite loss
                pending = None
                ckpts.save(step, model, opt, batches.get_state())
                last_saved = step
            if stop:
                print(f"{stop[0]}: saved step {step}; resume with --resume", flush=True)
                break
        if pending is not None:
            record(*pending)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    finally:
        ckpts.wait()
        log.close()
        report.write(out / "bad_samples.json")

    # ---------------------------------------------------------------- outputs
    if not stop:
        mgjax.save_pretrained(model, out / "final")
        tok.save_pretrained(out / "final")
    if losses:
        _loss_png(out / "loss.png", losses)
    print(f"done at step {step}: {report.count} bad samples of {report.seen} (report: {out / 'bad_samples.json'}); "
          f"model: {out / 'final'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
