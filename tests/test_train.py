"""``python -m mgjax.train`` on the demo config: outputs, resume, config errors and a non-finite loss."""
import json

import jax.numpy as jnp

import mgjax
from mgjax import train

DEMO = "configs/demo.yaml"


def _run(tmp_path, *extra, steps=4):
    return train.main(["--config", DEMO, "--set", f"train.out_dir={tmp_path}", "--set", f"train.steps={steps}",
                       "--set", "train.global_batch=4", "--set", "checkpoint.every=2", *extra])


def test_demo_trains_writes_everything_and_resumes(tmp_path, capsys):
    assert _run(tmp_path) == 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all(k in lines[0] for k in ("loss", "grad_norm", "lr", "tokens_per_s", "samples_per_s"))
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert json.loads((tmp_path / "bad_samples.json").read_text())["skipped"] == 0
    model = mgjax.from_pretrained(tmp_path / "final", dtype=jnp.float32)
    assert model.config.tokens_per_image == 16
    assert _run(tmp_path, steps=6) == 2  # a finished run's directory is not silently overwritten
    assert "pass --resume" in capsys.readouterr().err
    assert _run(tmp_path, "--resume", steps=6) == 0
    assert "resumed from step 4" in capsys.readouterr().out
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_config_errors_exit_2(tmp_path, capsys):
    assert train.main(["--config", DEMO, "--set", "optim.learnig_rate=1"]) == 2
    assert "unknown key optim.learnig_rate" in capsys.readouterr().err
    assert train.main(["--config", DEMO, "--set", "train.stage=stage3"]) == 2
    missing = tmp_path / "nowhere.json"
    assert train.main(["--config", DEMO, "--set", f"data.path={missing}", "--set", f"train.out_dir={tmp_path}"]) == 2
    assert "nowhere.json" in capsys.readouterr().err


def test_a_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = train.train_step
    calls = []

    def flaky(model, opt, batch):
        calls.append(1)
        metrics = real(model, opt, batch)
        return {**metrics, "loss": jnp.float32("nan")} if len(calls) == 3 else metrics

    monkeypatch.setattr(train, "train_step", flaky)
    assert _run(tmp_path, steps=6) == 3
    err = capsys.readouterr().err
    assert "loss became nan at step 3; the last good checkpoint is step 2" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
