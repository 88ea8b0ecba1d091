"""``python -m mgjax.train`` on the demo config: outputs, evaluation, resume, SIGKILL/SIGTERM, config errors and a
non-finite loss."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import mgjax
from mgjax import config as cfg
from mgjax.data import convert
from mgjax.demo import mgm_task
from mgjax.train import cli
from mgjax.train.run_config import RunConfig
from mgjax.train.step import ShardedStep

DEMO = "configs/demo.yaml"
SMALL = [
    "--set",
    "train.global_batch=4",
    "--set",
    "checkpoint.every=2",
    "--set",
    "eval.compare_lr_only=false",
    "--set",
    "train.progress=false",
]


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory) -> list[str]:
    """A small demo set written once for these runs (a demo run otherwise writes its 2,200 images first)."""
    root = tmp_path_factory.mktemp("demo_set")
    mgm_task.write_dataset(root, n_train=64, n_eval=20)
    return ["--set", f"data.path={root / mgm_task.TRAIN_FILE}", "--set", f"eval.path={root / mgm_task.EVAL_FILE}"]


def _run(tmp_path, *extra, steps=4):
    return cli.main(
        ["--config", DEMO, "--set", f"train.out_dir={tmp_path}", "--set", f"train.steps={steps}", *SMALL, *extra]
    )


def _metrics(path):
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def _same(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(jnp.array_equal, nnx.state(a), nnx.state(b))))


def test_demo_trains_writes_everything_evaluates_and_resumes(tmp_path, capsys, demo_set):
    assert _run(tmp_path, *demo_set, "--set", "eval.compare_lr_only=true") == 0
    lines = _metrics(tmp_path)
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    # the first step also waits for the program's first dispatch: marked, and without rates
    assert lines[0]["includes_compile"] and "positions_per_s" not in lines[0]
    rates = ("positions_per_s", "samples_per_s", "tflops_per_s")
    assert all(x[k] > 0 for x in lines[1:] for k in ("loss", "grad_norm", "lr", "target_tokens", *rates))
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "comparison.png").stat().st_size > 0
    resolved = cfg.load(RunConfig, tmp_path / "config.yaml")
    assert (resolved.train.steps, resolved.train.out_dir, resolved.eval.compare_lr_only) == (4, str(tmp_path), True)
    assert cfg.to_yaml(resolved) == (tmp_path / "config.yaml").read_text()
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tensorboard").iterdir())
    assert json.loads((tmp_path / "bad_samples.json").read_text())["skipped"] == 0
    score = json.loads((tmp_path / "eval.json").read_text())
    assert {k: v["total"] for k, v in score.items()} == {"color": 20, "count": 20, "word": 20}
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "lr_only" in out and "mining" in out
    lr_only = mgjax.from_pretrained(tmp_path / "lr_only" / "final", dtype=jnp.float32)
    assert not lr_only.config.mining and not hasattr(lr_only, "vision_tower_aux")
    model = mgjax.from_pretrained(tmp_path / "final", dtype=jnp.float32)
    assert model.config.tokens_per_image == 16 and model.config.mining
    start = mgjax.init(model.config, seed=0)  # the demo's initial weights: train.freeze kept the HR tower there
    assert _same(model.vision_tower_aux, start.vision_tower_aux) and not _same(model.vision_tower, start.vision_tower)
    assert _run(tmp_path, *demo_set, steps=6) == 2  # a finished run's directory is not silently overwritten
    assert "pass --resume" in capsys.readouterr().err
    assert _run(tmp_path, *demo_set, "--resume", steps=6) == 0
    assert "resumed from step 4" in capsys.readouterr().out
    assert [x["step"] for x in _metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]


def _spawn(out, steps, *extra):
    cmd = [
        sys.executable,
        "-m",
        "mgjax.train",
        "--config",
        DEMO,
        "--set",
        f"train.out_dir={out}",
        "--set",
        f"train.steps={steps}",
        *SMALL,
        "--set",
        "checkpoint.every=1",
        "--set",
        "eval.enabled=false",
        *extra,
    ]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}
    )


def _wait_for_step(out, step, proc, timeout=300):
    end = time.time() + timeout
    while time.time() < end and proc.poll() is None:
        if (out / "metrics.jsonl").exists() and len(_metrics(out)) >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout}s: {proc.stdout.read() if proc.poll() is not None else ''}")


def test_sigkill_then_resume_gives_the_uninterrupted_losses_exactly(tmp_path, demo_set):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert _spawn(whole, 8, *demo_set).wait() == 0
    proc = _spawn(cut, 8, *demo_set, "--resume-or-start")  # a preemptible job's command: no checkpoint yet, it starts
    _wait_for_step(cut, 4, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _spawn(cut, 8, *demo_set, "--resume-or-start").wait() == 0  # the same command resumes
    assert [x["step"] for x in _metrics(cut)] == list(range(1, 9))  # the killed run's rows, then the resumed ones
    assert [x["loss"] for x in _metrics(cut)] == [x["loss"] for x in _metrics(whole)]


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    proc = _spawn(tmp_path, 1000, "--set", "checkpoint.every=1000")  # the demo's own set, written first
    _wait_for_step(tmp_path, 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 2 and f"SIGTERM: saved step {saved[0]}" in out
    assert len(json.loads((tmp_path / "data" / mgm_task.TRAIN_FILE).read_text())) == 2000


def test_config_errors_exit_2(tmp_path, capsys):
    assert cli.main(["--config", DEMO, "--set", "optim.learnig_rate=1"]) == 2
    assert "unknown key optim.learnig_rate" in capsys.readouterr().err
    assert cli.main(["--config", DEMO, "--set", "train.stage=stage3"]) == 2
    assert cli.main(["--config", DEMO, "--set", "model.mining_backend=cuda", "--set", f"train.out_dir={tmp_path}"]) == 2
    assert "model.mining_backend must be one of" in capsys.readouterr().err
    assert cli.main(["--config", DEMO, "--set", "train.freeze=['vision_tower(']"]) == 2
    assert "train.freeze: 'vision_tower(' is not a regex" in capsys.readouterr().err
    assert cli.main(["--config", DEMO, "--set", "train.loss_chunk=-8", "--check"]) == 2
    assert "train.loss_chunk must be at least 0, not -8" in capsys.readouterr().err
    missing = tmp_path / "nowhere.json"
    assert cli.main(["--config", DEMO, "--set", f"data.path={missing}", "--set", f"train.out_dir={tmp_path}"]) == 2
    assert "nowhere.json" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("train.steps", "-5", "train.steps must be at least 0, not -5"),
        ("train.global_batch", "0", "train.global_batch must be at least 1, not 0"),
        ("train.global_batch", "-8", "train.global_batch must be at least 1, not -8"),
        ("train.micro_batches", "0", "train.micro_batches must be at least 1, not 0"),
        ("train.log_every", "0", "train.log_every must be at least 1, not 0"),
        ("checkpoint.every", "0", "checkpoint.every must be at least 1, not 0"),
        ("checkpoint.keep", "0", "checkpoint.keep must be at least 1, not 0"),
        ("optim.lr", ".nan", "optim.lr must be a finite number, not nan"),
        ("data.max_bad_fraction", "1.5", "data.max_bad_fraction must be at most 1, not 1.5"),
    ],
)
def test_out_of_range_settings_are_refused_before_anything_runs(capsys, key, value, message):
    """Issue 21: each of these ran (an untrained export, a ZeroDivisionError after compiling, a numpy error)."""
    assert cli.main(["--config", DEMO, "--set", f"{key}={value}"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_out_dir_and_resume_mistakes_are_refused_before_anything_is_built(tmp_path, capsys):
    """Issue 21: an out_dir that is a file was a traceback; --resume with no checkpoint silently started at step 0."""
    (tmp_path / "file").write_text("")
    assert cli.main(["--config", DEMO, "--set", f"train.out_dir={tmp_path / 'file'}"]) == 2
    assert f"train.out_dir {tmp_path / 'file'}: cannot write" in capsys.readouterr().err
    assert cli.main(["--config", DEMO, "--set", f"train.out_dir={tmp_path / 'new'}", "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume: no checkpoint under {tmp_path / 'new' / 'checkpoints'}" in err and "--resume-or-start" in err


def test_a_step_that_does_not_fit_in_device_memory_is_refused(tmp_path, capsys, demo_set):
    assert _run(tmp_path, *demo_set, "--set", "mesh.device_memory_gb=0.001") == 2
    err = capsys.readouterr().err
    assert "the compiled step needs" in err and "more than the 0.00 GiB there are" in err, err
    assert not (tmp_path / "metrics.jsonl").exists()


def test_a_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch, capsys, demo_set):
    real = ShardedStep.__call__
    calls = []

    def flaky(self, model, opt, batch):
        calls.append(1)
        metrics = real(self, model, opt, batch)
        return {**metrics, "loss": jnp.float32("nan")} if len(calls) == 3 else metrics

    monkeypatch.setattr(ShardedStep, "__call__", flaky)
    assert _run(tmp_path, *demo_set, steps=6) == 3
    err = capsys.readouterr().err
    assert "loss became nan at step 3; the last good checkpoint is step 2" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]


def test_every_kind_of_bad_sample_is_reported_and_training_goes_on(tmp_path):
    train_json, _ = mgm_task.write_dataset(tmp_path, n_train=14, n_eval=0)  # with 6 bad: 20 records, 5 batches
    good = json.loads(train_json.read_text())
    turns = good[0]["conversations"]
    bad = {  # id -> (record, the reason the report gives)
        "missing": ({**good[0], "image": "images/nowhere.png"}, "missing or corrupt image"),
        "corrupt": ({**good[0], "image": "broken.png"}, "missing or corrupt image"),
        "two-marks": (
            {**good[0], "conversations": [{**turns[0], "value": "<image> <image> " + turns[0]["value"]}, *turns[1:]]},
            "<image> count mismatch",
        ),
        "too-long": (
            {**good[0], "conversations": [{**turns[0], "value": turns[0]["value"] + " the" * 80}, *turns[1:]]},
            "over-length",
        ),
        "no-answer": ({**good[0], "conversations": turns[:1]}, "tokenization mismatch"),
    }
    (tmp_path / "broken.png").write_bytes(b"\x89PNG truncated")
    lines = [json.dumps(r) for r in good] + ["{not json"] + [json.dumps({**r, "id": k}) for k, (r, _) in bad.items()]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert (
        _run(out, "--set", f"data.path={tmp_path / 'data.jsonl'}", "--set", "data.max_bad_fraction=0.5", steps=4) == 0
    )
    assert [x["step"] for x in _metrics(out)] == [1, 2, 3, 4]  # 16 good samples: all of the first epoch was read
    report = json.loads((out / "bad_samples.json").read_text())["samples"]
    for name, (_, reason) in bad.items():
        assert any(s.startswith(f"{name}: ") for s in report[reason]), (name, report)
    assert any("data.jsonl:15" in s for s in report["unreadable JSON line"])
    # the same file as ArrayRecord shards (python -m mgjax.data.convert), stopped at step 2 and resumed: the same
    # losses, and the same report, whole (issue 21: a resume overwrote it with its own part)
    assert convert.main(["--data", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "shards")]) == 0
    sharded = tmp_path / "run_shards"
    sets = ["--set", f"data.path={tmp_path / 'shards'}", "--set", "checkpoint.every=2"]
    assert _run(sharded, *sets, "--set", "data.max_bad_fraction=0.5", steps=2) == 0
    assert _run(sharded, *sets, "--set", "data.max_bad_fraction=0.5", "--resume", steps=4) == 0
    assert [x["step"] for x in _metrics(sharded)] == [1, 2, 3, 4]  # no gaps, no repeats
    assert [x["loss"] for x in _metrics(sharded)] == [x["loss"] for x in _metrics(out)]
    whole, resumed = (json.loads((d / "bad_samples.json").read_text()) for d in (out, sharded))
    ids = lambda report: {r: [s.split(":")[0] for s in found] for r, found in report["samples"].items()}  # noqa: E731
    assert (resumed["seen"], resumed["by_reason"], ids(resumed)) == (whole["seen"], whole["by_reason"], ids(whole))
