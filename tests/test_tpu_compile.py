"""XLA's own TPU compiler (libtpu, from the test extra) compiles mgjax for v4, v5e, v5p and v6e slices from this
CPU machine, deviceless, as MaxText's train_compile.py checks a pod configuration: the mining kernel forward and
backward at MGM's width for every window size, tiny MGM and InternVL2 training steps on 4-chip FSDP and
FSDP x tensor meshes, the decode step and the serving engine's step. Nothing runs; what is checked is that TPU
programs are produced and what the compiler says about their memory."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import mgjax
from mgjax.inference import decoding, engine
from mgjax.kernels import mining_attention
from mgjax.models import mining
from mgjax.models.clip import CLIPVisionConfig
from mgjax.models.convnext import ConvNextConfig
from mgjax.nn import quant
from mgjax.parallel import mesh, topology
from mgjax.recipes import adapt
from mgjax.train import optim
from mgjax.train.step import ShardedStep, make_optimizer, memory
from tests.helpers import TINY_INTERNVL, TINY_MGM, tiny_internvl_batch, tiny_mgm_batch

SLICES = {"v4": "v4-8", "v5e": "v5e-4", "v5p": "v5p-8", "v6e": "v6e-4"}  # four chips each


def devices(name: str):
    try:
        return topology.devices(name)
    except RuntimeError as e:  # only where libtpu cannot load (it is in the test extra)
        pytest.skip(str(e))


def _replicated(tree, m):
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(m, PartitionSpec())), tree
    )


def _cases(default, everything):
    """``default`` in the default run, the rest of ``everything`` slow (a kernel pair compiles in 2-6 s here, a
    tiny model's whole step in 15-40 s)."""
    return [c if c in default else pytest.param(*c, marks=pytest.mark.slow) for c in everything]


F32, BF16 = jnp.float32, jnp.bfloat16


@pytest.mark.parametrize(
    "gen, m, dtype",
    _cases(  # M=8: MGM's windows; M=3: W=9, no power of two
        [(g, m, d) for g in SLICES for m in (3, 8) for d in (F32, BF16)],
        [(g, m, d) for g in SLICES for m in (2, 3, 4, 8) for d in (F32, BF16)],
    ),
)
def test_mining_kernel_compiles_with_no_temporaries_around_it(gen, m, dtype):
    """Forward and backward (the vjp, the forward's output returned too) of 4 images of MGM's 576 tokens at
    C=1024, with the blocks ``mining`` picks for the chip: XLA adds at most 1% of the operands' bytes."""
    dev = devices(SLICES[gen])[0]
    q = jax.ShapeDtypeStruct(
        (4, 576, 1024), dtype, sharding=NamedSharding(jax.sharding.Mesh([dev], ("x",)), PartitionSpec())
    )
    k = jax.ShapeDtypeStruct((4, m * m, 576, 1024), dtype, sharding=q.sharding)
    b = mining.kernel_blocks(k.shape, dtype, dev)

    def both(q, k, v, do):
        out, pullback = jax.vjp(lambda q, k, v: mining_attention.attention(q, k, v, b, False), q, k, v)
        return out, pullback(do)

    operands = sum(x.size * x.dtype.itemsize for x in (q, k, k, q))
    for name, fn, args in (
        ("forward", lambda q, k, v: mining_attention.attention(q, k, v, b, False), (q, k, k)),
        ("backward", both, (q, k, k, q)),
    ):
        compiled = jax.jit(fn).lower(*args).compile()
        temporaries = compiled.memory_analysis().temp_size_in_bytes
        print(
            f"[tpu] {gen} M={m} {jnp.dtype(dtype).name} {name}: {b}, temporaries {temporaries / 2**20:.2f} MiB "
            f"({temporaries / operands:.3%} of {operands / 2**20:.0f} MiB operands)"
        )
        assert "tpu_custom_call" in compiled.as_text()
        assert temporaries <= 0.01 * operands


def _train_step_memory(config, sizes, slice_name, patterns, frozen=()):
    m = mesh.make_mesh(mesh.MeshConfig(**sizes), devices(slice_name))

    def build():
        model = mgjax.init(config, seed=0)
        return model, make_optimizer(model, patterns, optim.OptimConfig(lr=1e-3), 10, frozen=frozen)

    model, opt = nnx.eval_shape(build)
    return ShardedStep(model, opt, m), model, opt, m


def _mgm_batch(m, micro=2):
    batch = tiny_mgm_batch(micro=micro, per=8)
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=mesh.batch_sharding(m, v.ndim)) for k, v in batch.items()
    }


