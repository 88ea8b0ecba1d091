"""LoRA: low-rank adapters on chosen linear layers, trained alone, then merged into plain weights for export.

``add(model, ...)`` gives each ``layers.Linear`` whose path matches ``targets`` two parameters, ``lora_a
[rank, in]`` (uniform in +-1/sqrt(in), as PEFT's Kaiming init) and ``lora_b [out, rank]`` (zeros, so the adapted
model starts as the base model), scaled by ``alpha / rank``. Stacked (scanned) layers get stacked adapters, with
the weight's logical axes, so they shard like it. ``TRAINABLE`` selects them for the optimizer; ``merge`` folds
``W + scale * B @ A`` back into each weight and removes the adapters, after which ``save_pretrained`` writes an
ordinary HF checkpoint.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.nn import layers
from mgjax.nn.params import path_string

# Mini-InternVL's LoRA: every linear layer of the LLM's attention and MLP (not the experts of a MoE)
LLM_LINEARS = (r"(language_model\.)?model\.layers\.(self_attn|mlp)\.\w+",)
TRAINABLE = (r".*\.lora_[ab]",)


def _linears(model: nnx.Module, targets: Sequence[str]):
    compiled = [re.compile(t) for t in targets]
    for path, node in nnx.iter_graph(model):
        if isinstance(node, layers.Linear) and any(p.fullmatch(path_string(path)) for p in compiled):
            yield path_string(path), node


def add(
    model: nnx.Module, *, rank: int = 16, alpha: float = 32.0, targets: Sequence[str] = LLM_LINEARS, seed: int = 0
) -> list[str]:
    """Adapters on the matching linear layers, in place; returns their paths (an error when none match)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, not {rank}")
    found = list(_linears(model, targets))
    if not found:
        raise ValueError(f"no linear layer matches the LoRA targets {list(targets)}")
    key = jax.random.key(seed)
    for i, (_, linear) in enumerate(found):
        w = linear.weight
        *lead, d_out, d_in = w.shape
        *lead_axes, out_axis, in_axis = w.get_metadata()["out_sharding"]
        bound = 1.0 / d_in**0.5
        a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, rank, d_in), w.dtype, -bound, bound)
        linear.lora_a = nnx.Param(a, out_sharding=(*lead_axes, None, in_axis), eager_sharding=False)
        linear.lora_b = nnx.Param(
            jnp.zeros((*lead, d_out, rank), w.dtype), out_sharding=(*lead_axes, out_axis, None), eager_sharding=False
        )
        linear.lora_scale = alpha / rank
    return [name for name, _ in found]


def merge(model: nnx.Module) -> int:
    """Folds every adapter into its weight and removes it, in place; returns how many were merged."""
    merged = 0
    for _, linear in _linears(model, (".*",)):
        if linear.lora_a is None:
            continue
        a, b = linear.lora_a[...].astype(jnp.float32), linear.lora_b[...].astype(jnp.float32)
        delta = linear.lora_scale * jnp.einsum("...or,...ri->...oi", b, a)
        linear.weight[...] = (linear.weight[...].astype(jnp.float32) + delta).astype(linear.weight.dtype)
        linear.lora_a = linear.lora_b = None
        linear.lora_scale = 1.0
        merged += 1
    return merged
