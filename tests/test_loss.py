"""The chunked LM head + loss equals the full-logits loss, values and gradients, for every weighting and packing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mgjax.train import loss

B, T, D, V = 2, 37, 16, 50  # 37 positions: no chunk size below divides them


def _case(seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (B, T, D))
    w = jax.random.normal(keys[1], (V, D)) * 0.5
    labels = jax.random.randint(keys[2], (B, T), 0, V)
    labels = jnp.where(jax.random.uniform(keys[3], (B, T)) < 0.3, loss.IGNORE, labels)
    segments = jnp.asarray(np.repeat([[1, 2, 3, 0], [1, 1, 2, 0]], [12, 10, 11, 4], axis=1))
    return hidden, w, labels, segments


@pytest.mark.parametrize("weighting", loss.LOSS_WEIGHTS)
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("chunk", [5, 16, 64])
def test_chunked_loss_and_gradients_equal_the_full_logits(weighting, packed, chunk):
    hidden, w, labels, segments = _case()
    seg = segments if packed else None

    def full(h, w):
        return loss.next_token_loss(jnp.einsum("btd,vd->btv", h, w), labels, seg, weighting)

    def chunked(h, w):
        return loss.chunked_next_token_loss(
            h, lambda x: jnp.einsum("...d,vd->...v", x, w), labels, seg, weighting, chunk
        )

    (want, n_want), g_want = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, w)
    (got, n_got), g_got = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, w)
    assert float(n_got) == pytest.approx(float(n_want), rel=1e-6)
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))
    for a, b in zip(g_want, g_got):
        assert float(jnp.max(jnp.abs(a - b))) <= 1e-6 * float(jnp.max(jnp.abs(a)))


def test_weights_count_each_packed_sample_by_its_own_targets():
    labels = jnp.asarray([[5, 6, 7, 8, 9, 1, 2, 3]])
    segments = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 0]])
    targets, w = loss.target_weights(labels, segments, "sample")
    # sample 1 predicts 6, 7, 8 (3 targets); sample 2 predicts 1, 2 (its last position crosses into padding)
    np.testing.assert_allclose(w[0], [1 / 3, 1 / 3, 1 / 3, 0, 0.5, 0.5, 0, 0], rtol=1e-6)
    assert targets[0, :3].tolist() == [6, 7, 8]


def test_unknown_weighting_is_refused():
    with pytest.raises(ValueError, match="loss weighting must be one of"):
        loss.target_weights(jnp.zeros((1, 4), jnp.int32), None, "mean")


def test_auto_chunk_keeps_a_chunks_logits_under_the_budget():
    assert loss.auto_chunk(rows=16, vocab=256_000) == 16  # 16 x 16 x 256000 x 4 B = 250 MiB
    assert loss.auto_chunk(rows=1, vocab=32_000) == 2048
    assert loss.auto_chunk(rows=1024, vocab=256_000) == 16  # never below 16
