"""Greedy decoding with a KV cache: one compiled prefill, one compiled single-token step.

Sampling, stopping criteria and batching across requests belong to the serving work; this is the minimal loop
the demo and tests need.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def greedy(model: nnx.Module, input_ids: jax.Array, max_new_tokens: int) -> jax.Array:
    """Append ``max_new_tokens`` argmax tokens to ``input_ids`` [B, T]; returns [B, T + max_new_tokens]."""
    b, t = input_ids.shape
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, ids):
        m = nnx.merge(graphdef, state)
        logits, cache = m(ids, cache=m.init_cache(b, t + max_new_tokens))
        return jnp.argmax(logits[:, -1], -1).astype(ids.dtype), cache

    @jax.jit
    def step(state, token, cache):
        logits, cache = nnx.merge(graphdef, state)(token[:, None], cache=cache)
        return jnp.argmax(logits[:, -1], -1).astype(token.dtype), cache

    token, cache = prefill(state, input_ids)
    out = [token]
    for _ in range(max_new_tokens - 1):
        token, cache = step(state, token, cache)
        out.append(token)
    return jnp.concatenate([input_ids, jnp.stack(out, axis=1)], axis=1)
