"""MGM checkpoints in MGM's own layout: towers named by ``model_zoo/`` paths, bf16 tower copies inside the checkpoint,
an OpenAI CLIP directory and an open_clip ConvNeXt file beside it. The PyTorch reference loads the towers as MGM's
inference does (spec 7.1): ConvNeXt from open_clip's float32 file, CLIP from the OpenAI directory unless the
checkpoint's copy sits in a shard MGM reads for its projectors, then the copy wins."""

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import mgjax
from mgjax.convert.safetensors_io import KeyMismatch
from mgjax.inference import generate
from mgjax.models import mgm_towers
from mgjax.models.mgm import MGMConfig
from mgjax.train import families, run_config
from tests.helpers import (
    CLIP_DIR,
    CONVNEXT_DIR,
    TOWERS,
    MGMReference,
    max_abs,
    mgm_inputs,
    tokenizer,
    write_checkpoint,
)


def _rounded(ref, *towers):
    """``ref`` with the named towers' weights rounded to bf16 (what a checkpoint copy holds)."""
    out = copy.deepcopy(ref)
    with torch.no_grad():
        for tower in towers:
            for p in getattr(out, tower).parameters():
                p.copy_(p.bfloat16().float())
    return out


@pytest.fixture
def zoo(mgm_zoo):
    return mgm_zoo


def _logits(model_or_ref, model=True):
    ids, images, images_aux, ours = mgm_inputs("standard", 16)
    if model:
        out, _ = model_or_ref(jnp.asarray(ours), jnp.asarray(images.numpy()), jnp.asarray(images_aux.numpy()))
        return np.asarray(out)
    with torch.no_grad():
        return model_or_ref.logits(ids, images, images_aux).numpy()


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_towers_load_as_mgm_loads_them(zoo, layout, capsys, report):
    """Single file: the checkpoint's CLIP copy is in the (only) shard MGM reads, so MGM uses it; sharded: it is
    not, so CLIP comes from the OpenAI directory. ConvNeXt comes from open_clip's float32 file either way."""
    root, ref = zoo
    model = mgjax.from_pretrained(root / f"MGM-{layout}", towers_root=root)
    line = capsys.readouterr().err
    assert f"ConvNeXt from {root / CONVNEXT_DIR / 'open_clip_model.safetensors'} (open_clip)" in line
    assert f"CLIP from {root / CLIP_DIR / 'model.safetensors'}" in line
    assert ("from the checkpoint's projector shards" in line) == (layout == "single"), line
    assert model.config.vision_aux.hidden_sizes == (96, 192, 384, 768)  # from open_clip_config.json
    mgm = _rounded(ref, "clip") if layout == "single" else ref
    got = _logits(model)
    report(f"mgm {layout} logits vs towers as MGM loads them", max_abs(got, _logits(mgm, False)), 1e-4)
    # the other sources would have been measurably different: the bf16 ConvNeXt copy, CLIP from the other place
    for what, other in (
        ("ConvNeXt copy", _rounded(mgm, "convnext")),
        ("other CLIP", ref if layout == "single" else _rounded(ref, "clip")),
    ):
        wrong = max_abs(got, _logits(other, False))
        print(f"[towers] {layout}: logits with the {what} instead differ by {wrong:.2e}")
        assert wrong > 1e-5


def test_checkpoint_copies_on_request(zoo, capsys, report):
    root, ref = zoo
    model = mgjax.from_pretrained(root / "MGM-sharded", towers_root=root, tower_source="checkpoint")
    assert "CLIP from the checkpoint's copy" in capsys.readouterr().err
    report(
        "mgm logits with the checkpoint's tower copies",
        max_abs(_logits(model), _logits(_rounded(ref, "clip", "convnext"), False)),
        1e-4,
    )