FSDP, FSDP_TENSOR = dict(fsdp=4), dict(fsdp=2, tensor=2)


@pytest.mark.parametrize(
    "gen, sizes",
    _cases(
        [("v5e", FSDP_TENSOR), ("v5p", FSDP)],  # v4 and v6e (16-28 s each) in the slow run
        [(g, s) for g in SLICES for s in (FSDP, FSDP_TENSOR)],
    ),
)
def test_tiny_mgm_train_step_compiles(gen, sizes):
    """The kernel is what ``auto`` picks there, per batch shard; parameters and optimizer state split over the
    four chips as ``mgjax.parallel.mesh`` plans."""
    step, model, opt, m = _train_step_memory(TINY_MGM, sizes, SLICES[gen], optim.MGM_STAGE2)
    batch = _mgm_batch(m)
    compiled = step.compile(model, opt, batch)
    hlo = compiled.as_text()
    assert "tpu_custom_call" in hlo  # the mining kernel, compiled by Mosaic
    rows, length = batch["input_ids"].shape[1:]
    vocab = TINY_MGM.llm.vocab_size
    # no chip computes the whole batch's logits (sharding.constrain_batch)
    assert f"f32[{rows},{length},{vocab}]" not in hlo
    print(f"[tpu] tiny MGM step {gen} {sizes}: " + ", ".join(f"{k} {v:,}" for k, v in memory(compiled).items()))
    specs = [s.spec for s in jax.tree.leaves(compiled.input_shardings[0][0])]
    for axis, n in sizes.items():  # the state arrives split over every mesh axis the rules map parameters to
        assert any(axis in str(spec) for spec in specs), (axis, n)


def test_towers_run_on_each_chips_rows_only():
    """Towers whose weights outweigh a few rows of activations (as CLIP-L's and ConvNeXt-L's do at MGM's batch):
    every chip runs its own 2 of the 8 rows through CLIP (17 tokens) and ConvNeXt (16x16, 8x8 maps). Without
    ``sharding.constrain_batch`` at layer boundaries and the gathered conv kernels, XLA ran all 8 rows on every
    chip, split over channels or heads (f32[8,17,128], f32[8,8,8,64])."""
    config = dataclasses.replace(
        TINY_MGM,
        vision=CLIPVisionConfig(
            hidden_size=512,
            intermediate_size=2048,
            num_hidden_layers=2,
            num_attention_heads=8,
            image_size=28,
            patch_size=7,
        ),
        vision_aux=ConvNextConfig(hidden_sizes=(128, 256, 384, 512), depths=(1, 1, 1, 1), final_norm=False),
    )
    step, model, opt, m = _train_step_memory(config, FSDP, SLICES["v5p"], optim.MGM_STAGE2)
    batch = _mgm_batch(m)
    assert batch["images"].shape[1] == 8
    hlo = step.compile(model, opt, batch).as_text()
    whole_batch = sorted(set(re.findall(r"(?:bf16|f32)\[8,(?:17|16,16|8,8|4,4),\d+\]", hlo)))
    assert not whole_batch, whole_batch
    assert "f32[2,17,512]" in hlo and "f32[2,16,16,128]" in hlo  # the rows each chip has


