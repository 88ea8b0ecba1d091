"""Attention backends: splash (Pallas interpret mode on this CPU) against the einsum reference, forward and gradients,
for every mask the models use; the choice ``auto`` makes per platform and its fallbacks; splash compiled for TPUs by
XLA's TPU compiler, deviceless. (Training with splash on a mesh: tests/test_sharded_train.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mgjax.nn import attention
from mgjax.parallel import topology
from tests.helpers import max_abs

F32, BF16 = jnp.float32, jnp.bfloat16


def _qkv(b, t, h, kvh, d, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    shapes = ((b, t, h, d), (b, t, kvh, d), (b, t, kvh, d))
    return [jax.random.normal(k, s, F32).astype(dtype) for k, s in zip(keys, shapes)]


def _masks(b, t):
    lengths = jnp.asarray([[t], [t - 9]])
    valid = jnp.arange(t)[None] < lengths
    segments = (jnp.arange(t)[None] >= jnp.asarray([[t // 3], [t // 2]])).astype(jnp.int32)
    return {
        "causal": attention.Mask(causal=True),
        "causal_padded": attention.Mask(causal=True, key_valid=valid),
        "packed_window": attention.Mask(causal=True, window=24, segment_ids=segments, key_valid=valid),
        "bidirectional": attention.Mask(),
        "bidirectional_padded": attention.Mask(key_valid=valid),
    }


def _valid(mask, b, t):
    """Positions whose output means something (a padding query's output is never read)."""
    return jnp.ones((b, t), bool) if mask.key_valid is None else mask.key_valid


CASES = [  # (t, heads, kv heads, head_dim, mask): 77 like CLIP-B/32's tokens, not a multiple of 128
    (128, 4, 2, 32, "causal"),
    (128, 4, 4, 32, "causal_padded"),
    (256, 4, 1, 32, "packed_window"),
    (77, 2, 2, 64, "bidirectional"),
    (77, 2, 2, 64, "bidirectional_padded"),
]


@pytest.mark.parametrize("t, h, kvh, d, kind", CASES)
def test_splash_matches_the_reference_forward_and_gradients_in_float32(t, h, kvh, d, kind):
    b = 2
    q, k, v = _qkv(b, t, h, kvh, d, F32)
    mask = _masks(b, t)[kind]
    keep = _valid(mask, b, t)[:, :, None, None]

    def run(impl):
        f = lambda q, k, v: attention.attention(q, k, v, scale=d**-0.5, mask=mask, impl=impl)  # noqa: E731
        out = f(q, k, v)
        grads = jax.grad(lambda *a: jnp.sum(jnp.where(keep, f(*a), 0) ** 2), argnums=(0, 1, 2))(q, k, v)
        return out, grads

    (want, g_want), (got, g_got) = run("xla"), run("splash")
    assert max_abs(jnp.where(keep, got, 0), jnp.where(keep, want, 0)) <= 1e-5
    for a, g in zip(g_want, g_got):
        assert max_abs(g, a) <= 1e-5 * max(1.0, float(jnp.max(jnp.abs(a))))


def test_splash_matches_the_reference_in_bfloat16():
    b, t, h, kvh, d = 2, 256, 4, 2, 64
    q, k, v = _qkv(b, t, h, kvh, d, BF16, seed=1)
    mask = _masks(b, t)["packed_window"]
    keep = _valid(mask, b, t)[:, :, None, None]
    want = attention.attention(q, k, v, scale=d**-0.5, mask=mask, impl="xla").astype(F32)
    got = attention.attention(q, k, v, scale=d**-0.5, mask=mask, impl="splash").astype(F32)
    assert max_abs(jnp.where(keep, got, 0), jnp.where(keep, want, 0)) <= 2e-2


def test_auto_is_xla_on_cpu_and_splash_for_a_tpu():
    q, k, _ = _qkv(1, 128, 2, 2, 32, F32)
    assert attention.backend("auto", q, k, attention.Mask(causal=True)) == "xla"
    try:
        tpu = topology.devices("v5e-4")[0]
    except RuntimeError as e:
        pytest.skip(str(e))
    with topology.compiling_for(tpu):
        assert attention.backend("auto", q, k, attention.Mask(causal=True)) == "splash"


def test_a_kv_cache_falls_back_to_xla_saying_why(capsys):
    q, _, _ = _qkv(1, 1, 2, 2, 32, F32)
    _, k, _ = _qkv(1, 64, 2, 2, 32, F32)
    mask = attention.Mask(causal=True, offset=jnp.asarray(5))
    assert attention.backend("splash", q, k, mask) == "xla"
    assert attention.backend("cudnn", q, k, mask) == "xla"
    err = capsys.readouterr().err
    assert "splash cannot serve" in err and "a KV cache" in err and "cudnn cannot serve" in err


def test_unknown_backend_is_refused():
    q, k, _ = _qkv(1, 8, 2, 2, 8, F32)
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        attention.attention(q, k, k, scale=1.0, impl="flash")


def test_dense_mask_is_causal_window_segments_and_padding():
    seg = jnp.asarray([[1, 1, 2, 2, 2]])
    valid = jnp.asarray([[1, 1, 1, 1, 0]])
    dense = attention.Mask(causal=True, window=2, segment_ids=seg, key_valid=valid).dense(5, 5)[0, 0]
    want = np.array(
        [
            [1, 0, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 1, 1, 0],
            [0, 0, 0, 1, 0],
        ],
        bool,
    )
    np.testing.assert_array_equal(np.asarray(dense), want)


@pytest.mark.parametrize("gen", ["v4-8", "v5e-4", "v5p-8", "v6e-4"])
def test_splash_compiles_for_tpus_forward_and_backward(gen):
    """A decoder's causal GQA attention at head_dim 128 and a ViT's 577 bidirectional tokens at head_dim 64, batch
    split over 4 chips, compiled deviceless."""
    try:
        devs = topology.devices(gen)
    except RuntimeError as e:
        pytest.skip(str(e))
    m = Mesh(np.array(devs).reshape(4, 1), ("fsdp", "tensor"))
    for b, t, h, kvh, d, causal in ((4, 1024, 8, 2, 128, True), (4, 577, 4, 4, 64, False)):
        sh = NamedSharding(m, PartitionSpec("fsdp"))
        args = [jax.ShapeDtypeStruct((b, t, n, d), BF16, sharding=sh) for n in (h, kvh, kvh)]

        def loss(q, k, v):
            out = attention.attention(q, k, v, scale=d**-0.5, mask=attention.Mask(causal=causal), impl="splash")
            return jnp.sum(out.astype(F32))

        with jax.set_mesh(m), topology.compiling_for(devs[0]):
            compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
        hlo = compiled.as_text()
        assert "tpu_custom_call" in hlo  # the Mosaic kernel, not an XLA fallback
        # no [B, H, T, S] float32 scores: the largest temporary is far below one head's scores for the batch
        assert compiled.memory_analysis().temp_size_in_bytes < b * h * t * t * 4 / 4
