"""Orbax checkpoints: an interrupted run resumed from a checkpoint ends bit-identical to an uninterrupted one."""

import jax
import numpy as np
from flax import nnx

import mgjax
from mgjax.data import loader, samples
from mgjax.models.decoder import LlamaConfig
from mgjax.train import optim
from mgjax.train.checkpoint import Checkpoints
from mgjax.train.step import make_optimizer, train_step

CONFIG = LlamaConfig(
    vocab_size=50,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
RECORDS = [{"id": str(i)} for i in range(64)]


def _make(record):
    ids = np.random.default_rng(int(record["id"])).integers(0, 50, 12).astype(np.int32)
    return {"input_ids": ids, "labels": ids}


def _run(tmp, steps, *, resume=False, seed=0, save_at=()):
    model = mgjax.init(CONFIG, seed=seed)
    opt = make_optimizer(model, (r".*",), optim.OptimConfig(lr=1e-2, warmup_ratio=0.25), 8)
    batches = loader.Batches(RECORDS, _make, batch=4, micro_batches=2, seed=3, report=samples.BadSamples())
    ckpt = Checkpoints(tmp, keep=2)
    start = 0
    if resume:
        start, state = ckpt.restore(model, opt)
        batches.set_state(state)
    losses = []
    for step in range(start + 1, steps + 1):
        losses.append(float(train_step(model, opt, next(batches))["loss"]))
        if step in save_at:
            ckpt.save(step, model, opt, batches.get_state())
    ckpt.wait()
    ckpt.close()
    return model, losses


def test_resume_is_exact(tmp_path):
    straight, losses = _run(tmp_path / "a", 6, save_at=(1, 2, 3))
    _run(tmp_path / "b", 3, save_at=(1, 2, 3))  # "interrupted" after step 3
    assert sorted(p.name for p in (tmp_path / "b").iterdir() if p.name.isdigit()) == ["2", "3"]  # keep=2
    resumed, rest = _run(tmp_path / "b", 6, resume=True, seed=7)  # a different init: everything comes from disk
    assert rest == losses[3:]
    same = jax.tree.map(
        lambda a, b: bool((a == b).all()), nnx.state(straight, nnx.Param), nnx.state(resumed, nnx.Param)
    )
    assert all(jax.tree.leaves(same))
