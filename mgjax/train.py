"""Train an MGM model: ``python -m mgjax.train --config configs/demo.yaml [--set key=value ...] [--resume]``.

``--help`` lists every config field. The demo config (``model.init: demo``) writes a synthetic question-answering
set, trains a tiny MGM on it on a CPU, evaluates it on held-out images and, with ``eval.compare_lr_only``, trains
the same budget without the high-resolution branch and prints both side by side.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import math
import re
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
from mgjax import demo_data, distributed, flops, heldout, loader, mining, optim, samples
from mgjax import mesh as mesh_lib
from mgjax.checkpoint import Checkpoints
from mgjax.train_step import ShardedStep, make_optimizer, memory

STAGES = {"stage1": optim.MGM_STAGE1, "stage2": optim.MGM_STAGE2, "full": (r".*",)}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INPUTS = ("input_ids", "labels", "images", "images_aux")


@dataclass(frozen=True)
class ModelSection:
    init: str = field(default="demo", metadata={
        "help": "'demo' (a tiny random MGM), 'pretrained' (a converted MGM checkpoint: path) or 'parts' (stage 1: "
                "llm + vision + vision_aux checkpoints)"})
    release: str = field(default="", metadata={
        "help": "an MGM release (MGM-7B, MGM-7B-HD, ...; mgjax.releases): its architecture, and its MGM fields "
                "(image_size_aux, image_grid, image_global) over the loaded checkpoints' configs"})
    path: str = field(default="", metadata={"help": "pretrained: converted MGM checkpoint directory (with tokenizer)"})
    llm: str = field(default="", metadata={"help": "parts: HF LLM checkpoint directory (with tokenizer files)"})
    vision: str = field(default="", metadata={"help": "parts: HF CLIP checkpoint directory"})
    vision_aux: str = field(default="", metadata={"help": "parts: ConvNeXt checkpoint (HF, timm or open_clip keys)"})
    mining: bool = field(default=True, metadata={"help": "false: the LR-only ablation (no HR tower, no mining)"})
    compute_dtype: str = field(default="float32", metadata={
        "help": "float32 | bfloat16: the compute dtype; parameters and optimizer state stay float32"})
    remat: str = field(default="none", metadata={"help": "remat policy of the scanned layers (layers.REMAT_POLICIES)"})
    mining_backend: str = field(default="auto", metadata={
        "help": "auto | xla | pallas: patch info mining's window attention (auto: the Pallas kernel on TPUs)"})


@dataclass(frozen=True)
class DataSection:
    path: str = field(default="", metadata={"help": "LLaVA-format JSON/JSONL; empty with the demo: synthetic"})
    image_folder: str = ""
    template: str = demo_data.TEMPLATE
    max_length: int = 2048
    pad_to_square: bool = field(default=True, metadata={"help": "stage 2 pads to square; stage 1 crops"})
    group_by_length: bool = field(default=False, metadata={
        "help": "MGM's group_by_modality_length: global batches of similar length, image and text-only apart"})
    length_buckets: int = field(default=1, metadata={
        "help": "> 1: pad each batch only to the shortest of this many lengths up to max_length that holds it"})
    workers: int = 0
    max_bad_fraction: float = 0.01
    seed: int = 42


@dataclass(frozen=True)
class TrainSection:
    stage: str = field(default="stage2", metadata={
        "help": "stage1 | stage2 (MGM's) | full (everything, towers too: training from scratch)"})
    freeze: tuple[str, ...] = field(default=(), metadata={
        "help": "regexes of parameter paths kept frozen within the stage's trainable set (the demo: the HR tower)"})
    global_batch: int = 128
    micro_batches: int = 1
    epochs: int = 1
    steps: int = field(default=0, metadata={"help": "0: as many as the epochs give; more: the data is cycled"})
    log_every: int = 10
    progress: bool = field(default=True, metadata={"help": "a progress bar on stderr"})
    peak_tflops: float = field(default=0.0, metadata={
        "help": "per-chip peak for MFU; 0: the known peak of the chip (none on CPUs: MFU is then not reported)"})
    out_dir: str = "runs/mgm"


@dataclass(frozen=True)
class CheckpointSection:
    every: int = 1000
    keep: int = 1


@dataclass(frozen=True)
class EvalSection:
    enabled: bool = field(default=True, metadata={"help": "false: no held-out evaluation after training"})
    path: str = field(default="", metadata={
        "help": "held-out LLaVA-format records, scored by teacher-forced exact answers per 'type' field; "
                "empty: none (the demo: its own held-out split)"})
    image_folder: str = ""
    batch: int = 64
    compare_lr_only: bool = field(default=False, metadata={
        "help": "also train the same budget with model.mining false (out_dir/lr_only) and print both evaluations"})


@dataclass(frozen=True)
class MeshSection(mesh_lib.MeshConfig):
    """The (data, fsdp, tensor, expert) axis sizes over all processes' devices, and the checks before step 1."""
    min_sharded: float = field(default=0.98, metadata={
        "help": "with fsdp or expert > 1: refuse to start when a smaller fraction of parameter bytes is sharded"})
    device_memory_gb: float = field(default=0.0, metadata={
        "help": "refuse to start when the compiled step needs more per device; 0: the device's own limit "
                "(none known on CPUs)"})


