"""Mini-Gemini end to end against a PyTorch reference assembled in the test: transformers' CLIPVisionModel,
ConvNextModel and LlamaForCausalLM / GemmaForCausalLM, plus patch info mining and MGM's splicing written in torch
from the spec (``../shared/specs/mgm.md`` sections 1-3), in standard and HD modes. The mgjax model loads from an
MGM-layout checkpoint written here by hand."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from flax import nnx

import mgjax
from mgjax.models import mining
from mgjax.models.mgm import IMAGE_TOKEN_INDEX, PreNormLinear, shared_norm_projections
from mgjax.nn import resize
from tests.conftest import max_abs
from tests.test_convnext import _timm_name

CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
    hidden_act="quick_gelu",
)  # 4x4 = 16 low-res tokens
CONVNEXT = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], layer_scale_init_value=0.5)  # 80 channels
LLAMA = dict(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
MODES = {
    "standard": dict(image_grid=1, image_global=False, image_size_aux=64),  # HR 16x16 map: 4x4 windows
    "hd": dict(image_grid=2, image_global=True, image_size_aux=128),  # HR 32x32; crops and global 16x16
    "gemma": dict(image_grid=1, image_global=False, image_size_aux=64),
}  # MGM-2B: Gemma scales image tokens too
GEMMA = dict(LLAMA, head_dim=12, tie_word_embeddings=True)


def _perturbed(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "layer_scale" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


class Reference(torch.nn.Module):
    """MGM's forward as its code runs it, on transformers towers and LM."""

    def __init__(self, mode, convnext=CONVNEXT, clip=CLIP, llm=None, modes=MODES):
        """Tiny towers and LM by default; ``bench/device_suite.py`` builds release-shaped ones."""
        super().__init__()
        torch.manual_seed(0)
        self.mode = modes[mode]
        self.clip = _perturbed(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**clip)))
        self.convnext = _perturbed(transformers.ConvNextModel(transformers.ConvNextConfig(**convnext)))
        self.gemma = mode == "gemma"
        llm = llm or (GEMMA if self.gemma else LLAMA)
        self.llm = _perturbed(
            transformers.GemmaForCausalLM(transformers.GemmaConfig(**llm))
            if self.gemma
            else transformers.LlamaForCausalLM(transformers.LlamaConfig(**llm))
        )
        c, aux, d = clip["hidden_size"], sum(convnext["hidden_sizes"]), llm["hidden_size"]
        pre_norm = lambda i, o: torch.nn.Sequential(torch.nn.LayerNorm(i), torch.nn.Linear(i, o))  # noqa: E731
        self.query, self.key, self.val = pre_norm(c, c), pre_norm(aux, c), pre_norm(aux, c)
        self.mm_projector = torch.nn.Sequential(torch.nn.Linear(c, d), torch.nn.GELU(), torch.nn.Linear(d, d))
        _perturbed(self)

    def hr_map(self, x):
        stages = self.convnext(x, output_hidden_states=True).hidden_states[1:]
        size = stages[0].shape[-2:]
        return torch.cat(
            [stages[0]]
            + [F.interpolate(s.float(), size=size, mode="bilinear", align_corners=False) for s in stages[1:]],
            dim=1,
        )

    def mine(self, low, high):
        b, ch, h, w = high.shape
        n = int(low.shape[1] ** 0.5)
        m = w // n
        win = high.permute(0, 2, 3, 1).reshape(b, n, m, n, m, ch).permute(0, 1, 3, 2, 4, 5).reshape(b, n * n, m * m, ch)
        q, k, v = self.query(low), self.key(win), self.val(win)
        s = torch.nan_to_num(q[:, :, None, :] @ (k / k.shape[-1] ** 0.5).transpose(-1, -2))
        return low + (s.softmax(-1) @ v).mean(2)

    def features(self, images, images_aux):
        clip = lambda x: self.clip(x, output_hidden_states=True).hidden_states[-2][:, 1:]  # noqa: E731
        high = self.hr_map(images_aux)
        if self.mode["image_grid"] == 1:
            return self.mm_projector(self.mine(clip(images), high))
        b = images.shape[0]
        low = clip(torch.cat([images[:, :-1].flatten(0, 1), images[:, -1]]))
        crops_low, glob_low = low[: 4 * b], low[4 * b :]
        ch, h, w = high.shape[1:]
        crops = high.reshape(b, ch, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(4 * b, ch, h // 2, w // 2)
        glob = F.interpolate(high, scale_factor=0.5, mode="bilinear", align_corners=False)
        tokens = torch.cat([self.mine(glob_low, glob), self.mine(crops_low, crops).reshape(b, -1, low.shape[-1])], 1)
        return self.mm_projector(tokens)

    def splice(self, ids, feats):
        """``ids`` hold one -200 per sample, spliced as MGM's prepare_inputs_labels_for_multimodal does (token
        embeddings as stored: transformers 5 folds Gemma's scale into its embedding layer, MGM's 4.38 did not)."""
        rows = []
        for b in range(ids.shape[0]):
            at = int((ids[b] == IMAGE_TOKEN_INDEX).nonzero())
            embed = lambda x: F.embedding(x, self.llm.model.embed_tokens.weight)  # noqa: E731
            rows.append(torch.cat([embed(ids[b, :at]), feats[b], embed(ids[b, at + 1 :])]))
        return torch.stack(rows)

    def logits(self, ids, images, images_aux):
        x = self.splice(ids, self.features(images, images_aux))
        if self.gemma:  # MGM-2B scaled the whole spliced sequence, image tokens included (spec 4.1)
            x = x * torch.tensor(self.llm.config.hidden_size**0.5, dtype=x.dtype)
        return self.llm(inputs_embeds=x).logits

    def checkpoint(self, path):
        """An MGM-layout checkpoint of these weights and its config.json."""
        out = {}
        for k, v in self.clip.state_dict().items():
            k = k if k.startswith("vision_model.") else "vision_model." + k
            out["model.vision_tower.vision_tower." + k] = v
        for k, v in self.convnext.state_dict().items():
            if not k.startswith("layernorm."):  # MGM keeps the trunk only
                name = _timm_name(k).replace("stem.", "vision_stem.", 1).replace("stages.", "vision_stages.", 1)
                out["model.vision_tower_aux." + name] = v
        for name, seq in (
            ("vlm_uni_query_projector", self.query),
            ("vlm_uni_aux_projector", self.key),
            ("vlm_uni_val_projector", self.val),
            ("mm_projector", self.mm_projector),
        ):
            out.update({f"model.{name}.{k}": v for k, v in seq.state_dict().items()})
        tied = self.llm.config.tie_word_embeddings
        out.update({k: v for k, v in self.llm.state_dict().items() if not (tied and k == "lm_head.weight")})
        safetensors.torch.save_file({k: v.contiguous() for k, v in out.items()}, path / "model.safetensors")
        kind, arch = ("mgm_gemma", "MGMGemmaForCausalLM") if self.gemma else ("mgm", "MGMLlamaForCausalLM")
        config = {
            **self.llm.config.to_dict(),
            "model_type": kind,
            "architectures": [arch],
            "mm_vision_select_layer": -2,
            "mm_projector_type": "mlp2x_gelu",
            "mm_hidden_size": self.clip.config.hidden_size,
            "mm_hidden_size_aux": sum(self.convnext.config.hidden_sizes),
            **self.mode,
            "vision_config": self.clip.config.to_dict(),
            "vision_aux_config": {**self.convnext.config.to_dict(), "final_norm": False},
        }
        (path / "config.json").write_text(json.dumps(config))
        return out


def _inputs(mode, tokens):
    views = 5 if mode == "hd" else None
    g = torch.Generator().manual_seed(1)
    size = MODES[mode]["image_size_aux"]
    images = torch.randn(2, views, 3, 28, 28, generator=g) if views else torch.randn(2, 3, 28, 28, generator=g)
    images_aux = torch.randn(2, 3, size, size, generator=g)
    ids = torch.randint(0, 160, (2, 12), generator=g)
    ids[0, 2] = ids[1, 5] = IMAGE_TOKEN_INDEX
    # ours: the placeholder expanded to one id per image token, so every sequence keeps a static length
    ours = np.stack(
        [
            np.concatenate([r[:at], np.full(tokens, IMAGE_TOKEN_INDEX), r[at + 1 :]])
            for r, at in ((ids[0].numpy(), 2), (ids[1].numpy(), 5))
        ]
    )
    return ids, images, images_aux, ours


@pytest.fixture(scope="module", params=list(MODES))
def pair(request, tmp_path_factory):
    ref = Reference(request.param)
    path = tmp_path_factory.mktemp(f"mgm_{request.param}")
    ref.checkpoint(path)
    return request.param, ref, path, mgjax.from_pretrained(path, dtype=jnp.float32)


def test_logits_match_the_pytorch_reference(pair, report):
    mode, ref, _, model = pair
    assert model.config.tokens_per_image == {"standard": 16, "hd": 80, "gemma": 16}[mode]
    assert model.config.llm.model_type == ("gemma" if mode == "gemma" else "llama")
    ids, images, images_aux, ours = _inputs(mode, model.config.tokens_per_image)
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
    ids, images, images_aux, ours = _inputs(mode, model.config.tokens_per_image)
    with torch.no_grad():
        want = ref.logits(ids, images, images_aux)
    logits, _ = model(jnp.asarray(ours), jnp.asarray(images.numpy()), jnp.asarray(images_aux.numpy()))
    report(f"mgm {mode} logits, pallas mining", max_abs(logits, want), 1e-4)


def test_shared_norm_projections_equal_the_two_heads(report):
    rngs = nnx.Rngs(0)
    heads = [PreNormLinear(48, 16, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs) for _ in range(2)]
    for i, h in enumerate(heads):  # norms that are not the identity, so the folding is exercised
        h.norm.weight[...] = 1 + 0.3 * jax.random.normal(jax.random.key(i), (48,))
        h.norm.bias[...] = 0.3 * jax.random.normal(jax.random.key(10 + i), (48,))
    x = jax.random.normal(jax.random.key(5), (2, 6, 6, 48)) * 3 + 1
    for got, head in zip(shared_norm_projections(x, *heads), heads):
        report("shared-norm K/V projection", max_abs(got, head(x)), 1e-5)


def test_hr_map_and_mining_pieces(pair, report):
    mode, ref, _, model = pair
    _, _, images_aux, _ = _inputs(mode, 0)
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
    ids, images, images_aux, ours = _inputs(mode, model.config.tokens_per_image)
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
    x = jnp.asarray(_inputs(mode, 0)[2].numpy())
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
    ids, images, images_aux, ours = _inputs(mode, model.config.tokens_per_image)
    with torch.no_grad():
        want = ref.splice(ids, ref.features(images, images_aux))
    got = model.embed(jnp.asarray(ours), jnp.asarray(images.numpy()), jnp.asarray(images_aux.numpy()))
    report(f"mgm {mode} merged embeddings", max_abs(got, want), 1e-4)


def test_bf16_is_close_by_kl(pair):
    mode, ref, path, _ = pair
    model = mgjax.from_pretrained(path, dtype=jnp.bfloat16)
    ids, images, images_aux, ours = _inputs(mode, model.config.tokens_per_image)
    with torch.no_grad():
        want = torch.log_softmax(ref.logits(ids, images, images_aux), -1).numpy()
    logits, _ = model(
        jnp.asarray(ours), jnp.asarray(images.numpy(), jnp.bfloat16), jnp.asarray(images_aux.numpy(), jnp.bfloat16)
    )
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    kl = float(np.mean(np.sum(np.exp(want) * (want - logp), -1)))
    print(f"[parity] mgm {mode} bf16 KL {kl:.2e} (bound 1e-2)")
    assert kl <= 1e-2
