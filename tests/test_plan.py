"""The training plan: per-device memory and step time from shapes alone, consistent with the placement and FLOPs
modules it builds on, and one-line errors for what it cannot plan."""

import functools
import json
import re
from pathlib import Path

import jax
import pytest
from flax import nnx

from mgjax import config as cfg
from mgjax.nn import params
from mgjax.parallel import mesh, topology
from mgjax.recipes import internvl_releases
from mgjax.train import families, flops, plan
from mgjax.train.run_config import RunConfig

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "mgm"
INTERNVL = CONFIGS.parent / "internvl"
MGM_2B_PROJECTORS = 13_259_008  # configs/README.md's table


def run_config(release: str = "MGM-2B", stage: str = "stage2", sets: tuple[str, ...] = ()) -> RunConfig:
    return cfg.load(RunConfig, CONFIGS / release / f"{stage}.yaml", list(sets))


@functools.cache
def planned(release="MGM-2B", stage="stage2", mesh="", sets=(), topology="8xH100", **kw) -> dict:
    c = run_config(release, stage, sets)
    return plan.report(c, topology, plan.parse_mesh(mesh, c.mesh), **kw)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = plan.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_parameter_bytes_per_device_are_the_sharded_share_plus_the_replicated_rest():
    r = planned()
    p, per_device = r["parameters"], r["bytes_per_device"]["parameters"]
    f = p["sharded_fraction"]
    assert r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}
    assert per_device == pytest.approx(p["total_bytes"] * (f / 8 + (1 - f)), rel=1e-6)
    assert p["total_bytes"] <= 8 * per_device <= 1.01 * p["total_bytes"]


def test_doubling_fsdp_halves_the_state_but_not_the_activations_of_the_same_local_batch():
    half, full = planned(mesh="data=2,fsdp=4"), planned()
    for key in ("parameters", "gradients", "optimizer"):
        assert half["bytes_per_device"][key] / full["bytes_per_device"][key] == pytest.approx(2, rel=0.01), key
    assert half["batch"]["per_device"] == full["batch"]["per_device"] == 16
    assert half["bytes_per_device"]["activations"] == full["bytes_per_device"]["activations"]


def test_stage1_keeps_optimizer_state_for_the_projectors_only():
    one, two = planned(stage="stage1"), planned()
    assert one["parameters"]["trainable"] == MGM_2B_PROJECTORS
    # two float32 moments per projector parameter, split 8 ways (any width 8 does not divide stays whole)
    assert one["bytes_per_device"]["optimizer"] == pytest.approx(2 * 4 * MGM_2B_PROJECTORS / 8, rel=0.01)
    assert one["bytes_per_device"]["gradients"] * 2 == one["bytes_per_device"]["optimizer"]
    assert two["parameters"]["trainable"] > 100 * MGM_2B_PROJECTORS
    assert two["bytes_per_device"]["optimizer"] > 100 * one["bytes_per_device"]["optimizer"]


def test_nothing_trainable_means_no_gradients_no_optimizer_state_and_no_backward():
    r = planned(sets=('train.freeze=[".*"]',))
    assert r["parameters"]["trainable"] == 0
    assert r["bytes_per_device"]["gradients"] == r["bytes_per_device"]["optimizer"] == 0
    assert r["bytes_per_device"]["activations"] == r["activation_bytes"]["inputs"] > 0


@pytest.mark.parametrize("sizes", [dict(fsdp=8), dict(data=2, fsdp=2, tensor=2)])
def test_float32_bytes_of_every_parameter_are_their_placement(sizes):
    model = plan.abstract_model(run_config())
    sizes = {**{a: 1 for a in mesh.MESH_AXES}, **sizes}
    assert plan.float32_bytes(model, nnx.Param, sizes) == mesh.placement(model, sizes).per_device_bytes


def test_gradients_double_with_accumulation():
    once, twice = planned(), planned(sets=("train.micro_batches=4",))
    assert twice["bytes_per_device"]["gradients"] == 2 * once["bytes_per_device"]["gradients"]
    assert twice["batch"]["per_device"] == once["batch"]["per_device"] // 4


def test_remat_policies_order_the_activations():
    acts = {p: planned(sets=(f"model.remat={p}",))["activation_bytes"] for p in ("none", "dots", "full")}
    total = {p: sum(a.values()) for p, a in acts.items()}
    assert total["none"] > total["dots"] > total["full"]
    assert acts["none"]["recomputed_layer"] == 0 < acts["full"]["recomputed_layer"]
    # full remat keeps each layer's bf16 input (2·s·b·h bytes), a small part of what a layer keeps without
    assert acts["full"]["kept_for_backward"] < acts["none"]["kept_for_backward"] / 4


