"""Mini-InternVL's adaptation modes on a tiny InternVL2: what trains, what stays bit-identical, and which
parameters the optimizer keeps state for (and how much)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mgjax
from mgjax.models.decoder import Qwen2Config
from mgjax.models.internvit import InternVisionConfig
from mgjax.models.internvl import InternVLConfig
from mgjax.nn import params
from mgjax.recipes import adapt
from mgjax.train import optim
from mgjax.train.step import make_optimizer, train_step

IMAGE = 5
CONFIG = InternVLConfig(
    vision=InternVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7
    ),
    llm=Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    ),
    image_token_id=IMAGE,
)


def _batch(seed=0, rows=2, length=16):
    rng = np.random.default_rng(seed)
    ids = rng.integers(6, 64, (rows, length))
    ids[:, 1 : 1 + CONFIG.tokens_per_tile] = IMAGE  # one tile per row
    labels = np.where(ids == IMAGE, -100, ids)
    return {
        "input_ids": jnp.asarray(ids[None], jnp.int32),
        "labels": jnp.asarray(labels[None], jnp.int32),
        "pixel_values": jnp.asarray(rng.normal(size=(1, rows, 3, 28, 28)), jnp.float32),
    }


def _params(model, prefix):
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if k[0] == prefix}


def _train(mode: str):
    model = mgjax.init(CONFIG, seed=0)
    m = adapt.prepare(model, mode, rank=4, alpha=8.0)
    before = {p: _params(model, p) for p in ("vision_tower", "multi_modal_projector", "language_model")}
    opt = make_optimizer(model, m.trainable, optim.OptimConfig(lr=1e-2, warmup_ratio=0.0), 100, frozen=m.frozen)
    state = sum(x.nbytes for x in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if x.ndim > 0)
    losses = [float(train_step(model, opt, _batch(seed=i % 2))["loss"]) for i in range(6)]
    changed = {p: any(not np.array_equal(w, _params(model, p)[k]) for k, w in ws.items()) for p, ws in before.items()}
    return losses, changed, state, params.count_params(model, opt.wrt)


@pytest.mark.parametrize(
    "mode, moves",
    [
        ("full", {"vision_tower": True, "multi_modal_projector": True, "language_model": True}),
        ("frozen_vit", {"vision_tower": False, "multi_modal_projector": True, "language_model": True}),
        ("lora", {"vision_tower": False, "multi_modal_projector": False, "language_model": True}),  # its adapters
    ],
)
def test_each_mode_trains_what_it_says_and_keeps_state_for_that_alone(mode, moves):
    losses, changed, state, trainable = _train(mode)
    print(
        f"[adapt] {mode}: {trainable:,} trainable, optimizer state {state:,} B, loss {losses[0]:.3f} -> "
        f"{losses[-1]:.3f}"
    )
    assert losses[-1] < losses[0], losses
    assert state == 2 * 4 * trainable  # Adam's two float32 moments of the trainable parameters, nothing more
    assert changed == moves


def test_an_unknown_mode_is_an_error():
    model = mgjax.init(CONFIG, seed=0)
    with pytest.raises(ValueError, match="adaptation mode must be one of"):
        adapt.prepare(model, "prefix_tuning")
