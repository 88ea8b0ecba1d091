"""Mini-InternVL assembled: parity with transformers' InternVLForConditionalGeneration, and InternVL's own checkpoint
layout (``vision_model.* / mlp1.* / language_model.*``) mapped onto the same model."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers

import mgjax
from mgjax.models.internvl import pixel_unshuffle
from tests.helpers import INTERNVL_IMAGE_TOKEN, internvit_to_original, internvl_hf_model, max_abs, to_internlm2


def _inputs():
    """Row 0: one tile (4 placeholders); row 1: two tiles (8 placeholders); 3 tiles in order."""
    ids = torch.randint(0, 140, (2, 20), generator=torch.Generator().manual_seed(1))
    ids[0, 3:7] = INTERNVL_IMAGE_TOKEN
    ids[1, 2:10] = INTERNVL_IMAGE_TOKEN
    pixels = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    return ids, pixels


def _to_internvl(hf, text: str) -> tuple[dict, dict]:
    """InternVL's released layout and config for the same weights, written by hand."""
    state = hf.state_dict()
    vit = internvit_to_original(
        {k[len("model.vision_tower.") :]: v for k, v in state.items() if k.startswith("model.vision_tower.")}
    )
    out = {f"vision_model.{k}": v for k, v in vit.items()}
    for i, name in ((0, "layer_norm"), (1, "linear_1"), (3, "linear_2")):
        for kind in ("weight", "bias"):
            out[f"mlp1.{i}.{kind}"] = state[f"model.multi_modal_projector.{name}.{kind}"]
    for k, v in state.items():
        if k.startswith("model.language_model."):
            out["language_model.model." + k[len("model.language_model.") :]] = v
    out["language_model.lm_head.weight"] = state["lm_head.weight"]
    llm = hf.config.text_config.to_dict()
    llm["architectures"] = [{"qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}[text]]
    config = {
        "model_type": "internvl_chat",
        "architectures": ["InternVLChatModel"],
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "select_layer": -1,
        "template": "Hermes-2",
        "llm_config": llm,
        "vision_config": {
            "model_type": "intern_vit_6b",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 28,
            "patch_size": 7,
            "qkv_bias": True,
            "qk_normalization": False,
            "norm_type": "layer_norm",
            "layer_norm_eps": 1e-6,
            "hidden_act": "gelu",
        },
    }
    return {k: v.contiguous() for k, v in out.items()}, config


@pytest.fixture(scope="module", params=["qwen2", "phi3"])
def pair(request, tmp_path_factory):
    hf = internvl_hf_model(request.param)
    path = tmp_path_factory.mktemp(f"internvl_{request.param}")
    hf.save_pretrained(path)
    return request.param, hf, path, mgjax.from_pretrained(path, dtype=jnp.float32)


def test_logits_match_transformers(pair, report):
    text, hf, _, model = pair
    assert type(model.language_model).__name__ == {"qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM"}[text]
    ids, pixels = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels)
    logits, _ = model(jnp.asarray(ids.numpy()), jnp.asarray(pixels.numpy()))
    report(f"internvl[{text}] logits", max_abs(logits, ref.logits), 1e-4)
    with torch.no_grad():
        feats = hf.model.get_image_features(pixel_values=pixels).pooler_output
    report(f"internvl[{text}] image features", max_abs(model.image_features(jnp.asarray(pixels.numpy())), feats), 1e-4)


def test_text_only_needs_no_pixels(pair, report):
    text, hf, _, model = pair
    ids = torch.randint(0, 140, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    report(f"internvl[{text}] text-only logits", max_abs(model(jnp.asarray(ids.numpy()))[0], ref), 1e-4)


def test_placeholder_count_mismatch_is_an_error(pair):
    _, _, _, model = pair
    ids, pixels = _inputs()
    with pytest.raises(ValueError, match=r"12 image placeholder tokens \(id 150\) but the images give 8 embeddings"):
        model(jnp.asarray(ids.numpy()), jnp.asarray(pixels[:2].numpy()))


def test_internvl_release_layout(pair, tmp_path, report):
    text, hf, _, model = pair
    tensors, config = _to_internvl(hf, text)
    src = tmp_path / "internvl"
    src.mkdir()
    safetensors.torch.save_file(tensors, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(config))
    loaded = mgjax.from_pretrained(src, dtype=jnp.float32, image_token_id=INTERNVL_IMAGE_TOKEN)
    assert not loaded.config.native and loaded.config.ps_version == "v2"
    ids, pixels = _inputs()
    a, _ = loaded(jnp.asarray(ids.numpy()), jnp.asarray(pixels.numpy()))
    b, _ = model(jnp.asarray(ids.numpy()), jnp.asarray(pixels.numpy()))
    report(f"internvl[{text}] release layout vs transformers layout", max_abs(a, b), 0.0)
    mgjax.save_pretrained(loaded, tmp_path / "again")  # back in InternVL's layout, byte for byte
    got = safetensors.torch.load_file(tmp_path / "again" / "model.safetensors")
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert json.loads((tmp_path / "again" / "config.json").read_text())["model_type"] == "internvl_chat"


def test_module_named_layout_and_export_to_transformers(pair, tmp_path, report):
    text, hf, _, model = pair
    mods = tmp_path / "modules"
    mods.mkdir()
    safetensors.torch.save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, mods / "model.safetensors")
    (mods / "config.json").write_text(json.dumps(hf.config.to_dict()))
    loaded = mgjax.from_pretrained(mods, dtype=jnp.float32)
    ids = jnp.asarray(_inputs()[0].numpy())
    report(f"internvl[{text}] module-named layout", max_abs(loaded(ids)[0], model(ids)[0]), 0.0)
    mgjax.save_pretrained(model, tmp_path / "out")
    back = transformers.InternVLForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    want, got = hf.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)


