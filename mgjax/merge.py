"""Image embeddings spliced into a token sequence with static shapes.

The prompt already holds one placeholder token per image embedding (InternVL's ``<IMG_CONTEXT>`` runs, MGM's
expanded ``<image>``), so the merge is a gather plus a select: no sequence changes length, and one compiled program
serves every batch of the same shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def merge_image_embeddings(embeds: jax.Array, is_image: jax.Array, features: jax.Array) -> jax.Array:
    """``embeds`` [B, T, D] with the k-th True position of ``is_image`` [B, T] (row-major over the batch)
    replaced by ``features[k]`` ([N, D]); the same order as transformers' ``masked_scatter``."""
    flat = is_image.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat) - 1, 0, features.shape[0] - 1).reshape(is_image.shape)
    return jnp.where(is_image[..., None], features[index].astype(embeds.dtype), embeds)


def check_image_tokens(input_ids: jax.Array, token: int, n_features: int) -> None:
    """Raise if the placeholder count differs from the number of embeddings (checked whenever the ids are
    concrete; under ``jit`` the data pipeline is responsible)."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    count = int((np.asarray(input_ids) == token).sum())
    if count != n_features:
        raise ValueError(f"the prompt holds {count} image placeholder tokens (id {token}) but the images give "
                         f"{n_features} embeddings")
