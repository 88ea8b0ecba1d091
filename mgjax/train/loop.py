"""One training run, from its config to ``final/``: the model, data and optimizer set up, the step compiled and
checked before step 1, the loop (metrics one step behind, checkpoints, SIGTERM), the export and the held-out
scores (``run``)."""

from __future__ import annotations

import itertools
import json
import signal
import time
from pathlib import Path

import jax
from flax import nnx

import mgjax
from mgjax import config as cfg
from mgjax.data import loader, samples
from mgjax.nn import params
from mgjax.parallel import mesh as mesh_lib
from mgjax.train import families, flops, optim, run_dir
from mgjax.train.checkpoint import CheckpointError, Checkpoints
from mgjax.train.metrics import JsonlSink, Metrics, ProgressSink, TensorBoardSink, Throughput, loss_plot, losses
from mgjax.train.run_config import RunConfig
from mgjax.train.run_dir import RunDir
from mgjax.train.step import ShardedStep, make_optimizer, memory


# ---------------------------------------------------------------------------------------------------------- setup
class SetupError(Exception):
    """Input a run cannot start from (or, for bad samples, go on with); the message names the file or sample."""


def _preflight(c: RunConfig, model, opt, step: ShardedStep, mesh: jax.sharding.Mesh, batch: dict, out: Path) -> None:
    """Before step 1: refuse a mesh that leaves too much replicated and a step that does not fit in device memory;
    compile the step for the longest batch and print what it needs per device (also into ``out/memory.json``,
    with the bytes of the parameters and of the optimizer state)."""
    sizes = dict(mesh.shape)
    p = mesh_lib.placement(model, sizes)
    print(
        f"mesh {sizes} on {jax.device_count()} devices, {jax.process_count()} process(es): parameters "
        f"{p.per_device_bytes / 2**20:,.1f} MiB per device, {p.sharded_fraction:.2%} of "
        f"{p.total_bytes / 2**20:,.1f} MiB sharded"
    )
    if sizes["fsdp"] * sizes["expert"] > 1 and p.sharded_fraction < c.mesh.min_sharded:
        raise SetupError(
            f"mesh {sizes} shards only {p.sharded_fraction:.2%} of the parameter bytes (mesh.min_sharded "
            f"{c.mesh.min_sharded:.0%}); largest replicated: {', '.join(p.replicated[:3])}. Pick fsdp "
            "and expert sizes that divide the model's widths, or lower mesh.min_sharded"
        )
    length = c.data.pack_length or c.data.max_length
    longest = {
        k: jax.ShapeDtypeStruct(
            (*v.shape[:-1], length) if k in loader.SEQUENCE_KEYS else v.shape, v.dtype, sharding=v.sharding
        )
        for k, v in batch.items()
    }
    use = memory(step.compile(model, opt, longest))
    limit = c.mesh.device_memory_gb * 2**30 or (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    print(
        "compiled step, per device: "
        + ", ".join(f"{k} {v / 2**20:,.1f} MiB" for k, v in use.items())
        + (f" (device limit {limit / 2**30:,.2f} GiB)" if limit else "")
    )
    if jax.process_index() == 0:
        state = {
            "parameter_bytes": p.total_bytes,
            "optimizer_bytes": sum(x.nbytes for x in jax.tree.leaves(nnx.state(opt, nnx.OptState))),
        }
        (out / "memory.json").write_text(json.dumps({"compiled_step_per_device": use, **state}, indent=2))
    if limit and use["peak"] > limit:
        raise SetupError(
            f"the compiled step needs {use['peak'] / 2**30:,.2f} GiB per device, more than the "
            f"{limit / 2**30:,.2f} GiB there are: use more devices (mesh.fsdp), more "
            "train.micro_batches, model.remat full, or model.compute_dtype bfloat16"
        )


def print_accuracy(title: str, results: dict[str, dict[str, dict]]) -> None:
    """One column per evaluation: held-out accuracy by question type."""
    runs = list(results)
    kinds = sorted({k for r in results.values() for k in r})
    print(title)
    print(f"  {'type':10s}" + "".join(f"{r:>18s}" for r in runs))
    for k in kinds:
        cells = [results[r].get(k) for r in runs]
        print(f"  {k:10s}" + "".join(f"{x['accuracy']:12.1%} ({x['total']:3d})" if x else f"{'-':>18s}" for x in cells))


# ------------------------------------------------------------------------------------------------------------ run
def _check_resume(where: RunDir, resume: bool, or_start: bool) -> None:
    """Refuse, before anything is built, to overwrite checkpoints without ``--resume`` or to "resume" from none."""
    probe = Checkpoints(where.checkpoints)
    latest = probe.latest()
    probe.close()
    if latest is not None and not resume:
        raise SetupError(
            f"{where.checkpoints} already holds step {latest}; pass --resume to continue "
            "it, or set train.out_dir to a new directory"
        )
    if resume and latest is None and not or_start:
        raise SetupError(
            f"--resume: no checkpoint under {where.checkpoints} to continue; --resume-or-start starts afresh "
            "when there is none"
        )


def run(c: RunConfig, resume: bool, or_start: bool = False) -> dict[str, dict]:
    """One training run; returns its held-out evaluations (``start`` with ``eval.at_start``, ``end``), or none.
    ``resume``: from the newest checkpoint, which must exist unless ``or_start`` (then a run without one starts)."""
    where = RunDir(c.train.out_dir, c.train.local_dir)
    out = where.local  # the run's records; checkpoints: where.checkpoints (out_dir itself, gs:// or not)
    try:
        if resume:
            where.pull()
        out.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:  # what this run resolved its files and --set to; --config reads it back
            (out / "config.yaml").write_text(cfg.to_yaml(c))
    except OSError as e:  # a file where the folder should be, no permission, a full disk
        raise SetupError(f"train.out_dir {c.train.out_dir}: cannot write {out} ({e.strerror or e})") from None
    _check_resume(where, resume, or_start)
    family = families.family(c.model.family)

    # ---------------------------------------------------------------- mesh, model, data, optimizer
    try:  # bad input: one line naming the file
        mesh = mesh_lib.make_mesh(c.mesh)
        rows, shards = c.train.global_batch // c.train.micro_batches, mesh_lib.batch_shards(dict(mesh.shape))
        if rows % shards or rows % jax.process_count():
            raise SetupError(
                f"train.global_batch {c.train.global_batch} / train.micro_batches "
                f"{c.train.micro_batches} = {rows} rows do not split over the batch's {shards} mesh "
                f"shards {dict(mesh.shape)} and {jax.process_count()} process(es)"
            )
        model, tok = family.build(c.model, mesh)
        data = family.data(c, model, tok, out)
        per_host = c.train.global_batch // jax.process_count()
        steps = c.train.steps or c.train.epochs * len(data.records) // c.train.global_batch
        # one epoch more than the steps need: skipped bad samples must not run the data out
        epochs = max(c.train.epochs, -(-steps * c.train.global_batch // max(len(data.records), 1)) + 1)
        report = samples.BadSamples(max_fraction=c.data.max_bad_fraction)
        batches = loader.Batches(
            data.records,
            data.make,
            batch=per_host,
            micro_batches=c.train.micro_batches,
            seed=c.data.seed,
            epochs=epochs,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            workers=c.data.workers,
            report=report,
            lengths=data.lengths,
            buckets=c.data.length_buckets,
            pack=data.pack,
        )
        trainable, frozen = family.trainable(c, model, mesh)
        opt = make_optimizer(model, trainable, c.optim, steps, frozen=frozen)
        mesh_lib.shard(opt, mesh)
        step_fn = ShardedStep(model, opt, mesh, c.train.loss_weighting, c.train.loss_chunk)
    except (ValueError, OSError) as e:
        raise SetupError(str(e)) from None
    # each process meets its own share of the data, so each reports its own bad samples
    bad_file = "bad_samples.json" if jax.process_index() == 0 else f"bad_samples.process{jax.process_index()}.json"
    ckpts = Checkpoints(where.checkpoints, keep=c.checkpoint.keep)
    scores, start = {}, 0
    if resume and ckpts.latest() is not None:
        try:
            start, state = ckpts.restore(model, opt)
        except CheckpointError as e:
            raise SetupError(str(e)) from None
        batches.set_state(state)
        print(f"resumed from step {start}")
    elif c.eval.at_start and data.eval_records is not None:
        scores["start"] = family.evaluate(c, model, tok, data, mesh, out)
    peak = c.train.peak_tflops * 1e12 or flops.peak_flops()
    print(
        f"{params.count_params(model):,} parameters, {params.count_params(model, opt.wrt):,} trainable "
        f"({c.train.stage}); {steps} steps of {c.train.global_batch}; compute {c.model.compute_dtype}"
    )
    inputs = family.inputs(c)
    put = lambda local: mesh_lib.global_batch(mesh, {k: v for k, v in local.items() if k in inputs})  # noqa: E731
    try:
        first = next(batches)
    except samples.TooManyBadSamples as e:
        raise SetupError(str(e)) from None
    _preflight(c, model, opt, step_fn, mesh, put(first), out)
    feed = itertools.chain([first], batches)

    # ---------------------------------------------------------------- the loop (metrics fetched one step behind)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append("SIGTERM"))
    primary = jax.process_index() == 0
    progress = ProgressSink(steps, start, c.train.log_every, bar=c.train.progress and primary, lines=primary)
    files = [JsonlSink(out / "metrics.jsonl", start), TensorBoardSink(out / "tensorboard")] if primary else []
    throughput = Throughput(c.train.global_batch, family.step_flops(c, model, opt.wrt), peak, jax.device_count())
    metrics = Metrics([progress, *files], optim.schedule(c.optim, steps), throughput, where.checkpoints)
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
                metrics.sync()
                report.write(out / bad_file)  # as of this checkpoint, which carries the tally for a resume
                where.push()
            if stop:
                progress.note(f"{stop[0]}: saved step {step}; resume with --resume")
                break
        if pending is not None:
            metrics(*pending)
    except samples.TooManyBadSamples as e:
        raise SetupError(str(e)) from None
    finally:
        ckpts.wait()
        metrics.close()
        report.write(out / bad_file)
        where.push()

    # ---------------------------------------------------------------- outputs and held-out evaluation
    if primary and (curve := losses(out / "metrics.jsonl")):
        loss_plot(out / "loss.png", {"loss": curve}, f"{c.model.release or c.model.init} {c.train.stage}: {out}")
    print(f"stopped at step {step}: {report.count} bad samples of {report.seen} (report: {out / bad_file})")
    if stop:
        where.push()
        return {}
    family.export(c, model)
    mgjax.save_pretrained(model, out / "final")
    if jax.process_index() == 0:
        tok.save_pretrained(out / "final")
    where.push()
    print(f"model: {run_dir.join(c.train.out_dir, 'final')}")
    if data.eval_records is None:
        return scores
    scores["end"] = family.evaluate(c, model, tok, data, mesh, out)
    if jax.process_index() == 0:
        (out / "eval.json").write_text(json.dumps(scores if "start" in scores else scores["end"], indent=2))
    where.push()
    return scores