def test_tensor_parallelism_splits_activations_that_data_parallelism_does_not():
    tensor, data = planned(mesh="fsdp=4,tensor=2", batch=64), planned(mesh="data=2,fsdp=4")
    assert tensor["batch"]["per_device"] == data["batch"]["per_device"] == 16
    assert tensor["bytes_per_device"]["activations"] < 0.8 * data["bytes_per_device"]["activations"]
    assert tensor["bytes_per_device"]["parameters"] < 0.6 * data["bytes_per_device"]["parameters"]


def test_step_flops_and_time_follow_the_flops_module():
    c = run_config()
    r = planned(batch=64, seq_len=1024, mfu=0.5)
    model = plan.abstract_model(c)
    want = flops.mgm_step_flops(model, params.trainable(families.MGM.stages["stage2"]), batch=64, seq_len=1024)
    assert r["step_flops"] == want
    assert r["seconds_per_step"] == pytest.approx(want["total"] / (8 * flops.PEAK_FLOPS["H100"] * 0.5))
    assert r["tokens_per_s"] == pytest.approx(64 * 1024 / r["seconds_per_step"])
    assert r["batch"] == {"global": 64, "micro_batches": 1, "per_device": 8, "seq_len": 1024}


def test_local_devices_plan_without_a_step_time(capsys):
    n = jax.device_count()
    code, out, _ = cli(
        capsys, "--config", str(CONFIGS / "MGM-2B" / "stage2.yaml"), "--topology", "local", "--batch", str(2 * n)
    )
    assert code == 0
    assert "time per step: unknown" in out and f"mesh: data=1 fsdp={n} tensor=1 expert=1" in out


def test_mgm_7b_stage2_on_8xh100_text_and_json(capsys):
    args = ("--config", str(CONFIGS / "MGM-7B" / "stage2.yaml"), "--topology", "8xH100")
    code, out, _ = cli(capsys, *args)
    assert code == 0
    assert re.search(r"^fits: (yes|no) \(\d+\.\d\d of 80\.00 GiB\)$", out, re.M), out
    code, out, _ = cli(capsys, *args, "--json")
    r = json.loads(out)
    assert code == 0 and r["release"] == "MGM-7B" and r["mesh"]["fsdp"] == 8
    memory = r["bytes_per_device"]
    assert memory["total"] == sum(v for k, v in memory.items() if k != "total")
    assert r["fits"] == (memory["total"] <= 80 * 2**30)
    assert r["parameters"]["count"] == 7_266_093_504  # configs/README.md's table


