"""The launchers in ``launch/``: ``--dry-run`` prints the exact commands, the real path hands the tool the same argv,
local.sh runs and stops its processes, and bad command lines fail with a message. gcloud, xpk, sbatch and srun are
stand-ins on PATH that print their argv, so nothing here needs a cloud or a cluster."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
BASH = shutil.which("bash")
TRAIN = ["python3", "-m", "mgjax.train"]
USER_ARGS = ["--config", "configs/x.yaml", "--set", "train.out_dir=runs/my run"]


def clean_env(**extra) -> dict[str, str]:
    # the test process's own JAX settings (conftest) must not leak into what the launchers are checked to set
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(extra)
    return env


def launch(script: str, *args: str, env: dict[str, str] | None = None, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BASH, str(LAUNCH / script), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env() if env is None else env,
        cwd=cwd,
    )


def dry_run(script: str, *args: str, **kw) -> list[list[str]]:
    r = launch(script, "--dry-run", *args, **kw)
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines()]


def stand_ins(bin_dir: Path, *names: str) -> Path:
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        tool = bin_dir / name
        tool.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
        tool.chmod(0o755)
    return bin_dir


def path_with(bin_dir: Path) -> dict[str, str]:
    return clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def local_set(processes: int, i: int, port: int = 12355) -> list[str]:
    return [
        "--set",
        "distributed.mode=explicit",
        "--set",
        f"distributed.coordinator=localhost:{port}",
        "--set",
        f"distributed.num_processes={processes}",
        "--set",
        f"distributed.process_id={i}",
    ]


def test_local_dry_run_cpu(tmp_path):
    lines = dry_run(
        "local.sh",
        "--processes",
        "2",
        "--devices-per-process",
        "4",
        "--port",
        "4321",
        "--log-dir",
        "logs dir",
        "--",
        *USER_ARGS,
        env=clean_env(XLA_FLAGS="--xla_dump_to=/tmp/x"),
        cwd=tmp_path,
    )
    xla_flags = "XLA_FLAGS=--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
    assert lines == [
        [
            "env",
            "JAX_PLATFORMS=cpu",
            xla_flags,
            *TRAIN,
            *USER_ARGS,
            *local_set(2, i, 4321),
            ">",
            f"logs dir/process_{i}.log",
            "2>&1",
        ]
        for i in range(2)
    ]
    assert not (tmp_path / "logs dir").exists()


def test_local_dry_run_gpus():
    lines = dry_run("local.sh", "--processes", "2", "--gpus-per-process", "2")
    assert lines == [
        [
            *TRAIN,
            *local_set(2, i),
            "--set",
            f"distributed.local_device_ids=[{2 * i},{2 * i + 1}]",
            ">",
            f"runs/launch_logs/process_{i}.log",
            "2>&1",
        ]
        for i in range(2)
    ]


# Stands in for mgjax.train: logs its argv and environment; the process named by FAIL_PROCESS exits 3 once the others
# are ready to be stopped (after ignoring SIGTERM if IGNORE_TERM is set), and the others sleep until stopped.
FAKE_TRAIN = """
import json, os, signal, sys, time
args = sys.argv[1:]
me = next(a for a in args if a.startswith("distributed.process_id=")).split("=")[1]
print(json.dumps({"args": args, "env": [os.environ.get("JAX_PLATFORMS"), os.environ.get("XLA_FLAGS")]}), flush=True)
fail = os.environ.get("FAIL_PROCESS")
if fail is None:
    sys.exit(0)
