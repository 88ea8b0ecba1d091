"""The released MGM models (``mgjax.recipes.mgm_releases``) and their run configs (``configs/mgm``): recipes as the
spec's table gives them, and parameter counts that match transformers' own models of the same configs, all abstract."""

import functools
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import pytest
import torch
from flax import nnx
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextModel,
)

from mgjax import config as cfg
from mgjax.models.mgm import MGMForCausalLM
from mgjax.recipes import mgm_releases
from mgjax.train import run_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "mgm"

# Spec section 6.2, row by row: (template, lr, global batch, max length).
SPEC = {
    ("MGM-2B", "stage1"): ("gemma", 1e-3, 256, 2048),
    ("MGM-2B", "stage2"): ("gemma", 2e-5, 128, 2048),
    ("MGM-2B-HD", "stage2"): ("gemma", 2e-5, 128, 4096),
    ("MGM-7B", "stage1"): ("plain", 1e-3, 256, 2048),
    ("MGM-7B", "stage2"): ("v1", 2e-5, 128, 2048),
    ("MGM-7B-HD", "stage2"): ("v1", 2e-5, 128, 4096),
    ("MGM-13B", "stage1"): ("plain", 1e-3, 256, 2048),
    ("MGM-13B", "stage2"): ("v1", 2e-5, 128, 2048),
    ("MGM-13B-HD", "stage2"): ("v1", 2e-5, 128, 4096),
    ("MGM-8B", "stage1"): ("llama_3", 1e-3, 256, 2048),
    ("MGM-8B", "stage2"): ("llama_3", 2e-5, 128, 2048),
    ("MGM-8B-HD", "stage2"): ("llama_3", 2e-5, 128, 4096),
    ("MGM-8x7B", "stage1"): ("plain", 1e-3, 256, 2048),
    ("MGM-8x7B", "stage2"): ("mistral_instruct", 1e-5, 128, 2048),
    ("MGM-8x7B-HD", "stage2"): ("mistral_instruct", 1e-5, 128, 4096),
    ("MGM-34B", "stage1"): ("plain", 1e-3, 256, 2048),
    ("MGM-34B", "stage2"): ("chatml_direct", 1e-5, 128, 2048),
    ("MGM-34B-HD", "stage2"): ("chatml_direct", 1e-5, 128, 4096),
}
RUN_FILES = sorted(CONFIGS.glob("*/*.yaml"))
# The base LLMs' exact sizes as their safetensors checkpoints total them: a check on the config dicts that does not
# go through them.
BASE_LLM_SIZES = {
    "gemma-2b-it": 2_506_172_416,
    "vicuna-7b-v1.5": 6_738_415_616,
    "vicuna-13b-v1.5": 13_015_864_320,
    "Meta-Llama-3-8B-Instruct": 8_030_261_248,
    "Mixtral-8x7B-Instruct-v0.1": 46_702_792_704,
    "Nous-Hermes-2-Yi-34B": 34_388_917_248,
}


def test_recipes_are_the_spec_table():
    got = {
        (name, stage): (r.template, r.lr, r.global_batch, r.max_length)
        for name, stages in mgm_releases.RECIPES.items()
        for stage, r in stages.items()
    }
    assert got == SPEC


def test_there_is_a_run_config_for_every_recipe():
    assert {(p.parent.name, p.stem) for p in RUN_FILES} == set(SPEC)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_base_configs_load(path):
    cfg.load(run_config.RunConfig, path, [])