@dataclass(frozen=True)
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: optim.OptimConfig = field(default_factory=optim.OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    distributed: distributed.DistributedConfig = field(default_factory=distributed.DistributedConfig)


# ---------------------------------------------------------------------------------------------------------- setup
def _overrides(m: ModelSection) -> dict:
    if m.compute_dtype not in DTYPES:
        raise cfg.ConfigError(f"model.compute_dtype must be one of {sorted(DTYPES)}, not {m.compute_dtype!r}")
    if m.mining_backend not in mining.BACKENDS:
        raise cfg.ConfigError(f"model.mining_backend must be one of {mining.BACKENDS}, not {m.mining_backend!r}")
    out = dict(dtype=DTYPES[m.compute_dtype], param_dtype=jnp.float32, remat=m.remat,
               mining_backend=m.mining_backend)
    if m.release:
        from mgjax import releases
        out.update(releases.mgm_fields(m.release))
    return out if m.mining else {**out, "mining": False}


def build_model(m: ModelSection, mesh: jax.sharding.Mesh | None = None):
    """The model and its tokenizer, as the model section says; with a ``mesh``, born sharded."""
    from mgjax.pretrained import assemble, read_config
    over = _overrides(m)
    if m.init == "demo":  # through from_hf, so that dtype and remat reach every sub-model's config
        demo = demo_data.model_config()
        return mgjax.init(type(demo).from_hf(demo.to_hf(), **over), seed=0, mesh=mesh), demo_data.tokenizer()
    from transformers import AutoTokenizer
    if m.init == "pretrained":
        return mgjax.from_pretrained(m.path, mesh=mesh, **over), AutoTokenizer.from_pretrained(m.path)
    if m.init != "parts":
        raise cfg.ConfigError(f"model.init must be 'demo', 'pretrained' or 'parts', not {m.init!r}")
    if not (m.release and m.llm and m.vision and (m.vision_aux or not m.mining)):
        raise cfg.ConfigError("model.init 'parts' needs model.release, model.llm, model.vision and model.vision_aux")
    from mgjax import releases
    from mgjax.pretrained import model_class
    release = releases.config(m.release, **over)
    llm_hf = read_config(Path(m.llm))
    llm = model_class(llm_hf.get("model_type")).config_class.from_hf(llm_hf, **{k: over[k] for k in ("dtype",
                                                                                  "param_dtype", "remat")})
    config = dataclasses.replace(release, llm=llm)
    parts = {"language_model": m.llm, "vision_tower": m.vision, **({"vision_tower_aux": m.vision_aux}
                                                                   if config.mining else {})}
    return assemble(config, parts, mesh=mesh), AutoTokenizer.from_pretrained(m.llm)


def _data(c: RunConfig, out: Path) -> tuple[Path, Path, Path | None, Path]:
    """(train records, their image folder, held-out records or None, their image folder)."""
    if c.model.init == "demo" and not c.data.path:
        train, held_out = demo_data.write_dataset(out / "data")
        return train, train.parent, Path(c.eval.path) if c.eval.path else held_out, train.parent
    images = Path(c.data.image_folder or Path(c.data.path).parent)
    return (Path(c.data.path), images, Path(c.eval.path) if c.eval.path else None,
            Path(c.eval.image_folder) if c.eval.image_folder else images)


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


class SetupError(Exception):
    """Input a run cannot start from (or, for bad samples, go on with); the message names the file or sample."""


class Metrics:
    """Per-step metrics, recorded one step behind so fetching them never stalls the device: JSONL, TensorBoard
    events, a progress bar and a line every ``log_every`` steps (written by process 0 alone)."""

    def __init__(self, out: Path, c: RunConfig, steps: int, start: int, lr, step_flops, peak: float | None):
        """``step_flops(seq_len)``: a step's FLOPs by role (computed once per padded length)."""
        from tensorboardX import SummaryWriter
        from tqdm import tqdm
        self.c, self.steps, self.lr, self.peak = c, steps, lr, peak
        self.flops = functools.cache(step_flops)
        self.primary = jax.process_index() == 0
        self.log = open(out / "metrics.jsonl", "a") if self.primary else None
        self.tb = SummaryWriter(str(out / "tensorboard")) if self.primary else None
        self.bar = tqdm(total=steps, initial=start, disable=not (c.train.progress and self.primary), unit="step",
                        dynamic_ncols=True)
        self.losses: list[float] = []
        self.last_saved: int | None = None
        self.where = out / "checkpoints"

    def __call__(self, step_metrics, step: int, seconds: float, seq_len: int) -> None:
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(f"loss became {values['loss']} at step {step}; the last good checkpoint is "
                                     f"step {self.last_saved} in {self.where}")
        b, total = self.c.train.global_batch, self.flops(seq_len)["total"]
        values.update(step=step, lr=float(self.lr(step - 1)), tokens_per_s=b * seq_len / seconds,
                      samples_per_s=b / seconds, tflops_per_s=total / seconds / 1e12)
        if self.peak:
            values["mfu"] = total / seconds / (self.peak * jax.device_count())
        if self.primary:
            self.log.write(json.dumps(values) + "\n")
            for k, v in values.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, step)
        self.losses.append(values["loss"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", refresh=False)
        if self.primary and (step % self.c.train.log_every == 0 or step == self.steps):
            mfu = f"  MFU {values['mfu']:.1%}" if "mfu" in values else ""
            self.bar.write(f"step {step:5d}  loss {values['loss']:.4f}  grad {values['grad_norm']:.3f}  "
                           f"lr {values['lr']:.2e}  {values['tokens_per_s']:.0f} tok/s{mfu}")

    def close(self) -> None:
        self.bar.close()
        if self.primary:
            self.log.close()
            self.tb.close()


def _preflight(c: RunConfig, model, opt, step: ShardedStep, mesh: jax.sharding.Mesh, batch: dict) -> None:
    """Before step 1: refuse a mesh that leaves too much replicated and a step that does not fit in device memory;
    compile the step for the longest batch and print what it needs per device."""
    sizes = dict(mesh.shape)
    p = mesh_lib.placement(model, sizes)
    print(f"mesh {sizes} on {jax.device_count()} devices, {jax.process_count()} process(es): parameters "
          f"{p.per_device_bytes / 2**20:,.1f} MiB per device, {p.sharded_fraction:.2%} of "
          f"{p.total_bytes / 2**20:,.1f} MiB sharded")
    if sizes["fsdp"] * sizes["expert"] > 1 and p.sharded_fraction < c.mesh.min_sharded:
        raise SetupError(f"mesh {sizes} shards only {p.sharded_fraction:.2%} of the parameter bytes (mesh.min_sharded "
                         f"{c.mesh.min_sharded:.0%}); largest replicated: {', '.join(p.replicated[:3])}. Pick fsdp "
                         "and expert sizes that divide the model's widths, or lower mesh.min_sharded")
    longest = {k: jax.ShapeDtypeStruct((*v.shape[:-1], c.data.max_length) if k in loader.SEQUENCE_KEYS else v.shape,
                                       v.dtype, sharding=v.sharding) for k, v in batch.items()}
    use = memory(step.compile(model, opt, longest))
    limit = c.mesh.device_memory_gb * 2**30 or (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    print("compiled step, per device: " + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in use.items())
          + (f" (device limit {limit / 2**30:,.2f} GiB)" if limit else ""))
    if limit and use["peak"] > limit:
        raise SetupError(f"the compiled step needs {use['peak'] / 2**30:,.2f} GiB per device, more than the "
                         f"{limit / 2**30:,.2f} GiB there are: use more devices (mesh.fsdp), more "
                         "train.micro_batches, model.remat full, or model.compute_dtype bfloat16")


def _print_accuracy(results: dict[str, dict[str, dict]]) -> None:
    """One column per run: held-out accuracy by question type."""
    runs = list(results)
    kinds = sorted({k for r in results.values() for k in r})
    print("held-out accuracy (teacher-forced exact answer)")
    print(f"  {'type':10s}" + "".join(f"{r:>16s}" for r in runs))
    for k in kinds:
        cells = [results[r].get(k) for r in runs]
        print(f"  {k:10s}" + "".join(f"{x['accuracy']:10.1%} ({x['total']:3d})" if x else f"{'-':>16s}"
                                     for x in cells))


# ------------------------------------------------------------------------------------------------------------ run
def run(c: RunConfig, resume: bool) -> dict | None:
    """One training run (and its held-out evaluation); returns the evaluation, or None without one."""
    out = Path(c.train.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- mesh, model, data, optimizer
    try:  # bad input: one line naming the file
        mesh = mesh_lib.make_mesh(c.mesh)
        rows, shards = c.train.global_batch // c.train.micro_batches, mesh_lib.batch_shards(dict(mesh.shape))
        if rows % shards or rows % jax.process_count():
            raise SetupError(f"train.global_batch {c.train.global_batch} / train.micro_batches "
                             f"{c.train.micro_batches} = {rows} rows do not split over the batch's {shards} mesh "
                             f"shards {dict(mesh.shape)} and {jax.process_count()} process(es)")
        model, tok = build_model(c.model, mesh)
        train_path, images, eval_path, eval_images = _data(c, out)
        records = list(samples.read_records(train_path))
        make = samples.MGMSamples(model.config, tok, c.data.template, str(images), max_length=c.data.max_length,
                                  pad_to_square=c.data.pad_to_square, pad_id=tok.pad_token_id or 0)
        per_host = c.train.global_batch // jax.process_count()
        steps = c.train.steps or c.train.epochs * len(records) // c.train.global_batch
        # one epoch more than the steps need: skipped bad samples must not run the data out
        epochs = max(c.train.epochs, -(-steps * c.train.global_batch // max(len(records), 1)) + 1)
        report = samples.BadSamples(max_fraction=c.data.max_bad_fraction)
        lengths = ([loader.record_length(r, model.config.tokens_per_image) for r in records]
                   if c.data.group_by_length else None)
        batches = loader.Batches(records, make, batch=per_host, micro_batches=c.train.micro_batches,
                                 seed=c.data.seed, epochs=epochs, process_index=jax.process_index(),
                                 process_count=jax.process_count(), workers=c.data.workers, report=report,
                                 lengths=lengths, buckets=c.data.length_buckets)
        opt = make_optimizer(model, STAGES[c.train.stage], c.optim, steps, frozen=c.train.freeze)
        mesh_lib.shard(opt, mesh)
    except (ValueError, OSError) as e:
        raise SetupError(str(e)) from None
    # each process meets its own share of the data, so each reports its own bad samples
    bad_file = "bad_samples.json" if jax.process_index() == 0 else f"bad_samples.process{jax.process_index()}.json"
    ckpts = Checkpoints(out / "checkpoints", keep=c.checkpoint.keep)
    if ckpts.latest() is not None and not resume:
        raise SetupError(f"{out / 'checkpoints'} already holds step {ckpts.latest()}; pass --resume to continue "
                         "it, or set train.out_dir to a new directory")
    start = 0
    if resume and ckpts.latest() is not None:
        start, state = ckpts.restore(model, opt)
        batches.set_state(state)
        print(f"resumed from step {start}")
    peak = c.train.peak_tflops * 1e12 or flops.peak_flops()
    print(f"{optim.count_params(model):,} parameters, {optim.count_params(model, opt.wrt):,} trainable "
          f"({c.train.stage}); {steps} steps of {c.train.global_batch}; compute {c.model.compute_dtype}")
    step_fn = ShardedStep(model, opt, mesh)
    put = lambda local: mesh_lib.global_batch(mesh, {k: v for k, v in local.items() if k in INPUTS})  # noqa: E731
    try:
        first = next(batches)
    except samples.TooManyBadSamples as e:
        raise SetupError(str(e)) from None
    _preflight(c, model, opt, step_fn, mesh, put(first))
    feed = itertools.chain([first], batches)

    # ---------------------------------------------------------------- the loop (metrics fetched one step behind)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    metrics = Metrics(out, c, steps, start, optim.schedule(c.optim, steps),
                      lambda seq_len: flops.mgm_step_flops(model, opt.wrt, batch=c.train.global_batch,
                                                           seq_len=seq_len), peak)
    pending, tick, step = None, time.perf_counter(), start
    try:
        for step in range(start + 1, steps + 1):
            batch = put(next(feed))
            step_metrics = step_fn(model, opt, batch)
            now = time.perf_counter()
            if pending is not None:
                metrics(*pending)
            pending, tick = (step_metrics, step, now - tick, batch["input_ids"].shape[-1]), now
            if step % c.checkpoint.every == 0 or stop:
                metrics(*pending)  # never checkpoint past a non-finite loss
                pending = None
                ckpts.save(step, model, opt, batches.get_state())
                metrics.last_saved = step
            if stop:
                metrics.bar.write(f"{stop[0]}: saved step {step}; resume with --resume")
                break
        if pending is not None:
            metrics(*pending)
    except samples.TooManyBadSamples as e:
        raise SetupError(str(e)) from None
    finally:
        ckpts.wait()
        metrics.close()
        report.write(out / bad_file)

    # ---------------------------------------------------------------- outputs and held-out evaluation
    if metrics.losses and metrics.primary:
        _loss_png(out / "loss.png", metrics.losses)
    print(f"stopped at step {step}: {report.count} bad samples of {report.seen} (report: {out / bad_file})")
    if stop:
        return None
    mgjax.save_pretrained(model, out / "final")
    if jax.process_index() == 0:
        tok.save_pretrained(out / "final")
    print(f"model: {out / 'final'}")
    if eval_path is None or not c.eval.enabled:
        return None
    held_out = [r for r in samples.read_records(eval_path)]
    score = heldout.accuracy(model, held_out, dataclasses.replace(make, image_folder=str(eval_images)),
                             batch=c.eval.batch, mesh=mesh)
    if jax.process_index() == 0:
        (out / "eval.json").write_text(json.dumps(score, indent=2))
    return score


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mgjax.train", description=__doc__.split("\n\n")[0],
                                 epilog="config fields (set with --set key=value):\n  "
                                        + "\n  ".join(cfg.describe(RunConfig)),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="a YAML run config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in out_dir")
    args = ap.parse_args(argv)
    try:  # config errors, missing model or data files, unreadable JSON, too many bad samples: one line, exit 2
        c = cfg.load(RunConfig, args.config, args.set)
        try:
            distributed.initialize(c.distributed)
        except ValueError as e:
            raise cfg.ConfigError(str(e)) from None
        if c.train.stage not in STAGES:
            raise cfg.ConfigError(f"train.stage must be one of {sorted(STAGES)}, not {c.train.stage!r}")
        for pattern in c.train.freeze:
            try:
                re.compile(pattern)
            except re.error as e:
                raise cfg.ConfigError(f"train.freeze: {pattern!r} is not a regex: {e}") from None
        runs = {"mining": c}
        if c.eval.compare_lr_only:
            data, held_out = c.data, c.eval
            if c.model.init == "demo" and not c.data.path:  # the synthetic set the first run writes, not a copy
                root = Path(c.train.out_dir) / "data"
                data = dataclasses.replace(c.data, path=str(root / demo_data.TRAIN_FILE))
                held_out = dataclasses.replace(c.eval, path=c.eval.path or str(root / demo_data.EVAL_FILE))
            runs["lr_only"] = dataclasses.replace(
                c, model=dataclasses.replace(c.model, mining=False), data=data, eval=held_out,
                train=dataclasses.replace(c.train, out_dir=str(Path(c.train.out_dir) / "lr_only")))
        results = {}
        for name, run_config in runs.items():
            if len(runs) > 1:
                print(f"==== {name}: {run_config.train.out_dir}")
            score = run(run_config, args.resume)
            if score is not None:
                results[name] = score
    except (cfg.ConfigError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if results:
        _print_accuracy(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
