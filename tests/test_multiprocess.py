"""Two processes on localhost (``launch/local.sh``) joined by ``jax.distributed`` (4 simulated CPU devices each)
train the demo model on one mesh (data across the two processes as across nodes, fsdp 4 within each) and
checkpoint; one process with 8 devices restores that checkpoint onto another mesh shape (fsdp 8) and takes the next
step with the loss the two-process run had. A mesh that leaves too much of the model whole is refused before
anything compiles."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from mgjax.demo import mgm_task

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    """mgjax.train's arguments."""
    return [
        "--config",
        "configs/demo.yaml",
        "--set",
        f"train.out_dir={out}",
        "--set",
        f"data.path={data / mgm_task.TRAIN_FILE}",
        "--set",
        f"eval.path={data / mgm_task.EVAL_FILE}",
        "--set",
        "train.steps=4",
        "--set",
        "checkpoint.every=3",
        "--set",
        "train.global_batch=8",
        "--set",
        "eval.compare_lr_only=false",
        "--set",
        "train.progress=false",
        *extra,
    ]


def _env(devices: int) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    if devices > 1:  # launch/local.sh adds each process's own count to the suite's flags (tests/conftest.py)
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return env


def _train(args: list[str], devices: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mgjax.train", *args],
        env=_env(devices),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def test_two_processes_train_save_and_restore_onto_one_process_with_another_mesh(tmp_path):
    data = tmp_path / "data"
    mgm_task.write_dataset(data, n_train=64, n_eval=16)
    two, one = tmp_path / "two", tmp_path / "one"
    launch = [
        "bash",
        "launch/local.sh",
        "--processes",
        "2",
        "--devices-per-process",
        "4",
        "--port",
        str(_free_port()),
        "--python",
        sys.executable,
        "--log-dir",
        str(tmp_path / "logs"),
        "--",
    ]
    run = subprocess.run(
        [*launch, *_args(data, two, "--set", "mesh.dcn_data=2", "--set", "mesh.fsdp=-1")],
        env=_env(1),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    logs = [(tmp_path / "logs" / f"process_{i}.log").read_text() for i in range(2)]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "mesh {'data': 2, 'fsdp': 4, 'tensor': 1, 'expert': 1} on 8 devices, 2 process(es)" in logs[0]
    assert sorted(x.name for x in (two / "checkpoints").iterdir() if x.name.isdigit()) == ["3"]
    assert (two / "final" / "model.safetensors").exists() and (two / "eval.json").exists()  # gathered, written once

    (one / "checkpoints").parent.mkdir()
    os.symlink(two / "checkpoints", one / "checkpoints")
    run = _train(_args(data, one, "--set", "mesh.fsdp=8", "--set", "eval.enabled=false", "--resume"), 8)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert "8 devices, 1 process(es)" in run.stdout and "resumed from step 3" in run.stdout
    a, b = _losses(two)[4], _losses(one)[4]
    print(f"step-4 loss: 2 processes, mesh (2, 4): {a!r}; restored on 1 process, mesh (1, 8): {b!r}")
    assert abs(a - b) < 1e-5, (a, b)


def test_a_mesh_leaving_parameters_whole_is_refused_before_compiling(tmp_path):
    data = tmp_path / "data"
    mgm_task.write_dataset(data, n_train=16, n_eval=0)
    # 7 devices: hardly any width of the model splits 7 ways
    run = _train(_args(data, tmp_path / "run", "--set", "train.global_batch=7"), 7)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-2000:]
    assert "shards only" in run.stderr and "mesh.min_sharded" in run.stderr and "compiled step" not in run.stdout
    uneven = _train(_args(data, tmp_path / "uneven"), 7)
    assert uneven.returncode == 2 and "8 rows do not split over the batch's 7 mesh shards" in uneven.stderr
