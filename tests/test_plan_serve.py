"""``python -m mgjax.plan --serve``: the per-chip weights are the bytes a model loaded with ``--mesh`` (and
quantized) holds on a device, the KV cache is what decoding allocates and how XLA lays it out, the working-set
estimate bounds XLA:CPU's compiled prefill, releases plan from shapes alone, and impossible meshes are refused
with one line before anything is built."""

import functools
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import torch
import transformers
from flax import nnx

from mgjax.inference import engine
from mgjax.models.decoder import LlamaConfig
from mgjax.models.registry import model_class
from mgjax.nn import layers, quant
from mgjax.train import plan
from tests.helpers import on_8_devices

SLOTS, PROMPT, ANSWER = 4, 64, 64  # a slot: the prompt's 64 (one bucket) + 64 answer positions, in the engine's
SERVING = plan.Serving(SLOTS, PROMPT, ANSWER)  # smallest cache of 256
GiB = 2**30

WORKER = """
import json, sys
import jax, jax.numpy as jnp
from flax import nnx
import mgjax
from mgjax.nn import layers, quant
from mgjax.parallel import mesh as mesh_lib

cases, slots, prompt, context = json.loads(sys.argv[1]), *map(int, sys.argv[2:])
assert jax.device_count() == 8


def per_device(tree):
    held = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    return [held[d.id] for d in jax.devices()]


out = {}
for key, path, mesh, scheme, kv in cases:
    model = mgjax.from_pretrained(path, dtype=jnp.bfloat16, mesh=mesh_lib.make_mesh(mesh_lib.parse(mesh)))
    if scheme:
        quant.quantize(model, scheme)
    out[key] = {"weights": per_device(nnx.state(model, nnx.Param))}
    if kv:  # the cache a prefill fills, laid out as XLA lays it out for decoding's per-layer weights
        llm = layers.unstack(getattr(model, "language_model", model))
        ids = jnp.ones((slots, prompt), jnp.int32)
        cache = jax.jit(lambda m, ids: m(ids, cache=m.init_cache(slots, context))[1])(llm, ids)
        out[key]["kv"] = per_device((cache.k, cache.v))
print(json.dumps(out))
"""


def _llama(path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=32,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _mixtral(path):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    transformers.MixtralForCausalLM(config).save_pretrained(path)
    return path


# (model, mesh, quantizations): tensor=8 does not divide the 4 kv heads (the cache stays whole), tensor=4 and 2 do;
# FSDP splits the weights' other axis; Mixtral's experts split over `expert`; InternVL2 carries its vision tower
MESHES = [
    ("llama", "tensor=8", (None, "int4")),
    ("llama", "fsdp=2,tensor=4", (None, "int8", "int4")),
    ("mixtral", "expert=2,tensor=4", (None, "int4")),
    ("internvl", "fsdp=4,tensor=2", (None, "int8")),
]
CASES = [(m, mesh, q) for m, mesh, schemes in MESHES for q in schemes]


def _key(model, mesh, scheme):
    return f"{model} {mesh} {scheme}"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, internvl_dir):
    root = tmp_path_factory.mktemp("plan_serve")
    return {"llama": _llama(root / "llama"), "mixtral": _mixtral(root / "mixtral"), "internvl": internvl_dir[1]}


@pytest.fixture(scope="module")
def measured(checkpoints):
    """Device by device, the bytes each case's loaded model holds (one process of 8 CPU devices for them all)."""
    cases = [[_key(m, mesh, q), str(checkpoints[m]), mesh, q, q is None] for m, mesh, q in CASES]
    return on_8_devices(WORKER, json.dumps(cases), str(SLOTS), str(PROMPT), str(SERVING.context))


def planned(path, mesh="", scheme=None, chips=8, serving=SERVING, **kw) -> dict:
    return plan.serve_report(str(path), mesh_text=mesh, chips=chips, hbm_gib=80, scheme=scheme, serving=serving, **kw)


