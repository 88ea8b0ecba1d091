"""Mini-InternVL's adaptation modes on a tiny InternVL2: what trains, what stays bit-identical, and which
parameters the optimizer keeps state for (and how much)."""

import jax
import numpy as np
import pytest
from flax import nnx

import mgjax
from mgjax.nn import params
from mgjax.recipes import adapt
from mgjax.train import optim
from mgjax.train.step import make_optimizer, train_step
from tests.helpers import TINY_INTERNVL, tiny_internvl_batch


def _params(model, prefix):
    return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if k[0] == prefix}


def _train(mode: str):
    model = mgjax.init(TINY_INTERNVL, seed=0)
    m = adapt.prepare(model, mode, rank=4, alpha=8.0)
    before = {p: _params(model, p) for p in ("vision_tower", "multi_modal_projector", "language_model")}
    opt = make_optimizer(model, m.trainable, optim.OptimConfig(lr=1e-2, warmup_ratio=0.0), 100, frozen=m.frozen)
    state = sum(x.nbytes for x in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if x.ndim > 0)
    losses = [float(train_step(model, opt, tiny_internvl_batch(seed=i % 2))["loss"]) for i in range(6)]
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
    model = mgjax.init(TINY_INTERNVL, seed=0)
    with pytest.raises(ValueError, match="adaptation mode must be one of"):
        adapt.prepare(model, "prefix_tuning")