if me == fail:
    while not os.path.exists("ready"):
        time.sleep(0.05)
    print("fake_train: giving up", flush=True)
    sys.exit(3)
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
open("ready", "w").close()
time.sleep(60)
"""


def run_local(tmp_path: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    start = time.monotonic()
    r = launch(
        "local.sh",
        "--python",
        sys.executable,
        "--module",
        "fake_train",
        "--log-dir",
        str(tmp_path / "logs"),
        *args,
        env=clean_env(PYTHONPATH=str(tmp_path), **env),
        cwd=tmp_path,
    )
    return r, time.monotonic() - start


def test_local_runs_every_process(tmp_path):
    r, _ = run_local(tmp_path, "--processes", "2", "--devices-per-process", "3", "--port", "4321", "--", *USER_ARGS)
    assert r.returncode == 0, r.stderr
    for i in range(2):
        log = json.loads((tmp_path / "logs" / f"process_{i}.log").read_text())
        assert log == {
            "args": [*USER_ARGS, *local_set(2, i, 4321)],
            "env": ["cpu", "--xla_force_host_platform_device_count=3"],
        }


@pytest.mark.parametrize("ignore_term", [False, True])
def test_local_failure_stops_the_others(tmp_path, ignore_term):
    env = {"FAIL_PROCESS": "1", **({"IGNORE_TERM": "1"} if ignore_term else {})}
    r, seconds = run_local(tmp_path, "--processes", "2", "--grace", "1", **env)
    log = tmp_path / "logs" / "process_1.log"
    assert r.returncode == 3
    assert f"process 1 failed with exit status 3; its log: {log}" in r.stderr
    assert "fake_train: giving up" in r.stderr
    # process 0 would sleep 60 s: the launcher returns only after stopping it, by SIGKILL when it ignores SIGTERM
    if ignore_term:
        assert 1 <= seconds < 20, seconds
    else:
        assert seconds < 10, seconds


def test_tpu_vm_dry_run_and_remote_quoting(tmp_path):
    repo = tmp_path / "my repo"
    repo.mkdir()
    hostile = ["--set", "data.path=it's $HOME/a b", "--set", "x=[1, 2]*;`true`"]
    [argv] = dry_run(
        "tpu_vm.sh",
        "--tpu",
        "my-tpu",
        "--zone",
        "us-central2-b",
        "--project",
        "proj",
        "--repo-dir",
        str(repo),
        "--",
        *USER_ARGS,
        *hostile,
    )
    assert argv[:-1] == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "my-tpu",
        "--zone=us-central2-b",
        "--project=proj",
        "--worker=all",
    ]
    remote = argv[-1].removeprefix("--command=")
    expected = [*TRAIN, *USER_ARGS, *hostile, "--set", "distributed.mode=tpu"]
    assert shlex.split(remote) == ["cd", str(repo), "&&", *expected]
    # the worker's login shell parses it: a POSIX sh with a python3 that reports its argv stands in for it
    r = subprocess.run(
        ["sh", "-c", remote],
        capture_output=True,
        text=True,
        timeout=30,
        env=path_with(stand_ins(tmp_path / "bin", "python3")),
    )
    assert json.loads(r.stdout) == expected[1:]
    [argv] = dry_run("tpu_vm.sh", "--tpu=t", "--zone=z")
    assert argv == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "ssh",
        "t",
        "--zone=z",
        "--worker=all",
        "--command=cd mgjax && python3 -m mgjax.train --set distributed.mode=tpu",
    ]


@pytest.mark.parametrize(
    "slices, user, hint",
    [
        ("1", [], []),
        ("2", [], ["--set", "mesh.dcn_data=2"]),
        ("4", ["--set", "mesh.dcn_data=2"], []),
        ("4", ["--set=mesh.dcn_data=2"], []),
    ],
)
def test_xpk_dry_run(slices, user, hint):
    [argv] = dry_run(
        "xpk.sh",
        "--cluster",
        "c",
        "--tpu-type",
        "v5p-128",
        "--num-slices",
        slices,
        "--docker-image",
        "gcr.io/p/img:1",
        "--workload",
        "run-1",
        "--",
        *USER_ARGS,
        *user,
    )
    assert argv[:-1] == [
        "xpk",
        "workload",
        "create",
        "--cluster",
        "c",
        "--workload",
        "run-1",
        "--docker-image",
        "gcr.io/p/img:1",
        "--tpu-type=v5p-128",
        f"--num-slices={slices}",
        "--command",
    ]
    assert shlex.split(argv[-1]) == [*TRAIN, *USER_ARGS, *user, *hint, "--set", "distributed.mode=tpu"]


def test_xpk_default_name_project_zone():
    [argv] = dry_run(
        "xpk.sh", "--cluster", "c", "--tpu-type", "v5p-8", "--docker-image", "img", "--project", "p", "--zone", "z"
    )
    assert re.fullmatch(r"mgjax-\d{8}-\d{6}", argv[argv.index("--workload") + 1])
    assert argv[-4:] == ["--project=p", "--zone=z", "--command", "python3 -m mgjax.train --set distributed.mode=tpu"]


def test_slurm_dry_run():
    [argv] = dry_run(
        "slurm.sh",
        "--nodes",
        "2",
        "--partition",
        "gpu",
        "--time",
        "1:00:00",
        "--sbatch-option=--account=abc",
        "--",
        *USER_ARGS,
    )
    assert argv == [
        "sbatch",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=gpu",
        "--time=1:00:00",
        "--account=abc",
        str(LAUNCH / "slurm.sbatch"),
        *USER_ARGS,
    ]
    [argv] = dry_run("slurm.sh", "--nodes", "1", "--gpus-per-node", "4")
    assert argv == ["sbatch", "--nodes=1", "--ntasks-per-node=4", "--gpus-per-node=4", str(LAUNCH / "slurm.sbatch")]


def test_sbatch_script(tmp_path):
    script = LAUNCH / "slurm.sbatch"
    header = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert {"#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8"} <= set(header)
    assert not any("gpus-per-task" in line for line in header)
    r = subprocess.run(
        [BASH, str(script), *USER_ARGS],
        capture_output=True,
        text=True,
        timeout=30,
        env=path_with(stand_ins(tmp_path / "bin", "srun")),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == ["--kill-on-bad-exit=1", *TRAIN, *USER_ARGS, "--set", "distributed.mode=slurm"]


REMOTE = {
    "tpu_vm.sh": ("gcloud", ["--tpu", "t", "--zone", "z"]),
    "xpk.sh": ("xpk", ["--cluster", "c", "--tpu-type", "v5p-8", "--docker-image", "img", "--workload", "w"]),
    "slurm.sh": ("sbatch", ["--nodes", "2"]),
}


@pytest.mark.parametrize("script", REMOTE)
def test_real_path_runs_the_printed_command(tmp_path, script):
    tool, args = REMOTE[script]
    [printed] = dry_run(script, *args, "--", *USER_ARGS)
    r = launch(script, *args, "--", *USER_ARGS, env=path_with(stand_ins(tmp_path / "bin", tool)))
    assert r.returncode == 0, r.stderr
    assert [tool, *json.loads(r.stdout)] == printed


@pytest.mark.parametrize("script", [*REMOTE, "local.sh"])
def test_missing_tool(tmp_path, script):
    tool, args = REMOTE.get(script, ("python3", ["--processes", "2"]))
    empty = clean_env(PATH=str(tmp_path))
    r = launch(script, *args, env=empty)
    assert r.returncode == 127
    assert r.stdout == ""
    assert f"{script}: {tool} is not on PATH; install " in r.stderr
    assert "--dry-run" in r.stderr
    assert dry_run(script, *args, env=empty)


@pytest.mark.parametrize(
    "script, args, message",
    [
        ("local.sh", ["--processes", "2", "--bogus"], "unknown option --bogus"),
        ("tpu_vm.sh", ["--tpu", "t", "--zone", "z", "--workers=all"], "unknown option --workers"),
        ("xpk.sh", ["--cluster", "c", "--tpu-type", "v5p-8", "--docker-image", "i", "-x"], "unknown option -x"),
        ("slurm.sh", ["--nodes", "1", "--gpus", "8"], "unknown option --gpus"),
        ("slurm.sh", ["--nodes", "2", "configs/x.yaml"], "unexpected argument 'configs/x.yaml'"),
        ("local.sh", [], "--processes is required"),
        ("local.sh", ["--processes", "0"], "--processes must be an integer >= 1, not '0'"),
        ("local.sh", ["--processes", "2", "--port", "70000"], "--port must be an integer >= 1 and <= 65535"),
        (
            "local.sh",
            ["--processes", "2", "--devices-per-process", "2", "--gpus-per-process", "1"],
            "--devices-per-process (CPU) and --gpus-per-process (GPU) exclude each other",
        ),
        ("tpu_vm.sh", ["--tpu", "t"], "--zone is required"),
        ("tpu_vm.sh", ["--zone", "z", "--tpu"], "--tpu needs a value"),
        ("slurm.sh", ["--nodes", "2", "--sbatch-option"], "--sbatch-option needs an sbatch option"),
        ("xpk.sh", ["--cluster", "c", "--tpu-type", "v5p-8"], "--docker-image is required"),
        (
            "xpk.sh",
            ["--cluster", "c", "--tpu-type", "v5p-8", "--docker-image", "i", "--num-slices", "two"],
            "--num-slices must be an integer >= 1, not 'two'",
        ),
        ("slurm.sh", [], "--nodes is required"),
    ],
)
def test_bad_command_line(script, args, message):
    r = launch(script, *args, "--dry-run")
    assert r.returncode == 2
    assert r.stdout == ""
    assert f"{script}: {message}" in r.stderr
    assert f"run {script} --help for usage" in r.stderr


@pytest.mark.parametrize("script", ["local.sh", "tpu_vm.sh", "xpk.sh", "slurm.sh"])
def test_help(script):
    r = launch(script, "--help")
    assert r.returncode == 0
    assert r.stdout.startswith(f"usage: {script} ")
    assert "--dry-run" in r.stdout