@pytest.mark.parametrize("model, mesh, scheme", CASES, ids=[_key(*c) for c in CASES])
def test_weights_and_kv_cache_per_device_are_what_a_loaded_model_holds(checkpoints, measured, model, mesh, scheme):
    """The plan's per-chip weights are device 0's bytes of the model loaded with ``from_pretrained(mesh=...)`` and
    quantized (every device holds the same); its KV cache, device 0's share of the cache a prefill fills."""
    r = planned(checkpoints[model], mesh, scheme)
    got = measured[_key(model, mesh, scheme)]
    assert r["quant"] == scheme
    assert r["bytes_per_device"]["weights"] == got["weights"][0] == max(got["weights"]), (r["weight_bytes"], got)
    assert sum(r["weight_bytes"].values()) == r["bytes_per_device"]["weights"]
    assert (r["weight_bytes"]["integers"] > 0) == (scheme is not None)
    if "kv" in got:
        assert r["bytes_per_device"]["kv_cache"] == got["kv"][0] == max(got["kv"]), got["kv"]
        split = r["kv_cache"]["kv_heads_per_device"] < r["kv_cache"]["kv_heads"]
        assert split == ("tensor=4" in mesh or "tensor=2" in mesh)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_kv_cache_is_init_cache_bytes_on_one_chip(checkpoints, dtype):
    r = planned(checkpoints["llama"], chips=1, dtype=dtype)
    model, _ = plan.served_model(str(checkpoints["llama"]), dtype)
    cache = jax.eval_shape(lambda: model.init_cache(SLOTS, SERVING.context))
    want = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((cache.k, cache.v)))
    assert r["bytes_per_device"]["kv_cache"] == want
    assert r["serving"]["context"] == engine.MIN_LENGTH and r["mesh"]["fsdp"] == 1


@pytest.mark.parametrize("prompt, answer", [(64, 64), (4000, 4096), (4096, 4096), (4097, 100), (100, 70000)])
def test_the_context_is_the_length_the_engine_grows_its_cache_to(prompt, answer):
    """The engine's own rules (its prompt bucket and cache lengths), for the longest request."""
    s = plan.Serving(2, prompt, answer)
    assert s.prompt == engine.padded(prompt) and s.context == engine.cache_length(s.prompt + answer)
    assert s.context >= s.prompt + answer and s.context & (s.context - 1) == 0


