"""How the trainable parameters train: AdamW with HF's warmup+cosine (the losses are in ``loss.py``). Which parameters
train is chosen by regex over their HF-style paths (``mgjax.nn.params.trainable``); frozen parameters get no
optimizer state at all (the optimizer is built over the trainable subset only), which is where most of the memory
of a frozen tower would otherwise go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import optax

# MGM's stages (spec section 6.1): stage 1 trains the projector and the mining projections; stage 2 adds the LLM.
MGM_STAGE1 = (r"mm_projector\..*", r"vlm_uni_\w+_projector\..*")
MGM_STAGE2 = MGM_STAGE1 + (r"language_model\..*",)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW as HF Trainer builds it (betas 0.9/0.999, eps 1e-8) with linear warmup over ``ceil(warmup_ratio *
    steps)`` steps from 0, then a half cosine to 0. ``clip_norm`` 0 disables clipping (MGM ran without)."""

    lr: float = field(default=2e-5, metadata={"min": 0})
    warmup_ratio: float = field(default=0.03, metadata={"min": 0, "max": 1})
    weight_decay: float = field(default=0.0, metadata={"min": 0})
    b1: float = field(default=0.9, metadata={"min": 0, "max": 1})
    b2: float = field(default=0.999, metadata={"min": 0, "max": 1})
    eps: float = field(default=1e-8, metadata={"min": 0})
    clip_norm: float = field(default=0.0, metadata={"min": 0})


def schedule(c: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = math.ceil(total_steps * c.warmup_ratio)  # HF's rounding, float noise included
    return optax.warmup_cosine_decay_schedule(0.0, c.lr, warmup, max(total_steps, warmup + 1), 0.0)


def adamw(c: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    tx = optax.adamw(schedule(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    return optax.chain(optax.clip_by_global_norm(c.clip_norm), tx) if c.clip_norm > 0 else tx