@pytest.mark.parametrize(
    "gen, mode",
    _cases([*((g, "lora") for g in SLICES), ("v5p", "full")], [(g, m) for g in SLICES for m in ("full", "lora")]),
)
def test_tiny_internvl_train_step_compiles(gen, mode):
    c = TINY_INTERNVL

    def build():
        model = mgjax.init(c, seed=0)
        plan = adapt.prepare(model, mode, rank=4, alpha=8.0)
        return model, make_optimizer(model, plan.trainable, optim.OptimConfig(lr=1e-3), 10, frozen=plan.frozen)

    m = mesh.make_mesh(mesh.MeshConfig(fsdp=4), devices(SLICES[gen]))
    model, opt = nnx.eval_shape(build)
    batch = tiny_internvl_batch(rows=4)
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=mesh.batch_sharding(m, v.ndim)) for k, v in batch.items()
    }
    used = memory(ShardedStep(model, opt, m).compile(model, opt, batch))
    print(f"[tpu] tiny InternVL2 {mode} step {gen}: " + ", ".join(f"{k} {v:,}" for k, v in used.items()))
    assert used["peak"] > 0


def _tiny_llm_on_one_chip(gen: str):
    """The tiny MGM's LLM, abstract, and a one-chip mesh of the slice ``gen``."""
    m = jax.sharding.Mesh(np.asarray(devices(SLICES[gen])[:1]), ("x",))
    model = nnx.eval_shape(lambda: mgjax.init(TINY_MGM.llm, seed=0))
    return model, m


def _check_cache_donated(name: str, gen: str, compiled, cache) -> None:
    used = memory(compiled)
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    print(f"[tpu] {name} {gen}: " + ", ".join(f"{k} {v:,}" for k, v in used.items()))
    assert used["aliased"] >= cache_bytes  # the KV cache is donated: updated in place, not copied


@pytest.mark.parametrize("gen", SLICES)
def test_decode_step_compiles_updating_the_cache_in_place(gen):
    model, m = _tiny_llm_on_one_chip(gen)
    graphdef, state = nnx.split(model)
    cache = jax.eval_shape(lambda: model.init_cache(2, 32))
    token = jax.ShapeDtypeStruct((2,), jnp.int32)
    mask = jax.ShapeDtypeStruct((2, 32), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.key(0))
    state, token, cache, mask, key = _replicated((state, token, cache, mask, key), m)
    compiled = decoding._step.lower(graphdef, state, token, cache, mask, decoding.Sampling(), key).compile()
    _check_cache_donated("decode step", gen, compiled, cache)


@pytest.mark.parametrize("scheme", [None, "int8", "int4"])
@pytest.mark.parametrize("gen", SLICES)
def test_serving_engine_step_compiles_updating_the_cache_in_place(gen, scheme):
    """Continuous batching's step: each row at its own cache index, with its own sampling settings; with the LLM's
    weights in float, int8 or packed int4 (``--quant``)."""
    model, m = _tiny_llm_on_one_chip(gen)
    if scheme:
        quant.quantize(model, scheme)
    graphdef, state = nnx.split(model)
    rows = 4
    cache = jax.eval_shape(lambda: model.init_cache(rows, 64)._replace(index=jnp.zeros((rows,), jnp.int32)))
    mask = jax.ShapeDtypeStruct((rows, 64), jnp.int32)
    token, top_k = (jax.ShapeDtypeStruct((rows,), jnp.int32) for _ in "tk")
    temperature, top_p = (jax.ShapeDtypeStruct((rows,), jnp.float32) for _ in "tp")
    keys = jax.ShapeDtypeStruct((rows, 2), jnp.uint32)
    args = _replicated((state, cache, mask, token, temperature, top_k, top_p, keys), m)
    _check_cache_donated(
        f"serving engine step ({scheme or 'float'})", gen, engine._step.lower(graphdef, *args).compile(), cache
    )