def test_where_tower_directories_are_searched(zoo, tmp_path, monkeypatch):
    root, _ = zoo
    d = json.loads((root / "MGM-single" / "config.json").read_text())
    ckpt = root / "MGM-single"
    clip = str(root / CLIP_DIR)
    monkeypatch.chdir(tmp_path)  # nothing here
    for where in (root, root / "model_zoo"):  # the directory holding model_zoo/, or model_zoo itself
        assert clip in mgm_towers.resolve(d, ckpt, root=where).sources["vision_tower"]
    assert clip in mgm_towers.resolve(d, ckpt).sources["vision_tower"]  # beside the checkpoint
    monkeypatch.chdir(root)  # MGM's own rule: relative to the working directory
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    for f in ckpt.iterdir():
        (elsewhere / f.name).symlink_to(f)
    assert clip in mgm_towers.resolve(d, elsewhere).sources["vision_tower"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(mgm_towers.TowerNotFound) as e:
        mgm_towers.resolve(d, elsewhere)
    message = str(e.value)
    assert f"mm_vision_tower='{CLIP_DIR}' is not a tower MGM knows by name and its directory" in message
    assert str(tmp_path / CLIP_DIR) in message and str(elsewhere.parent / CLIP_DIR) in message
    assert "--towers-root" in message and "--towers checkpoint" in message


def test_unknown_names_are_quoted_as_configured(zoo, tmp_path):
    root, _ = zoo
    d = json.loads((root / "MGM-single" / "config.json").read_text())
    d["mm_vision_tower_aux"] = "model_zoo/Lab/my_convnext_tower"
    with pytest.raises(
        mgm_towers.TowerNotFound,
        match="mm_vision_tower_aux='model_zoo/Lab/my_convnext_tower' is not a tower MGM knows by name",
    ):
        mgm_towers.resolve(d, root / "MGM-single", root=root)
    with pytest.raises(ValueError, match="mm_vision_tower_aux 'model_zoo/Lab/my_convnext_tower' is not a ConvNeXt"):
        MGMConfig.from_hf({**d, "mm_vision_tower": "model_zoo/OpenAI/clip-vit-large-patch14-336"})


def test_hr_tower_names_mgm_routes():
    """Every ConvNeXt MGM builds from a tower path (spec 1.3), without a directory."""
    base = {
        "model_type": "mgm",
        "vocab_size": 32,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "mm_vision_tower": "model_zoo/OpenAI/clip-vit-large-patch14-336",
    }
    want = {
        "openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup": ((192, 384, 768, 1536), (3, 3, 27, 3), 1e-6),
        "openclip-convnext-base-w-320-laion_aesthetic-s13B-b82K": ((128, 256, 512, 1024), (3, 3, 27, 3), 1e-6),
        "openclip-convnext-xxlarge": ((384, 768, 1536, 3072), (3, 4, 30, 3), 1e-5),
    }
    for name, (sizes, depths, eps) in want.items():
        c = MGMConfig.from_hf({**base, "mm_vision_tower_aux": f"model_zoo/OpenAI/{name}"}).vision_aux
        assert (c.hidden_sizes, c.depths, c.block_norm_eps, c.final_norm) == (sizes, depths, eps, False), name


def test_a_missing_tower_is_named(tmp_path):
    """A checkpoint that carries its towers' configs (mgjax's) but lacks one tower's tensors."""
    ref = MGMReference("standard")
    tensors = ref.checkpoint(tmp_path)
    safetensors.torch.save_file(
        {k: v for k, v in tensors.items() if not k.startswith(TOWERS[1])}, tmp_path / "model.safetensors"
    )
    with pytest.raises(
        KeyMismatch,
        match=r"^the checkpoint holds no ConvNeXt tower \(\d+ tensors "
        r"model\.vision_tower_aux\.\* missing\)",
    ):
        mgjax.from_pretrained(tmp_path)


def test_command_lines_take_the_same_route(zoo, tmp_path, monkeypatch, capsys):
    root, ref = zoo
    ckpt = tmp_path / "MGM-7B"
    write_checkpoint(ref, ckpt, sharded=False)
    tokenizer().save_pretrained(ckpt)
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 40, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    monkeypatch.chdir(tmp_path)
    args = ["--model", str(ckpt), "--image", str(tmp_path / "x.png"), "--prompt", "what ?", "--max-new-tokens", "2"]
    assert generate.main(args) == 2
    assert "--towers-root" in capsys.readouterr().err
    assert generate.main([*args, "--towers-root", str(root)]) == 0
    assert "mgm towers: CLIP from" in capsys.readouterr().err
    section = run_config.ModelSection(init="pretrained", path=str(ckpt), towers_root=str(root))
    model, _ = families.MGM().build(section)
    assert model.config.vision_aux.hidden_sizes == (96, 192, 384, 768)
