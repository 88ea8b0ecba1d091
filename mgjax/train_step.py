"""The compiled training step: gradient accumulation over micro-batches, the loss averaged over the global batch's
target tokens, an update of the trainable parameters only, and the model and optimizer donated."""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.optim import OptimConfig, adamw, masked_next_token_loss, trainable


def make_optimizer(model: nnx.Module, patterns: Sequence[str], config: OptimConfig, total_steps: int,
                   frozen: Sequence[str] = ()) -> nnx.Optimizer:
    """AdamW over the parameters matching ``patterns`` and not ``frozen`` (the rest get no optimizer state)."""
    return nnx.Optimizer(model, adamw(config, total_steps), wrt=trainable(patterns, frozen))


def _loss(model, batch: dict[str, Any]):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits, _ = model(**inputs)
    return masked_next_token_loss(logits, batch["labels"])


@nnx.jit(donate_argnums=(0, 1))
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """``batch``: the model's keyword inputs plus ``labels``, each with a leading micro-batch axis [A, B, ...].
    Returns the mean loss over target tokens, the token count and the gradient norm."""
    # Functional inside the scan: nnx modules may not be closed over by a raw JAX transform.
    graphdef, params, rest = nnx.split(model, optimizer.wrt, ...)
    grad_fn = jax.value_and_grad(lambda p, mb: _loss(nnx.merge(graphdef, p, rest), mb), has_aux=True)

    def micro(carry, mb):
        grads, loss, count = carry
        (total, n), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, grads, g), loss + total, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss, count), _ = jax.lax.scan(micro, (zeros, 0.0, 0), batch)
    grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1), grads)
    optimizer.update(model, grads)
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return {"loss": loss / jnp.maximum(count, 1), "tokens": count, "grad_norm": norm}