def test_a_checkpoints_own_quantization_holds(checkpoints, tmp_path):
    config = json.loads((checkpoints["llama"] / "config.json").read_text())
    config["quantization_config"] = {"quant_method": quant.METHOD, "name": "int4", "bits": 4, "group": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert planned(tmp_path, "tensor=8")["quant"] == "int4"
    own, asked = planned(tmp_path / "config.json", "tensor=8"), planned(checkpoints["llama"], "tensor=8", "int4")
    assert own["bytes_per_device"] == asked["bytes_per_device"]
    with pytest.raises(plan.PlanError, match=r"--quant int8: .* is already quantized \(int4\)"):
        planned(tmp_path, "tensor=8", "int8")


def test_the_working_set_bounds_xla_cpu_compiled_prefill_at_float32():
    """The estimate against XLA:CPU's temporaries of the engine's prefill of one prompt (compiled from shapes), at
    float32, where XLA:CPU keeps the scores' float32 logits and probabilities alone: the estimate's third copy
    (the exponentials, which a GPU may or may not keep) puts it above, by at most 1.6x."""
    config = LlamaConfig(
        vocab_size=8000,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )
    model = nnx.eval_shape(lambda: layers.unstack(model_class(config.model_type)(config, rngs=nnx.Rngs(0))))
    graphdef, state = nnx.split(model)
    s = plan.Serving(8, 1024, 1024)
    ids = jax.ShapeDtypeStruct((1, s.prompt), jnp.int32)
    compiled = engine._prefill.lower(graphdef, state, ids, None, ids).compile()
    temporaries = compiled.memory_analysis().temp_size_in_bytes
    estimate = plan.working_set(config, s, tensor=1, platform="cpu")
    print(
        f"[plan --serve] a 1024-token prefill at float32: XLA:CPU {temporaries / 2**20:.1f} MiB, "
        f"estimate {estimate['prefill'] / 2**20:.1f} MiB"
    )
    assert 1.0 <= estimate["prefill"] / temporaries <= 1.6


@functools.cache
def release(name: str, scheme: str | None, chips: int = 8, mesh: str = "tensor=8") -> dict:
    return plan.serve_report(name, mesh_text=mesh, chips=chips, hbm_gib=80, scheme=scheme)


@pytest.mark.parametrize("name, layers_, kv_heads", [("MGM-34B", 60, 8), ("MGM-8x7B", 32, 8)])
def test_releases_quantized_on_tensor_8(name, layers_, kv_heads):
    """What is certain from the shapes: quantization leaves the float rest alone, int8 halves the quantized layers'
    bf16 bytes and adds a float32 scale per row, int4 quarters them with a scale per 128 inputs (1/16 of the
    packed bytes); the cache is the same; fewer weight bytes leave room for more slots."""
    bf16, int8, int4 = (release(name, q) for q in (None, "int8", "int4"))
    w16, w8, w4 = (r["weight_bytes"] for r in (bf16, int8, int4))
    assert w16["integers"] == w16["scales"] == 0
    assert w8["float"] == w4["float"] < w16["float"]
    linears = w16["float"] - w8["float"]  # the quantized layers' bf16 bytes, per chip
    assert w8["integers"] * 2 == linears == w4["integers"] * 4
    # a float32 scale per row of 7168 or more inputs; some rows' scales are too few to split (ZeRO-3's floor)
    assert 0 < w8["scales"] < w8["integers"] / 500
    assert w4["scales"] == pytest.approx(w4["integers"] / 16, rel=0.01)
    assert bf16["weights_all_chips"] / 8 <= bf16["bytes_per_device"]["weights"] <= 1.01 * bf16["weights_all_chips"] / 8
    assert 0.5 < int8["bytes_per_device"]["weights"] / bf16["bytes_per_device"]["weights"] < 0.55
    assert 0.25 < int4["bytes_per_device"]["weights"] / bf16["bytes_per_device"]["weights"] < 0.32
    per_slot = layers_ * 2 * 8192 * (kv_heads // 8) * 128 * 2  # k and v, one kv head per chip, bf16
    for r in (bf16, int8, int4):
        assert r["kv_cache"]["per_slot"] == per_slot and r["bytes_per_device"]["kv_cache"] == 8 * per_slot
        assert r["fits"] and r["bytes_per_device"]["total"] < 80 * GiB
    assert bf16["max_slots"] <= int8["max_slots"] <= int4["max_slots"]


def test_mgm_34b_on_one_gpu(capsys):
    """65 GiB of bf16 weights and a slot's cache of 1.9 GiB per 8192 positions (all 8 kv heads on the chip): on 80
    GiB the server's default 8 slots of 4096 + 4096 positions do not fit, 8 of the model's own 4096 do, and more
    quantized; on 64 GiB not even the weights do."""
    default = release("MGM-34B", None, chips=1, mesh="")
    assert 65 * GiB < default["bytes_per_device"]["weights"] < 66 * GiB
    assert default["kv_cache"]["per_slot"] == 60 * 2 * 8192 * 8 * 128 * 2
    assert not default["fits"] and 0 < default["max_slots"] < 8
    own = plan.Serving(8, 2048, 2048)
    bf16, int8, int4 = (planned("MGM-34B", "", q, chips=1, serving=own) for q in (None, "int8", "int4"))
    assert bf16["kv_cache"]["per_slot"] == default["kv_cache"]["per_slot"] // 2
    assert bf16["fits"] and 8 <= bf16["max_slots"] < int8["max_slots"] < int4["max_slots"]
    code, out, _ = cli(capsys, "--serve", "--model", "MGM-34B", "--chips", "1", "--hbm-gib", "64")
    assert code == 0 and re.search(r"^fits: no \(\d+\.\d\d of 64\.00 GiB\)$", out, re.M)
    assert re.search(r"^most slots of 8192 positions that fit: 0 \(the weights and a prompt's prefill alone", out, re.M)


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = plan.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_prints_each_part_and_json(capsys):
    args = ("--serve", "--model", "MGM-8x7B", "--topology", "8xH100", "--mesh", "tensor=8", "--quant", "int8")
    code, out, err = cli(capsys, *args)
    assert code == 0 and err == "", err
    assert out.startswith("MGM-8x7B served on 8xH100: 8 chip(s) of 80.00 GiB; mesh data=1 fsdp=1 tensor=8 expert=1")
    for part in ("weights", "KV cache", "working \\(est.\\)", "total"):
        assert re.search(rf"^  {part} +\d+\.\d\d(  |$)", out, re.M), (part, out)
    assert re.search(r"^fits: yes \(\d+\.\d\d of 80\.00 GiB\)$", out, re.M)
    assert re.search(r"^most slots of 8192 positions that fit: \d+$", out, re.M)
    code, out, _ = cli(capsys, *args, "--json")
    r = json.loads(out)
    assert r == release("MGM-8x7B", "int8") | {"topology": r["topology"], "model": "MGM-8x7B"}
    m = r["bytes_per_device"]
    assert m["total"] == m["weights"] + m["kv_cache"] + m["working"]


def test_internvl_release_and_a_context_past_the_models(capsys):
    code, out, _ = cli(
        capsys, "--serve", "--model", "InternVL2-2B", "--chips", "1", "--hbm-gib", "16", "--max-batch", "4",
        "--max-prompt-tokens", "8000", "--max-tokens-limit", "1024",
    )  # fmt: skip
    assert code == 0
    assert "4 slot(s) of 16384 positions (a prompt of 8000 padded to 8000 + an answer of 1024" in out
    code, out, _ = cli(capsys, "--serve", "--model", "MGM-34B", "--chips", "8", "--hbm-gib", "80")
    assert code == 0 and "note: a slot of 8192 positions is more than the model's 4096" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (("--mesh", "tensor=3"), r"^error: 8 x 80 GiB has 8 chips: mesh .*8 devices do not split into 3 x \(-1\)$"),
        (("--mesh", "tensor=4,fsdp=1"), r"^error: 8 x 80 GiB has 8 chips: mesh .* needs 4 devices, not 8$"),
        (("--mesh", "tensor=16"), r"^error: 8 x 80 GiB has 8 chips: mesh .*8 devices do not split into 16 x"),
        (("--mesh", "pipeline=8"), r"^error: --mesh 'pipeline=8': expected AXIS=SIZE"),
    ],
)
def test_impossible_meshes_are_refused_in_one_line_before_anything_is_built(capsys, monkeypatch, args, message):
    monkeypatch.setattr(plan, "served_model", lambda *a: pytest.fail("built a model for an impossible mesh"))
    code, out, err = cli(capsys, "--serve", "--model", "MGM-34B", "--chips", "8", "--hbm-gib", "80", *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and re.search(message, err), err


@pytest.mark.parametrize(
    "args, message",
    [
        (("--serve", "--model", "MGM-99B", "--topology", "8xH100"), r"^error: --model 'MGM-99B' is neither a release"),
        (("--serve", "--model", "MGM-2B"), r"^error: name the chips: --topology NAME, or --chips N with --hbm-gib X$"),
        (("--serve", "--model", "MGM-2B", "--topology", "v9-1"), r"^error: unknown topology 'v9-1'"),
    ],
)
def test_models_and_chips_it_cannot_plan_are_one_line_errors(capsys, args, message):
    code, out, err = cli(capsys, *args)
    assert code == 2 and out == "" and err.count("\n") == 1 and re.search(message, err), err


@pytest.mark.parametrize(
    "args, message",
    [
        (("--serve", "--topology", "8xH100"), "--serve needs --model"),
        (("--serve", "--model", "MGM-2B", "--chips", "8", "--batch", "8"), "--batch is for training plans only"),
        (("--topology", "8xH100", "--quant", "int8"), "--quant is for serving (--serve) plans only"),
        (("--config", "configs/demo.yaml"), "--topology is required"),
        (("--serve", "--model", "MGM-2B", "--chips", "0", "--hbm-gib", "80"), "argument --chips: must be >= 1, not 0"),
    ],
)
def test_flags_of_the_other_plan_are_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as exit:
        plan.main(list(args))
    assert exit.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].endswith(message)