def _internvl_pixel_shuffle(x, version):
    """InternVL's ``pixel_shuffle`` (scale 0.5) as its code runs it: a reshape/permute sequence over
    [N, W, H, C]-named axes that are really [N, rows, cols, C]."""
    n, w, h, c = x.shape
    x = x.reshape(n, w, h // 2, c * 2).permute(0, 2, 1, 3).reshape(n, h // 2, w // 2, c * 4)
    if version == "v2":
        x = x.permute(0, 2, 1, 3)
    return x.reshape(n, -1, c * 4)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_unshuffle_orders(version):
    x = torch.randn(2, 6, 6, 5, generator=torch.Generator().manual_seed(4))
    want = _internvl_pixel_shuffle(x, version).numpy()
    got = np.asarray(pixel_unshuffle(jnp.asarray(x.numpy()), 2, version))
    np.testing.assert_array_equal(got, want)


def test_internvl2_2b_layout_with_packed_internlm2(tmp_path, report):
    """InternVL2-2B's release: the LLM is InternLM2 (packed wqkv, its own names) under ``language_model.``."""
    hf = internvl_hf_model("llama")
    tensors, config = _to_internvl(hf, "qwen2")
    llm = {k[len("language_model.") :]: v.numpy() for k, v in tensors.items() if k.startswith("language_model.")}
    tensors = {k: v for k, v in tensors.items() if not k.startswith("language_model.")}
    tensors.update({f"language_model.{k}": torch.from_numpy(v) for k, v in to_internlm2(llm, heads=4, kv=2).items()})
    config["llm_config"] = {
        "model_type": "internlm2",
        "architectures": ["InternLM2ForCausalLM"],
        "vocab_size": 160,
        "hidden_size": 64,
        "intermediate_size": 112,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "rms_norm_eps": hf.config.text_config.rms_norm_eps,
        "bias": False,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "model.safetensors")
    model = mgjax.from_pretrained(tmp_path, dtype=jnp.float32, image_token_id=INTERNVL_IMAGE_TOKEN)
    assert type(model.language_model).__name__ == "InternLM2ForCausalLM"
    assert any(k.endswith("attention.wqkv.weight") for k in tensors)
    ids, pixels = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=pixels).logits
    report(
        "internvl[internlm2] logits",
        max_abs(model(jnp.asarray(ids.numpy()), jnp.asarray(pixels.numpy()))[0], ref),
        1e-4,
    )


def test_merged_embeddings_match_masked_scatter(pair, report):
    """The static gather fills placeholders exactly as transformers' masked_scatter does (row-major order)."""
    text, hf, _, model = pair
    ids, pixels = _inputs()
    with torch.no_grad():
        embeds = hf.get_input_embeddings()(ids)
        feats = hf.model.get_image_features(pixel_values=pixels).pooler_output
        mask = (ids == INTERNVL_IMAGE_TOKEN)[..., None].expand_as(embeds)
        want = embeds.masked_scatter(mask, feats.reshape(-1, feats.shape[-1]))
    got = model.embed(jnp.asarray(ids.numpy()), jnp.asarray(pixels.numpy()), image_token_id=INTERNVL_IMAGE_TOKEN)
    report(f"internvl[{text}] merged embeddings", max_abs(got, want), 1e-4)


def test_bf16_is_close_by_kl(pair):
    text, hf, path, _ = pair
    model = mgjax.from_pretrained(path, dtype=jnp.bfloat16)
    ids, pixels = _inputs()
    with torch.no_grad():
        ref = torch.log_softmax(hf(input_ids=ids, pixel_values=pixels).logits, -1).numpy()
    logits, _ = model(jnp.asarray(ids.numpy()), jnp.asarray(pixels.numpy(), jnp.bfloat16))
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    kl = float(np.mean(np.sum(np.exp(ref) * (ref - logp), -1)))
    print(f"[parity] internvl[{text}] bf16 KL {kl:.2e} (bound 1e-2)")
    assert kl <= 1e-2
