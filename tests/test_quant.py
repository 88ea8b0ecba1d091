"""Weight-only quantization (``mgjax.nn.quant``): the integers and scales, logits against PyTorch's float model by
KL, memory, a quantized checkpoint that saves and reloads, and the ``python -m mgjax.quantize`` command."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import mgjax
from mgjax.convert.safetensors_io import SafetensorsReader
from mgjax.inference import generate
from mgjax.inference import quantize as quantize_cli
from mgjax.nn import layers, quant
from tests.test_decoder import VARIANTS, _hf_model, _ids

# KL(PyTorch float32 || quantized) bounds over the tiny random models (measured: int8 <= 2.3e-6, int4 <= 5.6e-4)
KL_BOUND = {"int8": 1e-4, "int4": 5e-3}


def test_integers_are_within_half_a_step_and_pack_losslessly():
    w = jax.random.normal(jax.random.key(0), (3, 2, 40, 256)) * jnp.linspace(0.1, 3.0, 256)
    for name, scheme in quant.SCHEMES.items():
        q, scale = quant._encode(w, scheme)
        assert scale.shape == (3, 2, 40, 256 // scheme.group_size(256))
        assert q.dtype == (jnp.uint8 if scheme.bits == 4 else jnp.int8)
        assert q.shape[-1] == 256 * scheme.bits // 8
        step = jnp.repeat(scale, scheme.group_size(256), axis=-1)
        err = jnp.abs(quant.dequantize(q, scale, jnp.float32) - w)
        assert bool(jnp.all(err <= step / 2 * (1 + 1e-5))), name
    every = jnp.asarray(np.arange(-8, 8, dtype=np.int8).repeat(3))
    np.testing.assert_array_equal(np.asarray(quant._unpack(quant._pack(every))), np.asarray(every))


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """Float checkpoints of a Llama and a Mixtral (experts quantize too), with PyTorch's log-probabilities."""
    out = {}
    for name in ("llama2_mha", "mixtral_top2"):
        hf = _hf_model(*VARIANTS[name])
        path = tmp_path_factory.mktemp(name)
        hf.save_pretrained(path)
        with torch.no_grad():
            ref = torch.log_softmax(hf(_ids()).logits, -1).numpy()
        out[name] = (path, ref)
    return out


@pytest.mark.parametrize("scheme", sorted(quant.SCHEMES))
@pytest.mark.parametrize("name", ["llama2_mha", "mixtral_top2"])
def test_quantized_logits_are_close_to_pytorch_by_kl(decoders, name, scheme, tmp_path):
    path, ref = decoders[name]
    model = mgjax.from_pretrained(path, dtype=jnp.float32)
    before = quant.weight_bytes(model)
    found = quant.quantize(model, scheme)
    expect = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    expect += [f"block_sparse_moe.experts.{w}" for w in ("w1", "w2", "w3")] if "mixtral" in name else []
    expect += [] if "mixtral" in name else ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sorted(found) == sorted(f"model.layers.{e}" for e in expect)
    assert model.lm_head.weight.dtype == jnp.float32 and model.model.embed_tokens.weight.dtype == jnp.float32
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(_ids().numpy()))[0], -1))
    kl = float(np.mean(np.sum(np.exp(ref) * (ref - logp), -1)))
    ratio = quant.weight_bytes(model) / before
    print(f"[parity] {name} {scheme} KL {kl:.2e} (bound {KL_BOUND[scheme]:.0e}); weights {ratio:.3f}x of float32")
    assert kl <= KL_BOUND[scheme]
    assert ratio < {"int8": 0.40, "int4": 0.30}[scheme]  # the embeddings and head stay float32 in these tiny models

    # saved as it is, integers and scales, and reloaded to the same logits
    mgjax.save_pretrained(model, tmp_path)
    with pytest.raises(ValueError, match="saved as it is"):
        mgjax.save_pretrained(model, tmp_path / "cast", dtype=jnp.bfloat16)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "mgjax" and cfg["quantization_config"]["name"] == scheme
    with SafetensorsReader(tmp_path) as reader:
        key = "model.layers.0.self_attn.q_proj"
        assert reader.info(f"{key}.weight").dtype == (np.uint8 if scheme == "int4" else np.int8)
        assert reader.info(f"{key}.weight_scale").dtype == np.float32
    again = mgjax.from_pretrained(tmp_path, dtype=jnp.float32)
    assert quant.scheme_of(again).name == scheme
    ids = jnp.asarray(_ids().numpy())
    np.testing.assert_array_equal(np.asarray(again(ids)[0]), np.asarray(model(ids)[0]))
    layers.unstack(again)  # decoding's layout: the scales are held per layer too
    np.testing.assert_allclose(np.asarray(again(ids)[0]), np.asarray(model(ids)[0]), atol=1e-6)


def test_another_librarys_quantized_checkpoint_is_refused(decoders, tmp_path):
    path, _ = decoders["llama2_mha"]
    for f in path.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quant_method 'awq' is not mgjax's"):
        mgjax.from_pretrained(tmp_path)


def test_quantize_command_and_quant_flag_answer_alike(internvl_dir, tmp_path, capsys):
    """``python -m mgjax.quantize`` writes a checkpoint (tokenizer copied) that generates what ``--quant`` on
    loading the float checkpoint generates."""
    _, path = internvl_dir
    out = tmp_path / "int4"
    assert quantize_cli.main(["--model", str(path), "--out", str(out), "--quant", "int4", "--dtype", "float32"]) == 0
    said = capsys.readouterr().out
    assert "in int4; weights" in said and "tokenizer" in said
    assert quantize_cli.main(["--model", str(path), "--out", str(out), "--quant", "int8"]) == 2
    assert "not empty" in capsys.readouterr().err
    question = ["--image", str(path / "cat.png"), "--prompt", "what is this ?", "--max-new-tokens", "6"]
    answers = []
    for argv in (["--model", str(out)], ["--model", str(path), "--quant", "int4"]):
        assert generate.main(argv + question + ["--dtype", "float32"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]
    assert generate.main(["--model", str(out), "--quant", "int8"] + question) == 2
    assert "already quantized (int4)" in capsys.readouterr().err
