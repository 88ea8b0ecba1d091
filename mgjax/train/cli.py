"""Train an MGM or InternVL model: ``python -m mgjax.train --config configs/demo.yaml [--set key=value ...]
[--resume]``.

``--help`` lists every config field. ``model.family`` picks what the run does (``mgjax.train.families``): MGM's stages,
or Mini-InternVL's domain adaptation (full / frozen_vit / lora). The MGM demo config (``model.init: demo``) writes a
synthetic question-answering set, trains a tiny MGM on it on a CPU, evaluates it on held-out images and, with
``eval.compare_lr_only``, trains the same budget without the high-resolution branch and prints both side by side;
``configs/internvl/demo_general.yaml`` then ``demo.yaml`` train a tiny InternVL2 on general data and adapt it to a
synthetic grounding domain.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import jax

from mgjax import config as cfg
from mgjax.cli import HelpFormatter, compilation_cache
from mgjax.demo import mgm_task
from mgjax.parallel import distributed
from mgjax.train import families, run_dir
from mgjax.train.loop import SetupError, print_accuracy, run
from mgjax.train.metrics import loss_plot, losses
from mgjax.train.run_config import RunConfig
from mgjax.train.run_dir import RunDir


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m mgjax.train",
        description=__doc__.split("\n\n")[0],
        epilog="config fields (set with --set key=value):\n  " + "\n  ".join(cfg.describe(RunConfig)),
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--config", help="a YAML run config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--resume", action="store_true", help="continue from the newest checkpoint in out_dir (exit 2: none)"
    )
    ap.add_argument(
        "--resume-or-start",
        action="store_true",
        help="continue from the newest checkpoint, or start afresh when out_dir holds none (preemptible jobs)",
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="read and check the run config (fields, values, stage, freeze patterns), then exit",
    )
    args = ap.parse_args(argv)
    compilation_cache()
    try:  # config errors, missing model or data files, unreadable JSON, too many bad samples: one line, exit 2
        c = cfg.load(RunConfig, args.config, args.set)
        family = families.family(c.model.family)
        if c.train.stage not in family.stages:
            raise cfg.ConfigError(
                f"train.stage must be one of {sorted(family.stages)} for model.family "
                f"{c.model.family}, not {c.train.stage!r}"
            )
        for pattern in c.train.freeze:
            try:
                re.compile(pattern)
            except re.error as e:
                raise cfg.ConfigError(f"train.freeze: {pattern!r} is not a regex: {e}") from None
        if args.check:
            print(f"{args.config or 'defaults'}: a valid {c.model.family} run config (stage {c.train.stage})")
            return 0
        try:
            distributed.initialize(c.distributed)
        except ValueError as e:
            raise cfg.ConfigError(str(e)) from None
        runs = {"mining" if c.model.family == "mgm" else c.train.stage: c}
        if c.eval.compare_lr_only:
            if c.model.family != "mgm":
                raise cfg.ConfigError("eval.compare_lr_only compares MGM with and without mining (model.family mgm)")
            data, held_out = c.data, c.eval
            if c.model.init == "demo" and not c.data.path:  # the synthetic set the first run writes, not a copy
                root = RunDir(c.train.out_dir, c.train.local_dir).local / "data"
                data = dataclasses.replace(c.data, path=str(root / mgm_task.TRAIN_FILE))
                held_out = dataclasses.replace(c.eval, path=c.eval.path or str(root / mgm_task.EVAL_FILE))
            runs["lr_only"] = dataclasses.replace(
                c,
                model=dataclasses.replace(c.model, mining=False),
                data=data,
                eval=held_out,
                train=dataclasses.replace(
                    c.train,
                    out_dir=run_dir.join(c.train.out_dir, "lr_only"),
                    local_dir=c.train.local_dir and str(Path(c.train.local_dir) / "lr_only"),
                ),
            )
        results = {}
        for name, run_config in runs.items():
            if len(runs) > 1:
                print(f"==== {name}: {run_config.train.out_dir}")
            for when, score in run(
                run_config, args.resume or args.resume_or_start, or_start=args.resume_or_start
            ).items():
                results[name if when == "end" else f"{name} ({when})"] = score
        if len(runs) > 1 and jax.process_index() == 0:
            _comparison_plot(c, runs)
    except (cfg.ConfigError, SetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    if results:
        print_accuracy(family.eval_title, results)
    return 0


def _comparison_plot(c, runs: dict) -> None:
    """The runs' losses in one plot, ``comparison.png`` in the first run's directory."""
    where = {name: RunDir(r.train.out_dir, r.train.local_dir) for name, r in runs.items()}
    curves = {name: losses(w.local / "metrics.jsonl") for name, w in where.items()}
    if all(curves.values()):
        path = where[next(iter(runs))].local / "comparison.png"
        loss_plot(path, curves, f"{' vs '.join(runs)}: training loss")
        print(f"loss curves side by side: {path}")
        where[next(iter(runs))].push()
