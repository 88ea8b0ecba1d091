"""Orbax checkpoints: an interrupted run resumed from a checkpoint ends bit-identical to an uninterrupted one."""

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import mgjax
from mgjax.data import loader, samples
from mgjax.models.decoder import LlamaConfig
from mgjax.train import optim
from mgjax.train.checkpoint import CheckpointError, Checkpoints
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


def _truncate(step_dir):
    data = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _flip(step_dir):
    data = max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    raw = bytearray(data.read_bytes())
    for i in range(len(raw) // 3, len(raw) // 3 + 64, 8):
        raw[i] ^= 0x10
    data.write_bytes(bytes(raw))


def _drop_item(step_dir):
    shutil.rmtree(step_dir / "state")


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 2 and 3 saved, and the model after step 2 to compare a restore with."""
    root = tmp_path_factory.mktemp("saved")
    _run(root / "ckpt", 3, save_at=(2, 3))
    model, _ = _run(root / "two", 2)
    return root / "ckpt", nnx.state(model, nnx.Param)


@pytest.mark.parametrize("damage", [_truncate, _flip, _drop_item, _empty])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(saved, tmp_path, capsys, damage):
    """Issue 21: truncated, flipped or missing files in the newest step gave a 145-line traceback."""
    shutil.copytree(saved[0], tmp_path / "c")
    damage(tmp_path / "c" / "3")
    model = mgjax.init(CONFIG, seed=9)
    opt = make_optimizer(model, (r".*",), optim.OptimConfig(lr=1e-2, warmup_ratio=0.25), 8)
    ckpt = Checkpoints(tmp_path / "c", keep=2)
    step, loader_state = ckpt.restore(model, opt)
    ckpt.close()
    assert step == 2 and loader_state["batches"] == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"checkpoint step 3 in {tmp_path / 'c'} does not restore (")
    same = jax.tree.map(lambda a, b: bool((a == b).all()), saved[1], nnx.state(model, nnx.Param))
    assert all(jax.tree.leaves(same))  # step 2 exactly, nothing of the damaged step 3 left in the model


def test_no_restorable_checkpoint_is_one_error_naming_each_step(saved, tmp_path):
    shutil.copytree(saved[0], tmp_path / "c")
    _flip(tmp_path / "c" / "3")
    _drop_item(tmp_path / "c" / "2")
    model = mgjax.init(CONFIG, seed=9)
    opt = make_optimizer(model, (r".*",), optim.OptimConfig(lr=1e-2, warmup_ratio=0.25), 8)
    ckpt = Checkpoints(tmp_path / "c", keep=2)
    with pytest.raises(CheckpointError, match="no checkpoint under .* restores: step 3: .*; step 2: "):
        ckpt.restore(model, opt)
    ckpt.close()