DOC = Path(__file__).resolve().parents[1] / "docs" / "inference.md"


def _doc_blocks() -> list[str]:
    text = DOC.read_text().split("### How much memory a served model needs")[1].split("\n## ")[0]
    return re.findall(r"```text\n(.*?)```", text, re.S)


def test_the_docs_printed_example_is_what_the_command_prints(capsys):
    command, *printed = _doc_blocks()[0].splitlines()
    words = command.split()
    assert words[:3] == ["python", "-m", "mgjax.plan"]
    code, out, _ = cli(capsys, *words[3:])
    assert code == 0 and out.splitlines() == printed


def test_the_docs_table_is_what_the_plan_gives():
    rows = [line.split() for line in _doc_blocks()[1].splitlines()[1:]]
    for name, weights, chips, *cells in rows:
        serving = plan.Serving(8, 2048, 2048) if name == "MGM-34B" else plan.Serving(8, 4096, 4096)
        one = chips == "1"
        r = planned(name, "" if one else "tensor=8", None if weights == "bf16" else weights, 1 if one else 8, serving)
        m = r["bytes_per_device"]
        want = [f"{m[k] / GiB:.2f}" for k in ("weights", "kv_cache", "working", "total")]
        want += ["yes" if r["fits"] else "no", str(r["max_slots"])]
        assert cells[-6:] == want, (name, weights, chips)
