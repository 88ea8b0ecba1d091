"""Packed rows (several samples in one sequence, segment ids): each sample's loss equals its loss unpacked, and
InternVL's loss weightings (token, sample, square) follow from the per-sample sums."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

import mgjax
from mgjax.data import packing
from mgjax.models.decoder import Qwen2Config, segment_positions
from mgjax.train import loss

CONFIG = Qwen2Config(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
LENGTHS = (7, 9, 5)


def _samples(seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in LENGTHS:
        ids = rng.integers(0, 64, n)
        labels = ids.copy()
        labels[: n // 3] = -100  # a prompt that is not trained
        out.append((ids, labels))
    return out


def _packed(samples, pad=3):
    ids = np.concatenate([s[0] for s in samples] + [np.zeros(pad, int)])
    labels = np.concatenate([s[1] for s in samples] + [np.full(pad, -100)])
    seg = np.concatenate([np.full(len(s[0]), i + 1) for i, s in enumerate(samples)] + [np.zeros(pad, int)])
    return (jnp.asarray(ids[None], jnp.int32), jnp.asarray(labels[None], jnp.int32), jnp.asarray(seg[None], jnp.int32))


def test_segment_positions_restart_per_sample():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1]]


def test_each_packed_sample_has_its_unpacked_loss():
    model = mgjax.init(CONFIG, seed=0)
    samples = _samples()
    ids, labels, seg = _packed(samples)
    logits, _ = model(ids, segment_ids=seg)
    for i, (s_ids, s_labels) in enumerate(samples):
        alone, _ = model(jnp.asarray(s_ids[None], jnp.int32))
        want, n = loss.next_token_loss(alone, jnp.asarray(s_labels[None], jnp.int32))
        got, m = loss.next_token_loss(logits, jnp.where(seg == i + 1, labels, -100), seg)  # sample i alone
        assert int(m) == int(n) > 0
        assert abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want))), (i, float(got), float(want))


@pytest.mark.parametrize("weighting", ["token", "sample", "square"])
def test_loss_weightings_follow_the_per_sample_sums(weighting):
    model = mgjax.init(CONFIG, seed=0)
    samples = _samples(seed=1)
    sums, counts = [], []
    for s_ids, s_labels in samples:
        alone, _ = model(jnp.asarray(s_ids[None], jnp.int32))
        total, n = loss.next_token_loss(alone, jnp.asarray(s_labels[None], jnp.int32))
        sums.append(float(total))
        counts.append(int(n))
    w = {"token": [1.0] * 3, "sample": [1 / n for n in counts], "square": [n**-0.5 for n in counts]}[weighting]
    want = sum(wi * si for wi, si in zip(w, sums)) / sum(wi * n for wi, n in zip(w, counts))
    ids, labels, seg = _packed(samples)
    logits, _ = model(ids, segment_ids=seg)
    total, weights = loss.next_token_loss(logits, labels, seg, weighting)
    assert abs(float(total / weights) - want) <= 1e-5 * max(1.0, want)
    with pytest.raises(ValueError, match="loss weighting must be one of"):
        loss.next_token_loss(logits, labels, seg, "mean")


@pytest.fixture(scope="module")
def grounding(tmp_path_factory):
    """Tiny InternVL demo samples (images as dynamic tiles) and a random model to run them."""
    from mgjax.data import samples
    from mgjax.demo import grounding_task

    root = tmp_path_factory.mktemp("grounding")
    domain, _, _ = grounding_task.write_dataset(root, n_train=8, n_eval=1)
    tok = grounding_task.tokenizer()
    model = mgjax.init(grounding_task.model_config(tok.convert_tokens_to_ids("<IMG_CONTEXT>")), seed=0)
    make = samples.InternVLSamples(
        model.config,
        tok,
        grounding_task.TEMPLATE,
        str(root),
        max_length=128,
        max_dynamic_patch=grounding_task.MAX_DYNAMIC_PATCH,
        tile_slots=5,
    )
    records = [json.loads(line) for line in (root / "domain.jsonl").read_text().splitlines()]
    return model, [make(r) for r in records[:3]]


def test_packed_internvl_samples_keep_their_tiles_and_losses(grounding):
    """Three samples with their images in one packed row: each sample's loss equals its loss alone (<= 1e-5)."""
    model, built = grounding
    row = next(packing.Packer(iter(built), length=384, tiles=15))
    assert int(row["samples"]) == 3 and int(row["tiles"]) == 15
    lengths = [int(s["attention_mask"].sum()) for s in built]
    assert np.bincount(row["segment_ids"])[1:].tolist() == lengths
    logits, _ = model(
        jnp.asarray(row["input_ids"][None]),
        jnp.asarray(row["pixel_values"][None]),
        segment_ids=jnp.asarray(row["segment_ids"][None]),
    )
    for k, s in enumerate(built, 1):
        alone, _ = model(jnp.asarray(s["input_ids"][None]), jnp.asarray(s["pixel_values"][None]))
        want, n = loss.next_token_loss(alone, jnp.asarray(s["labels"][None]))
        mine = jnp.where(jnp.asarray(row["segment_ids"][None]) == k, jnp.asarray(row["labels"][None]), -100)
        got, m = loss.next_token_loss(logits, mine, jnp.asarray(row["segment_ids"][None]))
        assert int(m) == int(n) > 0
        assert abs(float(got) - float(want)) <= 1e-5 * max(1.0, abs(float(want))), (k, float(got), float(want))


def test_packer_closes_a_row_at_the_token_or_tile_limit(grounding):
    _, built = grounding
    n = int(built[0]["attention_mask"].sum())
    by_tokens = packing.Packer(iter(built), length=2 * n + 1, tiles=99)
    assert [int(r["samples"]) for r in by_tokens] == [2, 1]
    by_tiles = packing.Packer(iter(built), length=1000, tiles=10)  # 5 tiles a sample
    first = next(by_tiles)
    assert int(first["samples"]) == 2 and by_tiles.pending is built[2]
    with pytest.raises(ValueError, match="cannot fit a packed row"):
        next(packing.Packer(iter(built), length=n - 1, tiles=99))
