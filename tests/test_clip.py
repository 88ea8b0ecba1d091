"""CLIP vision tower parity against transformers, computed in the test from tiny random models."""

import jax
import jax.numpy as jnp
import pytest
import safetensors.torch
import torch
import transformers

import mgjax
from mgjax.convert.safetensors_io import CheckpointError
from mgjax.nn.resize import bicubic_matrix
from tests.helpers import max_abs

VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    hidden_act="quick_gelu",
)


def _randomize(model):
    with torch.no_grad():  # LayerNorms start at (1, 0); perturb them so a wrong norm shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    hf = _randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)))
    path = tmp_path_factory.mktemp("clip")
    hf.save_pretrained(path)
    return hf, path, mgjax.from_pretrained(path, dtype=jnp.float32)


def _pixels(h=32, w=32, seed=0):
    return torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


def test_every_hidden_state_matches(pair, report):
    hf, _, model = pair
    x = _pixels()
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
    out = model(jnp.asarray(x.numpy()))
    assert out.hidden_states.shape[0] == len(ref.hidden_states) == 4
    for i, h in enumerate(ref.hidden_states):
        report(f"hidden_states[{i}]", max_abs(out.hidden_states[i], h), 1e-4)
    report("last_hidden_state", max_abs(out.last_hidden_state, ref.last_hidden_state), 1e-4)
    report("pooler_output", max_abs(out.pooler_output, ref.pooler_output), 1e-4)


@pytest.mark.parametrize("select_layer", [-2, -1, 0, 1])
def test_mgm_features(pair, report, select_layer):
    hf, _, model = pair
    x = _pixels(seed=1)
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True).hidden_states[select_layer][:, 1:]
    got = model.features(jnp.asarray(x.numpy()), select_layer=select_layer)
    assert got.shape == (2, 16, 32)
    report(f"features(select_layer={select_layer})", max_abs(got, ref), 1e-4)


def test_interpolated_position_embeddings(pair, report):
    hf, _, model = pair
    x = _pixels(48, 40, seed=2)  # 6x5 patches from a 4x4 table: bicubic, non-square
    with torch.no_grad():
        ref = hf(x, interpolate_pos_encoding=True).last_hidden_state
    got = model(jnp.asarray(x.numpy()), interpolate_pos_encoding=True).last_hidden_state
    report("interpolated last_hidden_state", max_abs(got, ref), 1e-4)
    with pytest.raises(ValueError, match="48x40 differs from the model's 32x32"):
        model(jnp.asarray(x.numpy()))


def test_bicubic_matrix_is_torch_bicubic(report):
    img = torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for out in (3, 8, 13):
        ref = torch.nn.functional.interpolate(img, size=(out, 7), mode="bicubic", align_corners=False)[0, 0]
        got = bicubic_matrix(5, out) @ img[0, 0].numpy() @ bicubic_matrix(5, 7).T
        report(f"bicubic 5->{out}x7", max_abs(got, ref), 1e-12)


def test_remat_changes_nothing(pair, report):
    _, path, model = pair
    x = jnp.asarray(_pixels().numpy())
    remat = mgjax.from_pretrained(path, dtype=jnp.float32, remat="full")
    loss = lambda m: m.features(x).sum()  # noqa: E731
    report("remat forward", max_abs(remat.features(x), model.features(x)), 0.0)
    ga, gb = jax.grad(loss)(model), jax.grad(loss)(remat)
    scale = max(float(jnp.abs(a).max()) for a in jax.tree.leaves(ga))  # grads of a sum are large: compare relatively
    report(
        "remat grads / max|grad|",
        max(max_abs(a, b) for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb))) / scale,
        1e-6,
    )


def test_export_reloads_identically_in_pytorch(pair, tmp_path):
    hf, _, model = pair
    mgjax.save_pretrained(model, tmp_path)
    back = transformers.CLIPVisionModel.from_pretrained(tmp_path)
    want, got = hf.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_full_clip_checkpoint_loads_its_vision_tower(tmp_path, report):
    """OpenAI's CLIP checkpoints (what MGM loads) are whole CLIPModels written by transformers 4: ``vision_model.``
    prefixes, ``position_ids`` buffers, a text tower; everything but the vision tower is skipped by name."""
    torch.manual_seed(1)
    cfg = transformers.CLIPConfig(
        vision_config=VISION,
        text_config=dict(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50
        ),
        projection_dim=8,
    )
    full = _randomize(transformers.CLIPModel(cfg))
    full.save_pretrained(tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "model.safetensors")
    for tower, n in (("vision", 17), ("text", 77)):
        tensors[f"{tower}_model.embeddings.position_ids"] = torch.arange(n)[None]
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    model = mgjax.from_pretrained(tmp_path, dtype=jnp.float32)
    x = _pixels(seed=4)
    with torch.no_grad():
        ref = full.vision_model(x, output_hidden_states=True).hidden_states[-2][:, 1:]
    report("CLIPModel vision features", max_abs(model.features(jnp.asarray(x.numpy())), ref), 1e-4)


def test_wrong_checkpoint_is_refused_by_name(pair, tmp_path):
    _, path, _ = pair
    tensors = safetensors.torch.load_file(path / "model.safetensors")
    tensors.pop("encoder.layers.2.mlp.fc2.bias")
    tensors["post_layernorm.weight"] = torch.ones(31)
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        mgjax.from_pretrained(tmp_path)
    assert "missing: encoder.layers.2.mlp.fc2.bias" in str(err.value)
    assert "post_layernorm.weight: checkpoint (31,) vs model (32,)" in str(err.value)
