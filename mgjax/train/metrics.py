"""A run's per-step record, computed once and handed to separate sinks: ``metrics.jsonl`` (a line per step, flushed
as written), TensorBoard events, and the progress bar with a line every ``log_every`` steps; and the loss plot
drawn from ``metrics.jsonl``, so it covers every step of a resumed run.

A record holds ``loss``, ``grad_norm``, ``target_tokens`` (the supervised tokens the loss averages over), ``lr``
and the step's throughput: ``positions_per_s`` (padded positions, what the step computes), ``samples_per_s``,
``tflops_per_s`` and ``mfu`` where the chip's peak is known. The first step a process runs also waits for the
runtime's first dispatch of the compiled program; its record says ``includes_compile`` and carries no throughput.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Callable, Protocol

import jax
from PIL import Image, ImageDraw

THROUGHPUT = ("positions_per_s", "samples_per_s", "tflops_per_s", "mfu")


class Throughput:
    """A step's rates from its wall time: ``step_flops(seq_len)`` gives its FLOPs by role (cached per length)."""

    def __init__(self, batch: int, step_flops: Callable[[int], dict], peak: float | None, devices: int):
        self.batch, self.flops, self.peak, self.devices = batch, functools.cache(step_flops), peak, devices

    def __call__(self, seconds: float, seq_len: int) -> dict[str, float]:
        total = self.flops(seq_len)["total"]
        out = {
            "positions_per_s": self.batch * seq_len / seconds,
            "samples_per_s": self.batch / seconds,
            "tflops_per_s": total / seconds / 1e12,
        }
        if self.peak:
            out["mfu"] = total / seconds / (self.peak * self.devices)
        return out


class Sink(Protocol):
    def write(self, record: dict) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """``metrics.jsonl``: one line per step, flushed as written (a killed run keeps every step it recorded). A run
    resumed from step ``start`` keeps the lines up to it and drops later ones, which it is about to redo."""

    def __init__(self, path: Path, start: int):
        kept = [r for r in _records(path) if r["step"] <= start]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")

    def sync(self) -> None:
        """Onto the disk, not just the OS (called at each checkpoint: the rows up to it survive a power cut)."""
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()


class TensorBoardSink:
    def __init__(self, path: Path):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(str(path))

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, float):
                self.writer.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        self.writer.close()


class ProgressSink:
    """A progress bar (``bar``), and with ``lines`` a line every ``every`` steps and at ``last``."""

    def __init__(self, steps: int, start: int, every: int, *, bar: bool, lines: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=steps, initial=start, disable=not bar, unit="step", dynamic_ncols=True)
        self.every, self.last, self.lines = every, steps, lines

    def write(self, record: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
        step = record["step"]
        if self.lines and (step % self.every == 0 or step == self.last):
            rate = (
                f"  {record['positions_per_s']:.0f} positions/s"
                if "positions_per_s" in record
                else "  (includes the first dispatch)"
            )
            mfu = f"  MFU {record['mfu']:.1%}" if "mfu" in record else ""
            self.note(
                f"step {step:5d}  loss {record['loss']:.4f}  grad {record['grad_norm']:.3f}  "
                f"lr {record['lr']:.2e}{rate}{mfu}"
            )

    def note(self, text: str) -> None:
        self.bar.write(text)

    def close(self) -> None:
        self.bar.close()


class Metrics:
    """Turns a step's device metrics into its record and hands it to every sink. Called one step behind, so that
    fetching the metrics never stalls the device; a non-finite loss stops the run, naming the last checkpoint."""

    def __init__(self, sinks: list[Sink], lr: Callable[[int], float], throughput: Throughput, checkpoints: Path):
        self.sinks, self.lr, self.throughput, self.checkpoints = sinks, lr, throughput, checkpoints
        self.last_saved: int | None = None
        self.first = True

    def __call__(self, step_metrics: dict, step: int, seconds: float, seq_len: int) -> None:
        values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        if not math.isfinite(values["loss"]):
            raise FloatingPointError(
                f"loss became {values['loss']} at step {step}; the last good checkpoint is "
                f"step {self.last_saved} in {self.checkpoints}"
            )
        record = {
            "step": step,
            "loss": values["loss"],
            "grad_norm": values["grad_norm"],
            "target_tokens": int(values["tokens"]),
            "lr": float(self.lr(step - 1)),
        }
        if self.first:
            record["includes_compile"] = True
        else:
            record.update(self.throughput(seconds, seq_len))
        self.first = False
        for sink in self.sinks:
            sink.write(record)

    def sync(self) -> None:
        for sink in self.sinks:
            if hasattr(sink, "sync"):
                sink.sync()

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _records(path: Path) -> list[dict]:
    """The records of a JSONL file (none if it does not exist; a line cut short by a kill is dropped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def losses(path: Path) -> list[tuple[int, float]]:
    """(step, loss) of every record in a ``metrics.jsonl``."""
    return [(r["step"], r["loss"]) for r in _records(path)]


# ------------------------------------------------------------------------------------------------------ the plot
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi]."""
    span = max(hi - lo, 1e-9)
    raw = span / n
    unit = 10 ** math.floor(math.log10(raw))
    step = next(m * unit for m in (1, 2, 2.5, 5, 10) if m * unit >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def loss_plot(path: Path, curves: dict[str, list[tuple[int, float]]], title: str) -> None:
    """Loss against step, one line per curve, with axes, ticks, their labels and a legend (a PNG)."""
    w, h, left, right, top, bottom = 720, 420, 70, 20, 40, 55
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    points = [p for curve in curves.values() for p in curve]
    x0, x1 = min(s for s, _ in points), max(s for s, _ in points)
    y0, y1 = min(v for _, v in points), max(v for _, v in points)
    x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1e-6)
    sx = lambda s: left + (s - x0) / (x1 - x0) * (w - left - right)  # noqa: E731
    sy = lambda v: h - bottom - (v - y0) / (y1 - y0) * (h - top - bottom)  # noqa: E731
    draw.rectangle([left, top, w - right, h - bottom], outline="black")
    for t in _ticks(x0, x1):
        draw.line([(sx(t), h - bottom), (sx(t), h - bottom + 5)], fill="black")
        draw.text((sx(t) - 10, h - bottom + 8), f"{t:g}", fill="black")
    for t in _ticks(y0, y1):
        draw.line([(left - 5, sy(t)), (left, sy(t))], fill="black")
        draw.text((5, sy(t) - 6), f"{t:.3g}", fill="black")
    draw.text(((w - 20) // 2, h - 20), "step", fill="black")
    draw.text((5, top - 18), "loss", fill="black")
    draw.text((left + 120, 10), title, fill="black")
    for i, (name, curve) in enumerate(curves.items()):
        color = COLORS[i % len(COLORS)]
        if len(curve) > 1:
            draw.line([(sx(s), sy(v)) for s, v in curve], fill=color, width=2)
        y = top + 8 + 16 * i
        draw.line([(w - right - 150, y + 6), (w - right - 125, y + 6)], fill=color, width=3)
        draw.text((w - right - 118, y), f"{name}: {curve[-1][1]:.3f}", fill="black")
    img.save(path)
