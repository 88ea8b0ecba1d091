"""The training step on a tiny MGM: stage-1 freezing, loss over target tokens, accumulation, HF's schedule."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import mgjax
from mgjax.models.mgm import MGMConfig
from mgjax.nn import params
from mgjax.train import loss, optim
from mgjax.train.step import make_optimizer, train_step
from tests.helpers import TINY_MGM, tiny_mgm_batch


def _params(model, pattern):
    return {
        params.path_string(p): np.asarray(v.get_value())
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if pattern(p, v) is not None
    }


def test_stage1_trains_projectors_only_and_learns():
    model = mgjax.init(TINY_MGM, seed=0)
    before = {
        params.path_string(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    opt = make_optimizer(model, optim.MGM_STAGE1, optim.OptimConfig(lr=3e-3, warmup_ratio=0.0), total_steps=1000)
    trainable = params.count_params(model, opt.wrt)
    assert 0 < trainable < params.count_params(model) // 2
    # Adam keeps two moments per trainable parameter and nothing for frozen ones
    moments = sum(x.size for x in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if x.ndim > 0)
    assert moments == 2 * trainable
    batch = tiny_mgm_batch()
    losses = [float(train_step(model, opt, batch)["loss"]) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05, losses
    after = {
        params.path_string(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    stage1 = params.trainable(optim.MGM_STAGE1)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = params.path_string(path)
        changed = not np.array_equal(before[name], after[name])
        assert changed == stage1(path, var), name  # frozen parameters stay bit-identical


def test_accumulation_equals_one_big_batch():
    """Two micro-batches of 2 give the update of one batch of 4: the loss is a mean over all target tokens."""
    lr_only = dataclasses.replace(
        TINY_MGM, mining=False
    )  # the arithmetic under test is the model's; a third of the compile
    a, b = mgjax.init(lr_only, seed=0), mgjax.init(lr_only, seed=0)
    cfg = optim.OptimConfig(lr=1e-3, warmup_ratio=0.0)
    opt_a = make_optimizer(a, optim.MGM_STAGE2, cfg, 100)
    opt_b = make_optimizer(b, optim.MGM_STAGE2, cfg, 100)
    whole = tiny_mgm_batch(micro=1, per=4, seed=3)
    split = jax.tree.map(lambda x: x.reshape(2, 2, *x.shape[2:]), whole)
    ma, mb = train_step(a, opt_a, whole), train_step(b, opt_b, split)
    assert int(ma["tokens"]) == int(mb["tokens"]) == 4 * 6
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(ma["grad_norm"]), float(mb["grad_norm"]), rtol=1e-5)
    # Adam's first step is ~lr * sign(g): summation-order noise on near-zero gradients moves a few weights by a
    # fraction of lr (1e-3), so the bound is 2% of it
    diffs = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), nnx.state(a, nnx.Param), nnx.state(b, nnx.Param))
    assert max(jax.tree.leaves(diffs)) < 2e-5


def test_loss_is_cross_entropy_over_shifted_targets():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 7))
    labels = jnp.array([[1, 2, -100, 4, 5], [-100, -100, 3, 3, -100]])
    total, count = loss.next_token_loss(logits, labels)
    ref = torch.nn.functional.cross_entropy(
        torch.from_numpy(np.array(logits[:, :-1])).reshape(-1, 7),
        torch.from_numpy(np.asarray(labels[:, 1:], np.int64)).reshape(-1),
        reduction="sum",
    )
    assert int(count) == 5
    np.testing.assert_allclose(float(total), ref.item(), rtol=1e-6)


@pytest.mark.parametrize("steps", [100, 37, 5])
def test_schedule_is_hf_warmup_cosine(steps):
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2e-5)
    hf = transformers.get_cosine_schedule_with_warmup(opt, math.ceil(steps * 0.03), steps)
    want = []
    for _ in range(steps):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        hf.step()
    got = [float(optim.schedule(optim.OptimConfig(lr=2e-5), steps)(i)) for i in range(steps)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-12)


def test_bf16_compute_keeps_float32_weights_and_remat_changes_nothing():
    """What the release configs run: bf16 compute over f32 parameters and optimizer state, layers rematerialised."""
    batch = tiny_mgm_batch()
    out = {}
    for name, over in {"f32": {}, "remat": {"remat": "full"}, "bf16": {"dtype": jnp.bfloat16}}.items():
        config = MGMConfig.from_hf(TINY_MGM.to_hf(), param_dtype=jnp.float32, **over)
        assert config.llm.remat == config.vision_aux.remat == over.get("remat", "none")
        assert config.llm.dtype == config.vision.dtype == config.vision_aux.dtype == over.get("dtype", jnp.float32)
        model = mgjax.init(dataclasses.replace(config, mining=False), seed=0)  # LR-only: a third of the compile time
        opt = make_optimizer(model, optim.MGM_STAGE2, optim.OptimConfig(lr=1e-3, warmup_ratio=0.0), 10)
        out[name] = train_step(model, opt, batch)
        assert {v.dtype for v in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
        assert {v.dtype for v in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if v.ndim} == {jnp.dtype(jnp.float32)}
    assert abs(float(out["remat"]["loss"]) - float(out["f32"]["loss"])) < 1e-6
    assert abs(float(out["remat"]["grad_norm"]) - float(out["f32"]["grad_norm"])) < 1e-5
    assert abs(float(out["bf16"]["loss"]) - float(out["f32"]["loss"])) < 2e-2 * float(out["f32"]["loss"])


def test_sample_weighted_loss_over_micro_batches(weighting="square"):
    """InternVL's loss_reduction square: each row (one sample) weighs its tokens by 1/sqrt(n), and the step's loss
    is sum(w * ce) / sum(w) over every micro-batch, as the per-row sums give it (the other weightings' arithmetic:
    tests/test_packing.py)."""
    model = mgjax.init(dataclasses.replace(TINY_MGM, mining=False), seed=0)  # LR-only: a third of the compile time
    batch = tiny_mgm_batch(micro=2, per=2, seed=3)
    labels = np.array(batch["labels"])
    labels[0, 0, 18:21] = -100  # rows with different target counts
    labels[1, 1, 18:23] = -100
    batch["labels"] = jnp.asarray(labels)
    sums, counts = [], []
    forward = nnx.jit(lambda m, inputs: m(**inputs)[0])
    for a in range(2):
        for b in range(2):
            row = {k: v[a, b : b + 1] for k, v in batch.items()}
            logits = forward(model, {k: v for k, v in row.items() if k != "labels"})
            total, n = loss.next_token_loss(logits, row["labels"])
            sums.append(float(total))
            counts.append(int(n))
    w = [1 / n if weighting == "sample" else n**-0.5 for n in counts]
    want = sum(wi * si for wi, si in zip(w, sums)) / sum(wi * n for wi, n in zip(w, counts))
    opt = make_optimizer(model, (r".*",), optim.OptimConfig(lr=0.0), total_steps=10)
    got = float(train_step(model, opt, batch, weighting=weighting)["loss"])
    assert abs(got - want) <= 1e-5 * want, (got, want)
