"""Mini-Gemini end to end against a PyTorch reference (``tests/helpers.MGMReference``): transformers' CLIPVisionModel,
ConvNextModel and LlamaForCausalLM / GemmaForCausalLM, plus patch info mining and MGM's splicing written in torch
from the spec (``../shared/specs/mgm.md`` sections 1-3), in standard and HD modes. The mgjax model loads from an
MGM-layout checkpoint the reference writes by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import mgjax
from mgjax.models import mining
from mgjax.nn import resize
from tests.helpers import MGM_MODES, MGMReference, max_abs, mgm_inputs


@pytest.fixture(scope="module", params=list(MGM_MODES))
def pair(request, tmp_path_factory):
    ref = MGMReference(request.param)
    path = tmp_path_factory.mktemp(f"mgm_{request.param}")
    ref.checkpoint(path)
    return request.param, ref, path, mgjax.from_pretrained(path, dtype=jnp.float32)


def test_logits_match_the_pytorch_reference(pair, report):
    mode, ref, _, model = pair
    assert model.config.tokens_per_image == {"standard": 16, "hd": 80, "gemma": 16}[mode]
    assert model.config.llm.model_type == ("gemma" if mode == "gemma" else "llama")
    ids, images, images_aux, ours = mgm_inputs(mode, model.config.tokens_per_image)
    with torch.no_grad():
        want = ref.logits(ids, images, images_aux)
        feats = ref.features(images, images_aux)
    got_feats = model.image_features(jnp.asarray(images.numpy()), jnp.asarray(images_aux.numpy()))
    report(f"mgm {mode} image tokens", max_abs(got_feats, feats), 1e-4)
    logits, _ = model(jnp.asarray(ours), jnp.asarray(images.numpy()), jnp.asarray(images_aux.numpy()))
    assert logits.shape == want.shape  # the expanded placeholders sit where MGM splices its image tokens
    report(f"mgm {mode} logits", max_abs(logits, want), 1e-4)


def test_the_pallas_mining_kernel_gives_the_same_logits(pair, report):
    mode, ref, path, _ = pair  # in Pallas's interpreter here; compiled on TPUs
    model = mgjax.from_pretrained(path, dtype=jnp.float32, mining_backend="pallas")
    ids, images, images_aux, ours = mgm_inputs(mode, model.config.tokens_per_image)
    with torch.no_grad():
        want = ref.logits(ids, images, images_aux)
    logits, _ = model(jnp.asarray(ours), jnp.asarray(images.numpy()), jnp.asarray(images_aux.numpy()))
    report(f"mgm {mode} logits, pallas mining", max_abs(logits, want), 1e-4)


def test_hr_map_and_mining_pieces(pair, report):
    mode, ref, _, model = pair
    _, _, images_aux, _ = mgm_inputs(mode, 0)
    with torch.no_grad():
        want = ref.hr_map(images_aux).permute(0, 2, 3, 1).numpy()
    got = model.hr_features(jnp.asarray(images_aux.numpy()))
    assert got.shape[-1] == 80
    report(f"mgm {mode} HR map", max_abs(got, want), 1e-4)


def test_export_is_the_same_mgm_checkpoint(pair, tmp_path):
    _, _, path, model = pair
    mgjax.save_pretrained(model, tmp_path)
    want = safetensors.torch.load_file(path / "model.safetensors")
    got = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)
    again = mgjax.from_pretrained(tmp_path, dtype=jnp.float32)
    assert again.config == model.config


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_window_attention_scales_keys_and_cleans_logits(backend):
    q = jnp.ones((1, 1, 4))
    k = jnp.stack([jnp.full((4,), 2.0), jnp.full((4,), jnp.inf)])[None, :, None]  # [B, W, N, C]
    v = jnp.arange(8.0).reshape(1, 2, 1, 4)
    out = mining.local_window_attention(q, k, v, backend=backend)  # the inf logit -> float32 max: all on key 1
    np.testing.assert_allclose(np.asarray(out)[0, 0], [4, 5, 6, 7])
    win = mining.windows(jnp.arange(16.0).reshape(1, 4, 4, 1), 2)  # token (0, 1) owns rows 0-1, cols 2-3
    np.testing.assert_array_equal(np.asarray(win)[0, :, 1, 0], [2, 3, 6, 7])


def test_bilinear_matrix_is_torch_bilinear(report):
    img = torch.randn(1, 1, 9, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for out in (4, 9, 13, 21):  # shrinking (aliasing, no antialias) and growing
        want = F.interpolate(img, size=(out, 5), mode="bilinear", align_corners=False)[0, 0].numpy()
        got = resize.bilinear_matrix(9, out) @ img[0, 0].numpy() @ resize.bilinear_matrix(7, 5).T
        report(f"bilinear 9x7->{out}x5", max_abs(got, want), 1e-12)


def test_greedy_decode_matches_the_reference(pair):
    """32 greedy tokens, against the torch reference recomputing the whole spliced sequence each step."""
    from mgjax.inference.decoding import greedy

    mode, ref, _, model = pair
    ids, images, images_aux, ours = mgm_inputs(mode, model.config.tokens_per_image)
    want = ids
    with torch.no_grad():
        for _ in range(32):
            want = torch.cat([want, ref.logits(want, images, images_aux)[:, -1].argmax(-1, keepdim=True)], dim=1)
    embeds = model.embed(jnp.asarray(ours), jnp.asarray(images.numpy()), jnp.asarray(images_aux.numpy()))
    got = np.asarray(greedy(model.language_model, jnp.asarray(ours), 32, inputs_embeds=embeds))
    np.testing.assert_array_equal(got[:, ours.shape[1] :], want[:, ids.shape[1] :].numpy())


def test_release_config_names_its_towers():
    """MGM's own config.json names the towers by local path; their architectures follow from the names."""
    from mgjax.models.mgm import MGMConfig

    release = {
        "model_type": "mgm",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "rms_norm_eps": 1e-5,
        "mm_vision_tower": "model_zoo/OpenAI/clip-vit-large-patch14-336",
        "mm_vision_tower_aux": "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
        "mm_vision_select_layer": -2,
        "mm_projector_type": "mlp2x_gelu",
        "image_size_aux": 1536,
        "image_grid": 2,
        "image_global": True,
    }
    c = MGMConfig.from_hf(release)
    assert (c.vision.image_size, c.vision.patch_size, c.vision.hidden_size) == (336, 14, 1024)
    assert c.vision_aux.hidden_sizes == (192, 384, 768, 1536) and c.vision_aux.depths == (3, 3, 27, 3)
    assert c.vision_aux.drop_path_rate == 0.1 and not c.vision_aux.final_norm  # MGM never turned it off
    assert c.tokens_per_image == 2880 and c.llm.model_type == "llama"
    assert MGMConfig.from_hf({**release, "drop_path": False}).vision_aux.drop_path_rate == 0.0
    with pytest.raises(ValueError, match="is not a ConvNeXt MGM knows by name"):
        MGMConfig.from_hf({**release, "mm_vision_tower_aux": "some/other/tower"})


