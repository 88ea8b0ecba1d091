"""HF ``model_type`` -> the mgjax class that implements it, imported when first asked for (the model modules import
``models.base``, which looks classes up here)."""

from __future__ import annotations

import importlib

from mgjax.convert.safetensors_io import CheckpointError

# HF ``model_type`` -> the mgjax class that implements it.
ARCHITECTURES: dict[str, str] = {
    "llama": "mgjax.models.decoder:LlamaForCausalLM",
    "qwen2": "mgjax.models.decoder:Qwen2ForCausalLM",
    "gemma": "mgjax.models.decoder:GemmaForCausalLM",
    "mixtral": "mgjax.models.decoder:MixtralForCausalLM",
    "phi3": "mgjax.models.decoder:Phi3ForCausalLM",
    "internlm2": "mgjax.models.decoder:InternLM2ForCausalLM",
    "clip_vision_model": "mgjax.models.clip:CLIPVisionModel",
    "clip": "mgjax.models.clip:CLIPVisionModel",  # a full CLIP checkpoint: its vision tower
    "convnext": "mgjax.models.convnext:ConvNextModel",
    "internvl_vision": "mgjax.models.internvit:InternVisionModel",
    "intern_vit_6b": "mgjax.models.internvit:InternVisionModel",  # InternVL's own config for InternViT
    "internvl_chat": "mgjax.models.internvl:InternVLChatModel",  # InternVL's released checkpoints
    "internvl": "mgjax.models.internvl:InternVLChatModel",  # transformers' conversion
    "mgm": "mgjax.models.mgm:MGMForCausalLM",
    "mgm_gemma": "mgjax.models.mgm:MGMForCausalLM",
    "mgm_mixtral": "mgjax.models.mgm:MGMForCausalLM",
    "mini_gemini": "mgjax.models.mgm:MGMForCausalLM",  # MGM's name before its 2024-04 rename
}


def model_class(model_type: str):
    if model_type not in ARCHITECTURES:
        raise CheckpointError(f"model_type {model_type!r} is not supported; supported: {sorted(ARCHITECTURES)}")
    module, name = ARCHITECTURES[model_type].split(":")
    return getattr(importlib.import_module(module), name)
