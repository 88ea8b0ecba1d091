"""LoRA adapters: trained alone (the base weights stay bit-identical, optimizer state only for the adapters), and
merged into a plain HF checkpoint that PyTorch's transformers loads with the adapted model's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import mgjax
from mgjax.models.decoder import LlamaConfig
from mgjax.nn import lora, params
from mgjax.train import optim
from mgjax.train.step import make_optimizer, train_step
from tests.helpers import max_abs

CONFIG = LlamaConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)


def _ids(seed=0, batch=2, length=12):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CONFIG.vocab_size, (batch, length)), jnp.int32)


def _adapted(rank=4, alpha=8.0):
    model = mgjax.init(CONFIG, seed=0)
    names = lora.add(model, rank=rank, alpha=alpha)
    # a trained adapter is not zero: give B values so the adapters change the logits
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, lambda p, v: p[-1] == "lora_b"))):
        var[...] = 0.05 * jax.random.normal(jax.random.key(i), var.shape)
    return model, names


def test_adapters_sit_on_every_attention_and_mlp_linear_and_start_as_the_base_model():
    base = mgjax.init(CONFIG, seed=0)
    model = mgjax.init(CONFIG, seed=0)
    names = lora.add(model, rank=4, alpha=8.0)
    assert sorted(n.rsplit(".", 1)[1] for n in names) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    a = model.model.layers.self_attn.q_proj.lora_a
    assert a.shape == (2, 4, 64) and a.get_metadata()["out_sharding"] == ("layers", None, "embed")
    ids = _ids()
    assert max_abs(model(ids)[0], base(ids)[0]) == 0.0  # B starts at zero
    with pytest.raises(ValueError, match="no linear layer matches"):
        lora.add(model, targets=(r"vision_model\..*",))


def test_merged_export_loads_in_transformers_with_the_adapted_logits(tmp_path, report):
    model, _ = _adapted()
    ids = _ids()
    adapted = model(ids)[0]
    assert max_abs(adapted, mgjax.init(CONFIG, seed=0)(ids)[0]) > 1e-3  # the adapters matter
    assert lora.merge(model) == 7  # the stacked linears, each holding both layers
    report("LoRA merged vs adapted logits", max_abs(model(ids)[0], adapted), 1e-4)
    mgjax.save_pretrained(model, tmp_path)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        want = torch_model(torch.as_tensor(np.asarray(ids))).logits.numpy()
    report("LoRA merged export in transformers vs adapted logits", max_abs(want, adapted), 1e-4)


def test_training_moves_only_the_adapters_and_keeps_state_for_them_alone():
    model, _ = _adapted()
    base = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "lora" not in k[-1]}
    opt = make_optimizer(model, lora.TRAINABLE, optim.OptimConfig(lr=1e-2, warmup_ratio=0.0), 100)
    moments = sum(x.size for x in jax.tree.leaves(nnx.state(opt, nnx.OptState)) if x.ndim > 0)
    adapters = params.count_params(model, opt.wrt)
    full = params.count_params(model) - adapters
    assert moments == 2 * adapters and adapters < full / 5
    ids = _ids(seed=3, batch=4)
    batch = {"input_ids": ids[None], "labels": ids[None]}
    losses = [float(train_step(model, opt, batch)["loss"]) for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05, losses
    after = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param)) if "lora" not in k[-1]}
    assert all(np.array_equal(base[k], after[k]) for k in base)
