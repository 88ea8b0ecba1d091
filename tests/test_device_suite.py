"""bench/device_suite.py, the script run when an accelerator is lent, on tiny shapes on this CPU: every part
runs, the JSON has its numbers, and the two training steps it times compute the same loss."""

import json
import os
import subprocess
import sys
from pathlib import Path


def test_smoke_run_writes_every_part(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "suite.json"
    # PyTorch's own kernels: its scalar ones (conftest's ATEN_CPU_CAPABILITY, for exact parity) cannot do bf16 matmuls
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    run = subprocess.run(
        [sys.executable, "bench/device_suite.py", "--smoke", "--out", str(out)],
        cwd=root,
        env={**env, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["smoke"] and r["environment"]["platform"] == "cpu"
    for batch in ("batch_1", "batch_8"):
        assert r["decode"][batch]["mgjax_tokens_per_s"] > 0 and r["decode"][batch]["ratio"] > 0
    assert r["mining"]["xla_forward_backward"]["bytes_per_s"] > 0 and r["mining"]["copy_bytes_per_s"] > 0
    step = r["train_step"]
    assert step["mgjax"]["tokens_per_s"] > 0 and step["pytorch"]["tokens_per_s"] > 0
    # same weights, same batch: bf16 on both sides
    assert abs(step["mgjax"]["first_loss"] - step["pytorch"]["first_loss"]) < 2e-2 * step["pytorch"]["first_loss"]