@pytest.mark.parametrize("path", RUN_FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_run_config_follows_the_recipe(path):
    name, stage = path.parent.name, path.stem
    c = cfg.load(run_config.RunConfig, path, [])
    assert c.model.release == name and name in mgm_releases.NAMES
    assert (c.data.template, c.optim.lr, c.train.global_batch, c.data.max_length) == SPEC[name, stage]
    assert c.train.stage == stage and c.train.out_dir == f"runs/{name}/{stage}"
    assert (c.train.epochs, c.optim.weight_decay, c.optim.warmup_ratio, c.optim.clip_norm) == (1, 0.0, 0.03, 0.0)
    assert (c.model.compute_dtype, c.model.remat, c.checkpoint.keep) == ("bfloat16", "full", 1)
    if stage == "stage1":  # assembled from the parts, images centre-cropped
        assert c.model.init == "parts" and c.model.llm and c.model.vision and c.model.vision_aux
        assert not c.data.pad_to_square and not c.data.group_by_length and c.checkpoint.every == 24000
        assert c.data.path.startswith("data/MGM-Pretrain/")
    else:  # from a stage-1 output (HD: the standard model's), images padded to square
        assert c.model.init == "pretrained"
        assert mgm_releases.release(name).pretrained_from == name.removesuffix("-HD")
        assert c.model.path == f"runs/{mgm_releases.release(name).pretrained_from}/stage1/final"
        assert c.data.pad_to_square and c.data.group_by_length and c.checkpoint.every == 1000
        assert c.data.path.startswith("data/MGM-Finetune/")


def test_hd_fields():
    assert mgm_releases.mgm_fields("MGM-7B") == dict(image_size_aux=768, image_grid=1, image_global=False)
    assert mgm_releases.mgm_fields("MGM-7B-HD") == dict(image_size_aux=1536, image_grid=2, image_global=True)
    assert mgm_releases.config("MGM-7B").tokens_per_image == 576
    assert mgm_releases.config("MGM-7B-HD").tokens_per_image == 2880


def test_unknown_release_names_the_known_ones():
    with pytest.raises(ValueError, match="MGM-34B-HD"):
        mgm_releases.config("MGM-70B")


def test_overrides_reach_every_part():
    c = mgm_releases.config("MGM-8x7B", dtype=jnp.bfloat16, remat="full", image_grid=2, image_global=True)
    assert {x.dtype for x in (c, c.llm, c.vision, c.vision_aux)} == {jnp.bfloat16}
    assert c.llm.remat == "full" and c.views == 5 and c.llm.num_local_experts == 8


@pytest.mark.parametrize("name", mgm_releases.NAMES)
def test_config_round_trips_through_hf_json(name):
    c = mgm_releases.config(name)
    assert type(c).from_hf(c.to_hf()) == c


# ------------------------------------------------------------------------------------------- parameter counts
def _count(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def _torch_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # parameters() yields a tied tensor once


def _hf_llm(name: str) -> int:
    d = mgm_releases.llm_hf_config(name)
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return _torch_count(AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d)))


def _hf_towers() -> tuple[int, int]:
    """transformers' CLIP ViT-L/14-336 whole (MGM's checkpoint and our tree hold its unused post_layernorm too),
    and its ConvNeXt-L less the pooled-output layernorm (MGM keeps only open_clip's stem and stages)."""
    with torch.device("meta"):
        clip = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=1024,
                intermediate_size=4096,
                num_hidden_layers=24,
                num_attention_heads=16,
                image_size=336,
                patch_size=14,
            )
        )
        convnext = ConvNextModel(ConvNextConfig(hidden_sizes=[192, 384, 768, 1536], depths=[3, 3, 27, 3]))
    return _torch_count(clip), _torch_count(convnext) - _torch_count(convnext.layernorm)


def _projectors(width: int, aux: int, d: int) -> int:
    """mlp2x_gelu (CLIP width -> LLM width d -> d) and the mining projections (LayerNorm then Linear: query
    width -> width, keys and values from the concatenated ConvNeXt stages, aux -> width), biases everywhere."""
    mlp = (width * d + d) + (d * d + d)
    return mlp + (2 * width + width * width + width) + 2 * (2 * aux + aux * width + width)


class Counts(NamedTuple):
    llm: int
    clip: int
    convnext: int
    projectors: int

    @property
    def total(self) -> int:
        return sum(self)


@functools.cache
def _ours(name: str) -> tuple[Counts, int]:
    """Our abstract model's counts by part, and of its whole tree."""
    model = nnx.eval_shape(lambda: MGMForCausalLM(mgm_releases.config(name), rngs=nnx.Rngs(0)))
    projectors = sum(
        _count(getattr(model, p))
        for p in ("mm_projector", "vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector")
    )
    parts = Counts(_count(model.language_model), _count(model.vision_tower), _count(model.vision_tower_aux), projectors)
    return parts, _count(model)


@pytest.mark.parametrize("name", mgm_releases.NAMES)
def test_parameter_count_matches_transformers(name):
    c = mgm_releases.config(name)
    reference = Counts(_hf_llm(name), *_hf_towers(), _projectors(1024, 2880, c.llm.hidden_size))
    parts, whole = _ours(name)
    assert parts == reference
    assert parts.llm == BASE_LLM_SIZES[mgm_releases.release(name).llm]
    assert whole == reference.total  # nothing else in the tree


def test_parameter_table():
    """``-s`` prints the table configs/README.md quotes."""
    print(f"\n{'release':12s} {'total':>8s} {'LLM':>8s} {'towers':>8s} {'projectors':>11s}")
    for name in mgm_releases.NAMES:
        n, whole = _ours(name)
        assert whole == n.total
        mark = "" if mgm_releases.release(name).published else " (unreleased)"
        print(
            f"{name:12s} {n.total / 1e9:7.3f}B {n.llm / 1e9:7.3f}B {(n.clip + n.convnext) / 1e9:7.3f}B "
            f"{n.projectors / 1e6:9.2f}M{mark}"
        )
