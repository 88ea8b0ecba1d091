"""The Pallas mining kernel against the jnp reference, on CPU: in Pallas's interpreter and in its TPU simulator
(two simulated TensorCores, race detection on), forward and gradients, ragged token counts, every window size
MGM's resolutions give, float32 and bfloat16, and under shard_map on 4 simulated devices."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.pallas.mosaic.interpret import interpret_pallas_call as tpu_interpreter
from jax.experimental.pallas import tpu as pltpu

from mgjax.kernels import mining_attention
from mgjax.models import mining
from mgjax.parallel import topology

# bfloat16 is compared relative to the magnitude: one bf16 ulp at |x| in [2, 4) is 1.6e-2 already
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _inputs(m: int, c: int, tokens: int, dtype, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(1, tokens, c), (1, m * m, tokens, c), (1, m * m, tokens, c), (1, tokens, c)]
    return [jnp.asarray(rng.normal(size=s), dtype) for s in shapes]


def _close(got, want, dtype) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    err = float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))))
    assert err <= TOLERANCE[dtype], err
    return err


def _simulator():
    return pltpu.InterpretParams(detect_races=True, num_cores_or_threads=2)


@pytest.mark.parametrize("m, c, tokens", [(2, 128, 37), (3, 128, 50), (4, 128, 33), (8, 128, 21), (2, 1024, 40)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("mode", ["interpret", "tpu_simulator"])
def test_kernel_matches_the_reference_forward_and_backward(m, c, tokens, dtype, mode):
    q, k, v, do = _inputs(m, c, tokens, dtype)
    interpret = True if mode == "interpret" else _simulator()
    # blocks of 16 tokens (on a TPU they are 128 or more; the interpreters take any): every case has several, the
    # last one ragged; two or more chunks of slots, so both phases of each kernel cross chunk boundaries
    assert tokens > 16 and tokens % 16
    blocks = mining_attention.Blocks(
        tokens=16, slots=max(d for d in (1, 2, 3, 4) if m * m % d == 0 and d < m * m), vmem_limit=16 << 20
    )
    out, back = jax.vjp(lambda q, k, v: mining_attention.attention(q, k, v, blocks, interpret), q, k, v)
    want, want_back = jax.vjp(mining.reference, q, k, v)
    errors = [_close(out, want, dtype)] + [_close(g, w, dtype) for g, w in zip(back(do), want_back(do))]
    print(
        f"[kernel] M={m} C={c} T={tokens} {jnp.dtype(dtype).name} {mode}: max rel err out/dq/dk/dv "
        + " ".join(f"{e:.1e}" for e in errors)
    )
    if mode == "tpu_simulator":
        assert not tpu_interpreter.races.races_found


def test_blocks_fit_every_generations_vmem():
    for gen in topology.GENERATIONS.values():
        vmem = gen.vmem_mib << 20
        for w in (4, 9, 16, 64):
            for itemsize in (2, 4):
                for tokens in (16, 576, 2880):
                    b = mining_attention.blocks(w, 1024, itemsize, vmem, tokens)
                    assert b is not None and w % b.slots == 0 and b.slots <= mining_attention.MAX_SLOTS
                    assert b.tokens == tokens or b.tokens % 128 == 0
                    assert mining_attention.vmem_need(b.tokens, b.slots, 1024, itemsize) <= vmem * 3 // 4


def test_auto_falls_back_to_the_reference_where_no_block_fits(capsys):
    q, k, v, _ = _inputs(12, 8, 4, jnp.float32)  # W = 144 slots: more than a tile's lanes
    with topology.compiling_for(SimpleNamespace(platform="tpu", device_kind="TPU v5 lite")):
        out = mining.local_window_attention(q, k, v, backend="auto")
        with pytest.raises(ValueError, match="no kernel block of 144 slots"):
            mining.local_window_attention(q, k, v, backend="pallas")
    np.testing.assert_array_equal(out, mining.reference(q, k, v))
    assert "using the XLA reference" in capsys.readouterr().err


def test_unknown_backend_is_an_error():
    q, k, v, _ = _inputs(2, 8, 4, jnp.float32)
    with pytest.raises(ValueError, match="mining backend must be one of"):
        mining.local_window_attention(q, k, v, backend="triton")


WORKER = """
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from mgjax.models import mining
mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
rng = np.random.default_rng(0)
q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in [(8, 9, 64), (8, 16, 9, 64), (8, 16, 9, 64)])
def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))
kernel = lambda q, k, v: mining.local_window_attention(q, k, v, backend="pallas", interpret=True)
sharded = jax.shard_map(kernel, mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P("data"), check_vma=False)
put = lambda x: jax.device_put(x, jax.NamedSharding(mesh, P("data")))
got = jax.jit(jax.value_and_grad(loss(sharded), argnums=(0, 1, 2)))(put(q), put(k), put(v))
want = jax.value_and_grad(loss(mining.reference), argnums=(0, 1, 2))(q, k, v)
errs = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want))]
print(json.dumps({"errors": errs, "sharded": [str(x.sharding.spec) for x in jax.tree.leaves(got[1])]}))
"""


def test_under_shard_map_on_four_devices_with_gradients():
    root = Path(__file__).resolve().parents[1]
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"  # the suite's, and 4 devices
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert max(out["errors"]) < 1e-5, out
    assert all("data" in s for s in out["sharded"]), out  # gradients stay split like the tokens
