"""Sharded inference: the generate command on 8 simulated CPU devices with ``--mesh`` gives the single-device
greedy answer, token for token, for a tiny InternVL2 (fsdp x tensor; float and int4), MGM (tensor) and Mixtral
(expert), each device loading only its shards."""

import json
from pathlib import Path

import transformers

from tests.helpers import on_8_devices, tokenizer

WORKER = """
import contextlib, io, json, sys
import jax, numpy as np
from mgjax.inference import generate
cases = json.loads(sys.argv[1])
assert jax.device_count() == 8
decode, tokens = generate.generate, []

def every_token(*args, **kw):  # no stop tokens: all 8 tokens of the answer are compared, not a possibly empty text
    out = decode(*args, **{**kw, "stop_ids": ()})
    tokens.append(np.asarray(out).tolist())
    return out

generate.generate = every_token
out = {}
for name, (argv, meshes) in cases.items():
    for mesh in [None, *meshes]:
        with contextlib.redirect_stdout(io.StringIO()):
            extra = ["--dtype", "float32", "--max-new-tokens", "8"] + (["--mesh", mesh] if mesh else [])
            rc = generate.main(argv + extra)
        out[f"{name} {mesh}"] = [rc, tokens.pop() if rc == 0 else None]
print(json.dumps(out))
"""


def _mixtral_dir(root: Path) -> Path:
    words = tokenizer()
    cfg = transformers.MixtralConfig(
        vocab_size=len(words.get_vocab()),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    path = root / "mixtral"
    transformers.MixtralForCausalLM(cfg).save_pretrained(path)
    words.save_pretrained(path)
    return path


def test_sharded_greedy_decoding_equals_one_device(internvl_dir, mgm_zoo, tmp_path):
    _, internvl = internvl_dir
    zoo, _ = mgm_zoo
    cat = str(internvl / "cat.png")
    mgm = zoo / "MGM-single"
    if not (mgm / "tokenizer_config.json").exists():
        tokenizer().save_pretrained(mgm)
    cases = {  # each axis on one model: a model's tensor and FSDP, MGM's tensor, Mixtral's experts
        "internvl": (["--model", str(internvl), "--image", cat, "--prompt", "what is this ?"], ["fsdp=4,tensor=2"]),
        "mgm": (
            ["--model", str(mgm), "--towers-root", str(zoo), "--image", cat, "--prompt", "what is this ?"],
            ["tensor=2"],
        ),
        "mixtral": (["--model", str(_mixtral_dir(tmp_path)), "--prompt", "a red cat is"], ["expert=2"]),
        # packed int4 weights and their scales split like the float weights
        "internvl-int4": (
            ["--model", str(internvl), "--quant", "int4", "--image", cat, "--prompt", "what is this ?"],
            ["fsdp=4,tensor=2"],
        ),
    }
    out = on_8_devices(WORKER, json.dumps(cases), cwd=tmp_path)
    for name, (_, meshes) in cases.items():
        rc, single = out[f"{name} None"]
        assert rc == 0 and len(single[0]) > 8, (name, out)
        for m in meshes:
            assert out[f"{name} {m}"] == [0, single], (name, m, out[f"{name} {m}"], single)


ENGINE_WORKER = """
import argparse, json, sys
import jax
from PIL import Image
from mgjax.inference import decoding, engine
from mgjax.inference.generate import batch_embeds, conversation_inputs, default_template, load_model
path = sys.argv[1]
out = {}
for mesh in [None, "fsdp=4,tensor=2"]:
    ns = argparse.Namespace(model=path, dtype="float32", mesh=mesh, quant=None, towers_root=None, towers="mgm")
    model, words = load_model(ns)
    template = default_template(model, words)
    eng = engine.Engine(model, words, (), slots=4, embed=lambda m, i, a: batch_embeds(m, i, [a]) if a else None)
    jobs = []
    for text, image in (("<image>\\nwhat is this ?", [Image.open(path + "/cat.png")]), ("a red cat is", [])):
        ids, args = conversation_inputs(model, words, template, [{"from": "human", "value": text}], image)
        jobs.append(eng.submit(engine.Job(ids[0], args, decoding.Sampling(), 8, [])))
    for job in jobs:
        while not isinstance(item := job.out.get(timeout=300), tuple):
            assert not isinstance(item, Exception), item
    out[str(mesh)] = [job.tokens for job in jobs]
print(json.dumps(out))
"""


def test_the_serving_engine_decodes_sharded_as_on_one_device(internvl_dir, tmp_path):
    """The continuous-batching engine (the server's) under ``fsdp=4,tensor=2``: its slot cache follows the model's
    shards, and both requests (one with an image) get the single-device tokens."""
    _, internvl = internvl_dir
    out = on_8_devices(ENGINE_WORKER, str(internvl), cwd=tmp_path)
    assert out["fsdp=4,tensor=2"] == out["None"] and all(len(t) == 8 for t in out["None"])
