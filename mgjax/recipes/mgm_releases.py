"""The released MGM models (``YanweiLi/MGM-*``) as data: each base LLM's ``config.json``, MGM's fields over it, and
the training recipe of every stage (spec sections 6.2, 7.2, 7.3).

``config("MGM-7B-HD", dtype=jnp.bfloat16)`` builds the architecture without any file; ``mgm_fields`` gives what an
HD stage-2 run sets over the standard stage-1 checkpoint it starts from; ``RECIPES`` has the per-stage template,
learning rate, global batch and maximum length of MGM's scripts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

from mgjax.models.mgm import MGMConfig

# The base LLMs' config.json, as published, keeping only the fields that shape the network (token ids and the
# like come with the tokenizer).
_LLAMA = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    hidden_act="silu",
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
LLMS: dict[str, dict[str, Any]] = {
    "gemma-2b-it": dict(
        architectures=["GemmaForCausalLM"],
        model_type="gemma",
        vocab_size=256000,
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
        hidden_act="gelu",
        hidden_activation="gelu_pytorch_tanh",
        rope_theta=10000.0,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        attention_bias=False,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
    ),
    "vicuna-7b-v1.5": dict(
        _LLAMA,
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        torch_dtype="float16",
    ),
    "vicuna-13b-v1.5": dict(
        _LLAMA,
        vocab_size=32000,
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        torch_dtype="float16",
    ),
    "Meta-Llama-3-8B-Instruct": dict(
        _LLAMA,
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rope_theta=500000.0,
        max_position_embeddings=8192,
        torch_dtype="bfloat16",
    ),
    "Mixtral-8x7B-Instruct-v0.1": dict(
        architectures=["MixtralForCausalLM"],
        model_type="mixtral",
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        hidden_act="silu",
        rope_theta=1e6,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
    "Nous-Hermes-2-Yi-34B": dict(  # Yi ships in Llama's architecture
        _LLAMA,
        vocab_size=64000,
        hidden_size=7168,
        intermediate_size=20480,
        num_hidden_layers=60,
        num_attention_heads=56,
        num_key_value_heads=8,
        rope_theta=5e6,
        max_position_embeddings=4096,
        torch_dtype="bfloat16",
    ),
}

# MGM's model_type and class per LLM family (spec 4.1): Vicuna, Llama-3 and Yi all go through MGMLlama.
FAMILY = {
    "llama": ("mgm", "MGMLlamaForCausalLM"),
    "gemma": ("mgm_gemma", "MGMGemmaForCausalLM"),
    "mixtral": ("mgm_mixtral", "MGMMixtralForCausalLM"),
}

# What MGM writes into every config.json (spec 7.2); the towers are named by the local paths its scripts use.
MGM_COMMON: dict[str, Any] = dict(
    mm_vision_tower="model_zoo/OpenAI/clip-vit-large-patch14-336",
    mm_vision_tower_aux="model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
    mm_hidden_size=1024,
    mm_hidden_size_aux=2880,
    mm_projector_type="mlp2x_gelu",
    mm_vision_select_layer=-2,
    mm_vision_select_feature="patch",
    use_mm_proj=True,
    image_aspect_ratio="pad",
    image_grid_pinpoints=None,
    mm_use_im_start_end=False,
    mm_use_im_patch_token=False,
    tokenizer_padding_side="right",
    use_cache=True,
)

# The fields that differ between a standard and an HD model, besides the maximum length.
STANDARD = dict(image_size_aux=768, image_grid=1, image_global=False)
HD = dict(image_size_aux=1536, image_grid=2, image_global=True)


@dataclass(frozen=True)
class Recipe:
    """One training stage as MGM's script runs it (spec 6.2); every stage is one epoch, AdamW without weight
    decay, 3% warmup and a cosine decay."""

    template: str
    lr: float
    global_batch: int
    max_length: int


def _stage1(template: str) -> Recipe:
    return Recipe(template, 1e-3, 256, 2048)


def _stage2(template: str, lr: float = 2e-5, hd: bool = False) -> Recipe:
    return Recipe(template, lr, 128, 4096 if hd else 2048)


@dataclass(frozen=True)
class Release:
    """``stages``: the recipes the scripts have. HD models have no stage 1 of their own: their stage 2 starts from
    the standard model's stage-1 projectors (``pretrained_from``), whose 8x8 mining windows are the same."""

    llm: str
    hd: bool
    stages: Mapping[str, Recipe]
    pretrained_from: str
    published: bool = True


def _pair(
    name: str, llm: str, stage1: str, stage2: str, lr2: float = 2e-5, hd_published: bool = True
) -> dict[str, Release]:
    return {
        name: Release(llm, False, {"stage1": _stage1(stage1), "stage2": _stage2(stage2, lr2)}, name),
        f"{name}-HD": Release(llm, True, {"stage2": _stage2(stage2, lr2, hd=True)}, name, hd_published),
    }


RELEASES: dict[str, Release] = {
    # MGM-2B-HD has a training script but was never released; kept so its recipe can be run
    **_pair("MGM-2B", "gemma-2b-it", "gemma", "gemma", hd_published=False),
    **_pair("MGM-7B", "vicuna-7b-v1.5", "plain", "v1"),
    **_pair("MGM-13B", "vicuna-13b-v1.5", "plain", "v1"),
    **_pair("MGM-8B", "Meta-Llama-3-8B-Instruct", "llama_3", "llama_3"),
    **_pair("MGM-8x7B", "Mixtral-8x7B-Instruct-v0.1", "plain", "mistral_instruct", lr2=1e-5),
    **_pair("MGM-34B", "Nous-Hermes-2-Yi-34B", "plain", "chatml_direct", lr2=1e-5),
}
NAMES: tuple[str, ...] = tuple(RELEASES)
RECIPES: dict[str, Mapping[str, Recipe]] = {name: r.stages for name, r in RELEASES.items()}


def release(name: str) -> Release:
    if name not in RELEASES:
        raise ValueError(f"unknown MGM release {name!r}; known: {', '.join(NAMES)}")
    return RELEASES[name]


def llm_hf_config(name: str) -> dict[str, Any]:
    """The base LLM's ``config.json`` of a release (a fresh copy)."""
    return copy.deepcopy(LLMS[release(name).llm])


def mgm_fields(name: str) -> dict[str, Any]:
    """``image_size_aux``, ``image_grid`` and ``image_global`` of a release: what MGMConfig takes as overrides."""
    return dict(HD if release(name).hd else STANDARD)


def hf_config(name: str) -> dict[str, Any]:
    """The release's ``config.json`` as MGM writes it: the base LLM's, with MGM's fields over it."""
    r = release(name)
    llm = llm_hf_config(name)
    model_type, architecture = FAMILY[llm["model_type"]]
    return {
        **llm,
        **copy.deepcopy(MGM_COMMON),
        **mgm_fields(name),
        "model_type": model_type,
        "architectures": [architecture],
        "tokenizer_model_max_length": r.stages["stage2"].max_length,
    }


def config(name: str, **overrides) -> MGMConfig:
    """The release's MGMConfig; ``overrides`` as ``MGMConfig.from_hf`` takes them (dtype, param_dtype, remat and
    MGM's own fields)."""
    return MGMConfig.from_hf(hf_config(name), **overrides)
