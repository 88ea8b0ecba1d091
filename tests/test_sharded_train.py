"""Training on 8 simulated CPU devices: every mesh gives the single-device losses, with parameters and optimizer
state split as ``mgjax.mesh`` plans. The devices exist only in a fresh process (XLA reads the flag at start-up)."""
import json
import os
import subprocess
import sys
from pathlib import Path

MESHES = [dict(data=8, fsdp=1), dict(fsdp=8), dict(data=2, fsdp=4), dict(data=2, fsdp=2, tensor=2)]

WORKER = """
import json, sys
import jax
from flax import nnx
import mgjax
from mgjax import mesh, optim
from mgjax.train_step import make_optimizer, train_step
from tests.test_train_step import CONFIG, _batch

def run(sizes):
    model = mgjax.init(CONFIG, seed=0)
    m = mesh.make_mesh(mesh.MeshConfig(**sizes)) if sizes else None
    if m:
        mesh.shard(model, m)
    opt = make_optimizer(model, optim.MGM_STAGE2, optim.OptimConfig(lr=1e-3, warmup_ratio=0.0), 10)
    if m:
        mesh.shard(opt, m)
    held = held_bytes(model) if m else None
    losses = []
    for i in range(5):
        b = _batch(per=8, seed=i)
        if m:
            b = {k: jax.device_put(v, mesh.batch_sharding(m, v.ndim)) for k, v in b.items()}
        losses.append(float(train_step(model, opt, b)["loss"]))
    out = {"losses": losses}
    if m:
        moments = [x for x in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if x.ndim > 1]
        out.update(held=held, planned=mesh.placement(model, dict(m.shape)).per_device_bytes,
                   held_after=held_bytes(model),
                   split_moments=sum(not x.sharding.is_fully_replicated for x in moments), moments=len(moments))
    return out

def held_bytes(model):
    held = {}  # bytes of parameters each device holds, from the arrays themselves
    for x in jax.tree.leaves(nnx.state(model, nnx.Param)):
        for s in x.addressable_shards:
            held[s.device.id] = held.get(s.device.id, 0) + s.data.nbytes
    return max(held.values())

print(json.dumps({"single": run(None), **{json.dumps(s): run(s) for s in json.loads(sys.argv[1])}}))
"""


def test_every_mesh_gives_the_single_device_losses_and_the_planned_placement():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-c", WORKER, json.dumps(MESHES)], capture_output=True, text=True,
                         env=env, cwd=root, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    single = out.pop("single")["losses"]
    for sizes, got in out.items():
        assert max(abs(a - b) for a, b in zip(got["losses"], single)) < 1e-5, (sizes, got["losses"], single)
        assert got["held"] == got["planned"], sizes  # what mgjax.mesh.placement reports is what devices hold
        print("sharded train", sizes, "parameter bytes per device before/after 5 steps:", got["held"],
              got["held_after"])
        if json.loads(sizes).get("fsdp", 1) == 1:
            assert got["split_moments"] == 0, sizes  # pure data parallelism replicates
    fsdp = out[json.dumps(dict(fsdp=8))]
    assert fsdp["split_moments"] > 0.9 * fsdp["moments"]  # ZeRO: Adam's moments live in shards too