@pytest.mark.parametrize(
    "name, devices_, grid",
    [
        ("v4-8", 4, "2x2x1"),
        ("v5e-16", 16, "4x4"),
        ("v5p-128", 64, "4x4x4"),
        ("2xv5p-128", 128, "4x4x4"),
        ("v6e-8", 8, "2x4"),
    ],
)
def test_slice_names_give_their_chips(name, devices_, grid):
    got = devices(name)
    assert len(got) == devices_ and "x".join(map(str, topology.parse(name).grid)) == grid
    assert {d.device_kind for d in got} == {topology.chip(name).kind}
    assert topology.generation(got[0]) is topology.chip(name)


def test_slice_names_are_checked():
    for bad, why in (("v5p-6", "powers of two of 2 TensorCores"), ("v7-8", "expected GEN-N"), ("v5e", "GEN-N")):
        with pytest.raises(ValueError, match=why):
            topology.parse(bad)


def test_moe_dispatch_auto_is_megablox_in_a_program_compiled_for_a_tpu():
    """``moe_impl: auto`` runs megablox's grouped matmul in a program compiled for a TPU, never ``ragged_dot``
    (XLA's TPU lowering of it holds every token x every expert: MGM-8x7B stage 2 95.5 GiB per v5p chip, 50.1
    dense). ``grouped`` stays available by name."""
    from mgjax.models.moe import SparseMoeBlock

    def trace(impl):
        block = SparseMoeBlock(16, 32, 4, 2, act="silu", impl=impl, dtype=F32, param_dtype=F32, rngs=nnx.Rngs(0))
        return str(jax.make_jaxpr(lambda x: block(x))(jnp.ones((2, 8, 16))))

    with topology.compiling_for(devices(SLICES["v5p"])[0]):
        assert "ragged_dot" not in trace("auto") and "pallas_call" in trace("auto")
        assert "ragged_dot" in trace("grouped")


@pytest.mark.parametrize("gen", [g if g == "v5p" else pytest.param(g, marks=pytest.mark.slow) for g in SLICES])
def test_megablox_compiles_a_mixtral_8x7b_layer_with_its_experts_split(gen):
    """One Mixtral-8x7B MoE block (4096 -> 14336, 8 experts, top 2) forward and backward at 2 x 2048 tokens per
    chip on four chips, experts split over an expert axis of 2 and the batch over fsdp x expert, compiled deviceless:
    the Mosaic kernel runs, and it needs fewer temporaries than the dense dispatch's [tokens, experts, mlp]."""
    from mgjax.models.moe import SparseMoeBlock

    devs = devices(SLICES[gen])
    m = mesh.make_mesh(mesh.MeshConfig(fsdp=2, expert=2), devs)

    def compiled(impl):
        block = nnx.eval_shape(
            lambda: SparseMoeBlock(
                4096, 14336, 8, 2, act="silu", impl=impl, dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(0)
            )
        )
        graphdef, state = nnx.split(block)
        leaves, tree = jax.tree.flatten(state)
        placed = list(zip(leaves, jax.tree.leaves(mesh.shardings(state, m)), strict=True))
        assert all("expert" in str(s.spec) for a, s in placed if a.ndim == 3)  # the expert stacks are split
        state = jax.tree.unflatten(tree, [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) for a, s in placed])
        x = jax.ShapeDtypeStruct((8, 2048, 4096), BF16, sharding=mesh.batch_sharding(m, 3))

        def loss(state, x):
            return jnp.sum(nnx.merge(graphdef, state)(x)[0].astype(F32))

        with jax.set_mesh(m), topology.compiling_for(devs[0]):
            return jax.jit(jax.grad(loss)).lower(state, x).compile()

    grouped, dense = compiled("megablox"), compiled("dense")
    assert "tpu_custom_call" in grouped.as_text()
    used = {k: c.memory_analysis().temp_size_in_bytes / 2**30 for k, c in (("megablox", grouped), ("dense", dense))}
    print(f"[megablox] Mixtral-8x7B block on {SLICES[gen]}, temporaries GiB: {used}")
    assert used["megablox"] < used["dense"]
