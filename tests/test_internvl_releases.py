"""The InternVL2 / Mini-InternVL releases (``mgjax.recipes.internvl_releases``): configs and recipes as the spec gives
them, parameter counts against transformers' own InternVL (InternLM2, which transformers lacks, by arithmetic),
and the memory table's trainable sets, all from abstract shapes."""

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, InternVLVisionModel

from mgjax import config as cfg
from mgjax.recipes import internvl_releases as releases
from mgjax.train import run_config

# Spec section 5.4, one row per mode: (lr, global batch, max tiles, max length, drop path, packed tokens,
# loss reduction, LoRA rank, LoRA alpha, weight decay, warmup, clip).
SPEC_RECIPES = {
    "full": (1e-5, 64, 12, 8192, 0.1, 16384, "square", 0, 0.0, 0.01, 0.03, 1.0),
    "frozen_vit": (4e-5, 128, 6, 4096, 0.1, 0, "token", 0, 0.0, 0.01, 0.03, 1.0),
    "lora": (4e-5, 16, 6, 4096, 0.0, 0, "token", 16, 32.0, 0.01, 0.03, 1.0),
}
# Spec section 6.1: template, LLM width, and the LLM's (layers, heads, kv heads, head dim, intermediate, vocab).
SPEC_RELEASES = {
    "InternVL2-1B": ("Hermes-2", 896, (24, 14, 2, 64, 4864, 151655)),
    "InternVL2-2B": ("internlm2-chat", 2048, (24, 16, 8, 128, 8192, 92553)),
    "InternVL2-4B": ("phi3-chat", 3072, (32, 32, 32, 96, 8192, 32020)),
}
IN_TRANSFORMERS = ("InternVL2-1B", "InternVL2-4B")


def test_recipes_are_the_spec_table():
    assert {mode: dataclasses.astuple(r) for mode, r in releases.RECIPES.items()} == SPEC_RECIPES


@pytest.mark.parametrize("name", releases.NAMES)
def test_config_is_the_spec(name):
    template, width, (layers, heads, kv, head_dim, inter, vocab) = SPEC_RELEASES[name]
    d, c = releases.hf_config(name), releases.config(name)
    assert (d["template"], d["downsample_ratio"], d["ps_version"], d["select_layer"], d["max_dynamic_patch"]) == (
        template,
        0.5,
        "v2",
        -1,
        12,
    )
    llm = c.llm
    assert (
        llm.hidden_size,
        llm.num_hidden_layers,
        llm.num_attention_heads,
        llm.num_key_value_heads,
        llm.head_dim,
        llm.intermediate_size,
        llm.vocab_size,
        llm.tie_word_embeddings,
    ) == (width, layers, heads, kv, head_dim, inter, vocab, False)
    v = c.vision
    assert (
        v.hidden_size,
        v.num_hidden_layers,
        v.num_attention_heads,
        v.intermediate_size,
        v.image_size,
        v.patch_size,
        v.attention_bias,
        v.use_qk_norm,
        v.norm_type,
    ) == (1024, 24, 16, 4096, 448, 14, True, False, "layer_norm")
    assert c.tokens_per_tile == 256 and c.template == template and type(c).from_hf(c.to_hf()) == c


def test_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="InternVL2-4B"):
        releases.config("InternVL2-8B")
    with pytest.raises(ValueError, match="frozen_vit"):
        releases.memory("InternVL2-1B", "qlora")


# ------------------------------------------------------------------------------------------- parameter counts
def _torch_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _native(name: str) -> dict:
    """Our release in transformers' native layout: the same config, marked native, writes it."""
    c = releases.config(name)
    return dataclasses.replace(c, native=True, vision=dataclasses.replace(c.vision, original=False)).to_hf()


@functools.cache
def _transformers_vit() -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return _torch_count(InternVLVisionModel(InternVLVisionConfig(**_native("InternVL2-1B")["vision_config"])))


