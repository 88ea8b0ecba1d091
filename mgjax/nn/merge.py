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
    """``embeds`` [B, T, D] with its image positions (``is_image`` [B, T]) filled from ``features``.

    ``features`` [N, D]: the k-th image position, row-major over the batch, takes row k (transformers'
    ``masked_scatter`` order; InternVL's tiles of all samples concatenated). ``features`` [B, N, D]: each row's
    k-th image position takes its own ``features[b, k]`` (MGM: one image per sample; a text-only row has no
    image positions and ignores its features)."""
    if features.ndim == 3:
        index = jnp.clip(jnp.cumsum(is_image, axis=1) - 1, 0, features.shape[1] - 1)
        picked = jnp.take_along_axis(features, index[..., None], axis=1)
    else:
        index = jnp.clip(jnp.cumsum(is_image.reshape(-1)) - 1, 0, features.shape[0] - 1).reshape(is_image.shape)
        picked = features[index]
    return jnp.where(is_image[..., None], picked.astype(embeds.dtype), embeds)


def check_image_tokens(
    input_ids: jax.Array, token: int, n_features: int, per_row: bool = False, up_to: bool = False
) -> None:
    """Raise if the placeholder count differs from the number of embeddings (``per_row``: each row holds none or
    exactly ``n_features``; ``up_to``: each row at most ``n_features``, its slots past them unused). Checked
    whenever the ids are concrete; under ``jit`` the data pipeline is responsible."""
    if isinstance(input_ids, jax.core.Tracer):
        return
    counts = (np.asarray(input_ids) == token).sum(axis=-1)
    if up_to:
        if counts.max(initial=0) > n_features:
            raise ValueError(
                f"a row holds {int(counts.max())} image placeholder tokens (id {token}) for "
                f"{n_features} embedding slots"
            )
    elif per_row:
        bad = [int(c) for c in counts if c not in (0, n_features)]
        if bad:
            raise ValueError(f"rows hold {bad} image placeholder tokens (id {token}); each needs 0 or {n_features}")
    elif int(counts.sum()) != n_features:
        raise ValueError(
            f"the prompt holds {int(counts.sum())} image placeholder tokens (id {token}) but the "
            f"images give {n_features} embeddings"
        )
