"""How the trainable parameters train: AdamW with HF's warmup+cosine, and the next-token losses. Which parameters
train is chosen by regex over their HF-style paths (``mgjax.nn.params.trainable``); frozen parameters get no
optimizer state at all (the optimizer is built over the trainable subset only), which is where most of the memory
of a frozen tower would otherwise go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

# MGM's stages (spec section 6.1): stage 1 trains the projector and the mining projections; stage 2 adds the LLM.
MGM_STAGE1 = (r"mm_projector\..*", r"vlm_uni_\w+_projector\..*")
MGM_STAGE2 = MGM_STAGE1 + (r"language_model\..*",)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW as HF Trainer builds it (betas 0.9/0.999, eps 1e-8) with linear warmup over ``ceil(warmup_ratio *
    steps)`` steps from 0, then a half cosine to 0. ``clip_norm`` 0 disables clipping (MGM ran without)."""

    lr: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 0.0


def schedule(c: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = math.ceil(total_steps * c.warmup_ratio)  # HF's rounding, float noise included
    return optax.warmup_cosine_decay_schedule(0.0, c.lr, warmup, max(total_steps, warmup + 1), 0.0)


def adamw(c: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    tx = optax.adamw(schedule(c, total_steps), b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    return optax.chain(optax.clip_by_global_norm(c.clip_norm), tx) if c.clip_norm > 0 else tx


def masked_next_token_loss(logits: jax.Array, labels: jax.Array, ignore: int = -100) -> tuple[jax.Array, jax.Array]:
    """Summed next-token cross-entropy over positions whose *next* label is not ``ignore``, and their count, so
    a caller can average over the global batch's target tokens (not a mean of per-device means)."""
    target = labels[:, 1:]
    valid = target != ignore
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, target, 0)[..., None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(valid, picked, 0.0)), jnp.sum(valid)


LOSS_WEIGHTS = ("token", "sample", "square")


def packed_next_token_loss(
    logits: jax.Array, labels: jax.Array, segment_ids: jax.Array, weighting: str = "token", ignore: int = -100
) -> tuple[jax.Array, jax.Array]:
    """For packed rows: the summed weighted next-token cross-entropy and the summed weights (so a caller can
    average over the global batch as ``sum / weights``). A target across a segment boundary never counts. Each
    sample's supervised tokens weigh 1 (``token``), 1/n (``sample``) or 1/sqrt(n) (``square``, InternVL's
    ``loss_reduction square``), n = that sample's supervised token count."""
    if weighting not in LOSS_WEIGHTS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTS}, not {weighting!r}")
    seg = segment_ids[:, 1:]
    valid = (labels[:, 1:] != ignore) & (seg == segment_ids[:, :-1])
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    ce = -jnp.take_along_axis(logp, jnp.where(valid, labels[:, 1:], 0)[..., None], axis=-1)[..., 0]
    # each token's sample size: the count of valid targets sharing its segment id in its row
    n = jnp.sum(valid[:, None, :] & (seg[:, :, None] == seg[:, None, :]), axis=-1)
    w = {
        "token": jnp.ones_like(ce),
        "sample": 1.0 / jnp.maximum(n, 1),
        "square": jax.lax.rsqrt(jnp.maximum(n, 1).astype(jnp.float32)),
    }[weighting]
    w = jnp.where(valid, w, 0.0)
    return jnp.sum(w * ce), jnp.sum(w)
