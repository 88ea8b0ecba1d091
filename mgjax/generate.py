"""Greedy decoding with a KV cache: one compiled prefill, one compiled single-token step.

Sampling, stopping criteria and batching across requests belong to the serving work; this is the minimal loop
the demo and tests need. Both functions take the model's (hashable) graphdef as a static argument, so they
compile once per model structure and shape, not once per call.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx


@partial(jax.jit, static_argnums=(0, 3))
def _prefill(graphdef, state, ids, max_len):
    model = nnx.merge(graphdef, state)
    logits, cache = model(ids, cache=model.init_cache(ids.shape[0], max_len))
    return jnp.argmax(logits[:, -1], -1).astype(ids.dtype), cache


@partial(jax.jit, static_argnums=0, donate_argnums=3)  # the cache is updated in place
def _step(graphdef, state, token, cache):
    logits, cache = nnx.merge(graphdef, state)(token[:, None], cache=cache)
    return jnp.argmax(logits[:, -1], -1).astype(token.dtype), cache


def reencode_length(config) -> int | None:
    """The sequence length at which cached keys go stale. LongRoPE (Phi-3) rotates *every* position with its long
    factors once a forward sees more than the original context, so keys cached under the short factors must be
    recomputed; transformers' ``generate`` re-encodes the whole sequence at that point, and so do we."""
    rope = getattr(config, "rope", None)
    if rope is not None and rope.type == "longrope":
        return rope.original_max_position_embeddings + 1
    return None


def greedy(model: nnx.Module, input_ids: jax.Array, max_new_tokens: int) -> jax.Array:
    """Append ``max_new_tokens`` argmax tokens to ``input_ids`` [B, T]; returns [B, T + max_new_tokens]."""
    graphdef, state = nnx.split(model)
    max_len = input_ids.shape[1] + max_new_tokens
    token, cache = _prefill(graphdef, state, input_ids, max_len)
    out = [token]
    restart = reencode_length(model.config)
    for _ in range(max_new_tokens - 1):
        if input_ids.shape[1] + len(out) == restart:
            token, cache = _prefill(graphdef, state, jnp.concatenate([input_ids, jnp.stack(out, 1)], 1), max_len)
        else:
            token, cache = _step(graphdef, state, token, cache)
        out.append(token)
    return jnp.concatenate([input_ids, jnp.stack(out, axis=1)], axis=1)