@pytest.mark.parametrize(
    "args, message",
    [
        (("--topology", "v9-1"), r"unknown topology 'v9-1'; known: 8xH100, .*v5p-128.*, local"),
        (("--topology", "8xH100", "--mesh", "fsdp=3"), r"8xH100 has 8 chips: mesh .* needs 3 devices, not 8"),
        (("--topology", "8xH100", "--mesh", "fsdp=8,pipeline=2"), r"--mesh 'fsdp=8,pipeline=2': expected AXIS=SIZE"),
        (("--topology", "8xH100", "--set", "model.bogus=1"), r"unknown key model\.bogus"),
        (("--topology", "8xH100", "--set", "model.remat=most"), r"model\.remat must be one of"),
        (("--topology", "8xH100", "--batch", "12"), r"global batch 12 does not split into 1 micro-batch\(es\) x 8"),
        (("--topology", "8xH100", "--set", "train.freeze=['(']"), r"train\.freeze: '\(' is not a regex"),
        (("--topology", "8xH100", "--set", "train.loss_chunk=-1"), r"train\.loss_chunk must be at least 0, not -1"),
        (("--topology", "8xH100", "--set", "model.attention_impl=flash"), r"model\.attention_impl must be one of"),
    ],
)
def test_errors_are_one_line_and_exit_2(capsys, args, message):
    code, out, err = cli(capsys, "--config", str(CONFIGS / "MGM-2B" / "stage2.yaml"), *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and re.search(message, err), err


@pytest.mark.parametrize(
    "args, message",
    [
        (("--mfu", "1.5"), "argument --mfu: must be a finite number from 0 to 1, not 1.5"),
        (("--batch", "0"), "argument --batch: must be >= 1, not 0"),
    ],
)
def test_bad_flag_values_are_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        plan.main(["--config", str(CONFIGS / "MGM-2B" / "stage2.yaml"), "--topology", "8xH100", *args])
    assert exit.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


def test_compiled_on_local_devices_from_shapes(capsys):
    code, out, _ = cli(capsys, "--config", "configs/demo.yaml", "--topology", "local", "--compile", "--json")
    r = json.loads(out)
    assert code == 0, out
    xla, mine = r["compiled_bytes_per_device"], r["bytes_per_device"]
    # the step's arguments are the state (parameters and Adam's moments, float32, and the step count) and a batch
    state = mine["parameters"] + mine["optimizer"]
    assert state < xla["arguments"] <= state + r["activation_bytes"]["inputs"] + 64, (xla, mine)
    assert xla["peak"] >= xla["arguments"] + xla["temporaries"]
    code, _, err = cli(capsys, "--config", "configs/demo.yaml", "--topology", "8xH100", "--compile")
    assert code == 2 and "--compile needs the devices" in err


def test_tpu_slices_are_planned_and_judged_only_by_the_compiler(capsys):
    """Any v4/v5e/v5p/v6e slice name plans; its fit is not claimed from the estimate; with --compile XLA's TPU
    compiler (deviceless, libtpu) decides, and a step that does not fit exits 2 saying what to change."""
    args = ("--config", "configs/demo.yaml", "--topology", "v5e-4", "--batch", "256", "--seq-len", "8192")
    code, out, _ = cli(capsys, *args)
    assert code == 0 and "fits: unknown until compiled (estimate" in out and "add --compile" in out
    assert "demo full on v5e-4: 4 chips on 1 host(s), 16.00 GiB each" in out
    try:
        topology.devices("v5e-4")
    except RuntimeError as e:
        pytest.skip(str(e))
    code, out, err = cli(capsys, *args, "--compile", "--json")
    r = json.loads(out)
    xla = r["compiled_bytes_per_device"]
    assert code == 2 and r["fits"] is False
    # the compiler either compiles and reports a peak over the HBM, or refuses temporaries that alone exceed it
    assert xla["peak"] > 16 * 2**30 if "peak" in xla else xla["temporaries"] > 16 * 2**30, xla
    assert err.count("\n") == 1 and "raise train.micro_batches" in err and "v5e-4 has 16.00 GiB" in err
    print(
        f"[plan] demo at global batch 256 x 8192 on v5e-4: estimate {r['bytes_per_device']['total'] / 2**30:.2f} GiB, "
        f"compiler: {xla}"
    )


def _estimate_and_compiled(c: RunConfig, slice_name: str, **kw) -> tuple[int, int]:
    try:
        topology.devices(slice_name)
    except RuntimeError as e:
        pytest.skip(str(e))
    with jax.default_matmul_precision("default"):  # as training runs: the suite's "highest" makes bf16 dots 6-pass
        r = plan.report(c, slice_name, compile=True, **kw)
    # the estimate's packing was fitted to the parts' sum (which counts the TPU arena's gaps twice), so it is judged
    # against that sum; the compiler's own peak is lower (mgjax.train.step.memory)
    return r["bytes_per_device"]["total"], r["compiled_bytes_per_device"]["parts"]


TINY_ESTIMATED = ("model.compute_dtype=bfloat16", "model.remat=full", "model.attention_impl=xla")


@pytest.mark.parametrize("batch, length", [(32, 2048), pytest.param(64, 512, marks=pytest.mark.slow)])
def test_the_estimate_is_within_15_percent_of_the_tpu_compiler_for_a_tiny_mgm(batch, length):
    """The demo's model at bf16 under full remat (the recipes' setting) on v5p-8, compiled by XLA's TPU compiler.
    Its attention is the XLA one: at the demo's head_dim of 8 the TPU pads splash's q/k/v to 128 lanes, 16x their
    bytes (compiled 203 MiB against an estimate of 80), which no real model's 64-128 comes near."""
    c = cfg.load(RunConfig, "configs/demo.yaml", TINY_ESTIMATED)
    estimate, peak = _estimate_and_compiled(c, "v5p-8", batch=batch, seq_len=length)
    print(
        f"[plan] demo {batch} x {length} on v5p-8: compiled {peak / 2**20:.1f} MiB, estimate "
        f"{estimate / 2**20:.1f} MiB ({peak / estimate:.3f})"
    )
    assert 0.85 <= peak / estimate <= 1.15


@pytest.mark.slow
@pytest.mark.parametrize(
    "release",
    [
        # since splash: estimate 27.46 GiB against 21.87 compiled on v5p-8 (the recomputed layer's working set,
        # 16 rows of Gemma's 16,384-wide MLP, over-counted); open in issue 20
        pytest.param("MGM-2B", marks=pytest.mark.xfail(reason="estimate 1.26x the compiled peak on v5p-8")),
        "MGM-7B",
    ],
)
def test_the_estimate_is_within_15_percent_of_the_tpu_compiler_for_a_release(release):
    """A release's stage-2 recipe (global batch 128 x 2048) on v5p-32, 8 rows per chip: 3-5 minutes of compiling
    each on 2 cores. (With the LLM cut to one layer the estimate is 0.78 of MGM-7B's compiled peak: it puts the
    working set of a layer being recomputed too high, which the whole depth's kept inputs make up for.)"""
    estimate, peak = _estimate_and_compiled(run_config(release), "v5p-32")
    print(
        f"[plan] {release} on v5p-32: compiled {peak / 2**30:.2f} GiB, estimate {estimate / 2**30:.2f} GiB "
        f"({peak / estimate:.3f})"
    )
    assert 0.85 <= peak / estimate <= 1.15


@pytest.mark.parametrize(
    "name, chips, hbm",
    [("v5p-128", 64, 95), ("2xv5p-128", 128, 95), ("v5e-256", 256, 16), ("v4-64", 32, 32), ("v6e-8", 8, 32)],
)
def test_tpu_slice_names_count_chips_as_cloud_tpu_does(name, chips, hbm):
    t = plan.topology(name)
    assert (t.chips, t.hbm_bytes, t.platform) == (chips, hbm * 2**30, "tpu")
    assert t.peak_flops == flops.kind_peak_flops(topology.parse(name).generation.kind) > 0


@pytest.mark.parametrize("mode, tiles, length", [("full", 48, 16384), ("frozen_vit", 7, 4096), ("lora", 7, 4096)])
def test_internvl_releases_plan_each_adaptation_mode(mode, tiles, length):
    """An InternVL2 config plans from its release's architecture: the mode's trainable set (LoRA adapters
    included) gets gradients and moments; rows are packed rows (full) or samples, with their tile slots."""
    c = cfg.load(RunConfig, INTERNVL / "InternVL2-1B" / f"{mode}.yaml", [])
    r = plan.report(c, "v5p-16")
    counts = internvl_releases.memory("InternVL2-1B", mode)
    assert (r["parameters"]["count"], r["parameters"]["trainable"]) == (counts["params"], counts["trainable"])
    assert r["batch"] == {
        "global": c.train.global_batch,
        "micro_batches": 1,
        "per_device": c.train.global_batch // 8,
        "seq_len": length,
        "tiles": tiles,
    }
    model = plan.abstract_model(c)
    trainable = plan.trainable_filter(c)
    assert r["bytes_per_device"]["optimizer"] == 2 * plan.float32_bytes(model, trainable, r["mesh"])
    want = flops.internvl_step_flops(model, trainable, batch=c.train.global_batch, seq_len=length, tiles=tiles)
    assert r["step_flops"] == want
    token_arrays = 3 if mode == "full" else 2  # ids, labels (and segment ids of packed rows), int32
    assert r["activation_bytes"]["inputs"] == r["batch"]["per_device"] * (
        tiles * 3 * 448 * 448 * 4 + token_arrays * length * 4
    )


def test_an_internvl_plan_needs_the_release(capsys):
    code, _, err = cli(
        capsys,
        "--config",
        str(INTERNVL / "InternVL2-2B" / "lora.yaml"),
        "--topology",
        "8xH100",
        "--set",
        "model.release=",
    )
    assert code == 2 and "model.release" in err and err.count("\n") == 1


@pytest.mark.slow
def test_the_estimate_is_within_15_percent_of_the_tpu_compiler_for_a_tiny_internvl():
    """The InternVL demo's model at bf16 under full remat, packed rows weighted as Mini-InternVL's recipe
    (square), on v5p-8 (slow: 60-110 s of compiling; the tiny MGM's check runs by default)."""
    c = cfg.load(
        RunConfig,
        INTERNVL / "demo_general.yaml",
        [
            *TINY_ESTIMATED,
            "data.pack_length=2048",
            "data.pack_tiles=24",
            "train.loss_weighting=square",
        ],
    )
    estimate, peak = _estimate_and_compiled(c, "v5p-8", batch=32)
    print(
        f"[plan] InternVL demo 32 x 2048 packed, 24 tiles, on v5p-8: compiled {peak / 2**20:.1f} MiB, estimate "
        f"{estimate / 2**20:.1f} MiB ({peak / estimate:.3f})"
    )
    assert 0.85 <= peak / estimate <= 1.15