def _transformers_total(name: str) -> int:
    d = _native(name)
    # rotary tables hold no parameters, and the 4B entry leaves LongRoPE's factors to the checkpoint
    text = dict(d["text_config"], rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config = InternVLConfig(
        vision_config=d["vision_config"],
        text_config=text,
        downsample_ratio=d["downsample_ratio"],
        vision_feature_layer=d["vision_feature_layer"],
        projector_hidden_act=d["projector_hidden_act"],
        tie_word_embeddings=d["tie_word_embeddings"],
    )
    with torch.device("meta"):
        return _torch_count(InternVLForConditionalGeneration(config))


@pytest.mark.parametrize("name", IN_TRANSFORMERS)
def test_parameter_count_matches_transformers(name):
    assert releases.memory(name, "full")["params"] == _transformers_total(name)


def _projector(d: int) -> int:
    """LayerNorm(4096) -> Linear(4096, d) -> GELU -> Linear(d, d), biases everywhere."""
    return 2 * 4096 + (4096 * d + d) + (d * d + d)


def _internlm2(vocab, d, layers, heads, kv, head_dim, inter) -> int:
    """InternLM2 in its own checkpoint names: packed wqkv, wo, w1/w3/w2, two norms a layer, no biases; final norm,
    tok_embeddings and an untied output head."""
    per_layer = (heads + 2 * kv) * head_dim * d + heads * head_dim * d + 3 * d * inter + 2 * d
    return 2 * vocab * d + d + layers * per_layer


def test_internvl2_2b_count_is_its_arithmetic():
    _, d, (layers, heads, kv, head_dim, inter, vocab) = SPEC_RELEASES["InternVL2-2B"]
    llm = _internlm2(vocab, d, layers, heads, kv, head_dim, inter)
    total = releases.memory("InternVL2-2B", "full")["params"]
    assert total == _transformers_vit() + _projector(d) + llm
    assert round(total / 1e9, 1) == 2.2  # the model card's size


def _lora(name: str, rank: int) -> int:
    """rank * (in + out) for each of q, k, v, o, gate, up and down, in every LLM layer."""
    _, d, (layers, heads, kv, head_dim, inter, _) = SPEC_RELEASES[name]
    shapes = [
        (d, heads * head_dim),
        (d, kv * head_dim),
        (d, kv * head_dim),
        (heads * head_dim, d),
        (d, inter),
        (d, inter),
        (inter, d),
    ]
    return layers * sum(rank * (i + o) for i, o in shapes)


@pytest.mark.parametrize("name", releases.NAMES)
def test_trainable_sets(name):
    full, frozen, lora = (releases.memory(name, mode) for mode in ("full", "frozen_vit", "lora"))
    assert full["trainable"] == full["params"]
    assert frozen["trainable"] == frozen["params"] - _transformers_vit()
    assert lora["trainable"] == _lora(name, releases.RECIPES["lora"].lora_rank)
    assert lora["params"] == full["params"] + lora["trainable"]  # the adapters are all it adds


def test_memory_table_is_consistent():
    rows = list(releases.table())
    assert [(r["release"], r["mode"]) for r in rows] == [(n, m) for n in releases.NAMES for m in releases.MODES]
    for name in releases.NAMES:
        by_mode = {r["mode"]: r for r in rows if r["release"] == name}
        assert by_mode["full"]["bytes"] > by_mode["frozen_vit"]["bytes"] > by_mode["lora"]["bytes"]
        for r in by_mode.values():
            assert r["gradient_bytes"] == 4 * r["trainable"] and r["optimizer_bytes"] == 8 * r["trainable"]
            assert r["bytes"] == r["gradient_bytes"] + r["optimizer_bytes"]
            assert r["saving_bytes"] == by_mode["full"]["bytes"] - r["bytes"]


CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "internvl"


@pytest.mark.parametrize("mode", releases.MODES)
@pytest.mark.parametrize("name", releases.NAMES)
def test_run_configs_follow_the_recipes(name, mode):
    """configs/internvl/<release>/<mode>.yaml: the recipe's numbers and the release's template, loadable."""
    c = cfg.load(run_config.RunConfig, CONFIGS / name / f"{mode}.yaml", [])
    r = releases.recipe(mode)
    assert (c.model.family, c.model.init, c.model.path) == ("internvl", "pretrained", f"checkpoints/{name}")
    assert (c.model.compute_dtype, c.model.remat, c.train.stage) == ("bfloat16", "full", mode)
    assert c.data.template == releases.release(name).template
    assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_ratio, c.optim.clip_norm) == (
        r.lr,
        r.weight_decay,
        r.warmup_ratio,
        r.clip_norm,
    )
    assert (c.train.global_batch, c.data.max_dynamic_patch, c.data.max_length, c.data.pack_length) == (
        r.global_batch,
        r.max_tiles,
        r.max_length,
        r.packed_tokens,
    )
    assert c.train.loss_weighting == r.loss_reduction
    if r.lora_rank:
        assert (c.train.lora_rank, c.train.lora_alpha) == (r.lora_rank, r.lora_alpha)
    assert c.train.out_dir == f"runs/{name}/{mode}"
