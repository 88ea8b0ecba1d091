"""InternViT parity against transformers' InternVLVisionModel, and InternVL's own (fused-qkv) checkpoint layout."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

import mgjax
from tests.helpers import internvit_to_original, max_abs

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
    attention_bias=True,
    layer_norm_eps=1e-6,
)
VARIANTS = {  # 300M: LayerNorm, q/k/v biases, no qk-norm; 6B: RMSNorm, qk-norm, no biases
    "300m": {},
    "6b": dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False),
}


def _hf_model(variant, seed=0):
    torch.manual_seed(seed)
    model = transformers.InternVLVisionModel(transformers.InternVLVisionConfig(**{**VISION, **VARIANTS[variant]}))
    with torch.no_grad():  # norms start at 1, biases and the CLS token at 0, layer scales at 0.1: perturb all
        for name, p in model.named_parameters():
            if any(s in name for s in ("norm", "bias", "cls_token", "lambda")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    hf = _hf_model(request.param)
    path = tmp_path_factory.mktemp(f"internvit_{request.param}")
    hf.save_pretrained(path)
    return request.param, hf, path, mgjax.from_pretrained(path, dtype=jnp.float32)


def _pixels(h=28, w=28, seed=0):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_every_hidden_state_matches(pair, report):
    name, hf, _, model = pair
    x = _pixels()
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
    out = model(jnp.asarray(x.numpy()))
    assert out.hidden_states.shape[0] == len(ref.hidden_states) == 4
    for i, h in enumerate(ref.hidden_states):
        report(f"{name} hidden_states[{i}]", max_abs(out.hidden_states[i], h), 1e-4)
    report(f"{name} last_hidden_state", max_abs(out.last_hidden_state, ref.last_hidden_state), 1e-4)
    feats = model.features(jnp.asarray(x.numpy()))
    assert feats.shape == (2, 16, 32)  # CLS dropped after the encoder
    report(f"{name} features", max_abs(feats, ref.last_hidden_state[:, 1:]), 1e-4)


def test_position_embeddings_interpolate_like_torch(pair, report):
    name, hf, _, model = pair
    x = _pixels(42, 35, seed=2)  # a 6x5 grid from the 4x4 table
    with torch.no_grad():
        ref = hf(x).last_hidden_state
    report(f"{name} 42x35 input", max_abs(model(jnp.asarray(x.numpy())).last_hidden_state, ref), 1e-4)


def test_internvl_layout_loads_and_saves(pair, tmp_path, report):
    name, hf, _, model = pair
    original = tmp_path / "original"
    original.mkdir()
    safetensors.torch.save_file(internvit_to_original(hf.state_dict()), original / "model.safetensors")
    cfg = {
        "model_type": "intern_vit_6b",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": 28,
        "patch_size": 7,
        "qkv_bias": VISION["attention_bias"],
        "qk_normalization": False,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
    }
    cfg.update({"300m": {}, "6b": {"qkv_bias": False, "qk_normalization": True, "norm_type": "rms_norm"}}[name])
    (original / "config.json").write_text(json.dumps(cfg))
    loaded = mgjax.from_pretrained(original, dtype=jnp.float32)
    assert loaded.config.original
    x = jnp.asarray(_pixels(seed=3).numpy())
    report(
        f"{name} internvit layout vs hf layout", max_abs(loaded(x).last_hidden_state, model(x).last_hidden_state), 0.0
    )
    mgjax.save_pretrained(loaded, tmp_path / "again")  # written back in InternVL's own layout
    want = safetensors.torch.load_file(original / "model.safetensors")
    got = safetensors.torch.load_file(tmp_path / "again" / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_export_reloads_identically_in_pytorch(pair, tmp_path):
    _, hf, _, model = pair
    mgjax.save_pretrained(model, tmp_path)
    back = transformers.InternVLVisionModel.from_pretrained(tmp_path).eval()
    want, got = hf.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_drop_path_is_per_sample_and_off_when_deterministic(tmp_path):
    hf = _hf_model("300m")
    hf.config.drop_path_rate = 0.5
    hf.save_pretrained(tmp_path)
    model = mgjax.from_pretrained(tmp_path, dtype=jnp.float32)
    assert model.config.drop_path_rate == 0.5
    x = jnp.asarray(_pixels().numpy())
    a = model(x).last_hidden_state
    b = model(x, deterministic=False, rngs=nnx.Rngs(dropout=1)).last_hidden_state
    c = model(x, deterministic=False, rngs=nnx.Rngs(dropout=2)).last_hidden_state
    assert float(jnp.abs(b - c).max()) > 1e-3 and float(jnp.abs(a - b).max()) > 1e-3
    with pytest.raises(ValueError, match="needs rngs"):
        model(x, deterministic=False)
    first = jax.tree.map(np.asarray, model.features(x, select_layer=1))  # layer 0 has rate 0: never dropped
    np.testing.assert_allclose(
        first, model.features(x, select_layer=1, deterministic=False, rngs=nnx.Rngs(dropout=3)), atol=1e-6
    )