def test_hr_tower_from_an_open_clip_file(pair, tmp_path, report):
    """MGM loads its ConvNeXt from open_clip's file (``visual.trunk.*``), the rest from its own checkpoint, which
    may or may not hold a copy of the tower."""
    mode, _, path, model = pair
    tensors = safetensors.torch.load_file(path / "model.safetensors")
    aux = "model.vision_tower_aux."
    trunk = {
        "visual.trunk." + k[len(aux) :].replace("vision_stem.", "stem.", 1).replace("vision_stages.", "stages.", 1): v
        for k, v in tensors.items()
        if k.startswith(aux)
    }
    extras = {
        "visual.trunk.head.norm.weight": torch.zeros(32),
        "visual.head.mlp.fc1.weight": torch.zeros(4, 32),
        "text.token_embedding.weight": torch.zeros(5, 4),
        "logit_scale": torch.zeros(()),
    }
    safetensors.torch.save_file({**trunk, **extras}, tmp_path / "open_clip_model.safetensors")
    bare = tmp_path / "mgm"
    bare.mkdir()
    safetensors.torch.save_file({k: v for k, v in tensors.items() if not k.startswith(aux)}, bare / "model.safetensors")
    (bare / "config.json").write_text((path / "config.json").read_text())
    x = jnp.asarray(mgm_inputs(mode, 0)[2].numpy())
    want = model.hr_features(x)
    for src in (bare, path):
        loaded = mgjax.from_pretrained(
            src, dtype=jnp.float32, towers={"vision_tower_aux": (tmp_path / "open_clip_model.safetensors", "open_clip")}
        )
        report(f"mgm {mode} HR tower from open_clip ({src.name})", max_abs(loaded.hr_features(x), want), 0.0)
    with pytest.raises(mgjax.convert.safetensors_io.CheckpointError, match="missing: model.vision_tower_aux"):
        mgjax.from_pretrained(bare)


def test_merged_embeddings_match_mgm_splicing(pair, report):
    mode, ref, _, model = pair
    ids, images, images_aux, ours = mgm_inputs(mode, model.config.tokens_per_image)
    with torch.no_grad():
        want = ref.splice(ids, ref.features(images, images_aux))
    got = model.embed(jnp.asarray(ours), jnp.asarray(images.numpy()), jnp.asarray(images_aux.numpy()))
    report(f"mgm {mode} merged embeddings", max_abs(got, want), 1e-4)


def test_bf16_is_close_by_kl(pair):
    mode, ref, path, _ = pair
    model = mgjax.from_pretrained(path, dtype=jnp.bfloat16)
    ids, images, images_aux, ours = mgm_inputs(mode, model.config.tokens_per_image)
    with torch.no_grad():
        want = torch.log_softmax(ref.logits(ids, images, images_aux), -1).numpy()
    logits, _ = model(
        jnp.asarray(ours), jnp.asarray(images.numpy(), jnp.bfloat16), jnp.asarray(images_aux.numpy(), jnp.bfloat16)
    )
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    kl = float(np.mean(np.sum(np.exp(want) * (want - logp), -1)))
    print(f"[parity] mgm {mode} bf16 KL {kl:.2e} (bound 1e-2)")
    assert kl <= 1e-2
