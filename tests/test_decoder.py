"""Decoder parity (Llama family, Qwen2, Gemma, Mixtral, Phi-3) against transformers, computed in the test from tiny
random models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from flax import nnx

import mgjax
from mgjax.convert.safetensors_io import CheckpointError
from mgjax.inference import decoding
from mgjax.nn import layers
from tests.helpers import max_abs

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8,
}
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
}
# head_dim 16 -> 8 factors; switch at 16 positions, factor 64 / 16 = 4 -> cos/sin scaled by sqrt(1.5)
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0, 1.02, 1.05, 1.1, 1.2, 1.3, 1.5, 1.7],
    "long_factor": [1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 8.0, 12.0],
}
PHI3_IDS = {"pad_token_id": 0, "eos_token_id": 2, "bos_token_id": 1}  # Phi-3's defaults lie past a tiny vocab
VARIANTS = {
    # name: (family, num_key_value_heads, rope_scaling, tie_word_embeddings, extra config)
    "llama2_mha": ("llama", 4, None, False, {}),
    "gqa_llama3_rope": ("llama", 2, LLAMA3_ROPE, False, {}),
    "gqa_tied": ("llama", 1, None, True, {}),
    "qwen2_untied": ("qwen2", 2, None, False, {}),  # InternVL2's Qwen2 head is untied
    "gemma_mqa": ("gemma", 1, None, True, {"head_dim": 24}),  # head_dim independent of hidden / heads
    "mixtral_top2": ("mixtral", 2, None, False, {"num_local_experts": 4, "num_experts_per_tok": 2}),
    # Phi-3: the standard 19-token inputs cross the switch at 16 (long factors); cached decoding stays below it
    "phi3_longrope": ("phi3", 2, LONGROPE, False, {"original_max_position_embeddings": 16, **PHI3_IDS}),
    "phi3_sliding": ("phi3", 4, None, False, {"sliding_window": 6, **PHI3_IDS}),
}


def _hf_model(family, kv_heads, rope_scaling, tied, extra, seed=0):
    torch.manual_seed(seed)
    config_cls, model_cls = FAMILIES[family]
    cfg = config_cls(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        rope_theta=500000.0 if rope_scaling else 10000.0,
        rope_scaling=rope_scaling,
        tie_word_embeddings=tied,
        max_position_embeddings=64,
        **extra,
    )
    model = model_cls(cfg).eval()
    with torch.no_grad():  # norms start at 1 (Gemma: 0) and biases at 0: perturb them so a wrong one shows
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    hf = _hf_model(*VARIANTS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path, mgjax.from_pretrained(path, dtype=jnp.float32)


def _ids(batch=2, length=19, seed=1):
    return torch.randint(0, 160, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_logits_match_pytorch(pair, report):
    name, hf, _, model = pair
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits.numpy()
    logits, _ = model(jnp.asarray(ids.numpy()))
    report(f"{name} logits", max_abs(logits, ref), 1e-4)


def test_padded_batch_matches_pytorch(pair, report):
    name, hf, _, model = pair
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding on the first row
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits.numpy()
    logits, _ = model(jnp.asarray(ids.numpy()), attention_mask=jnp.asarray(mask.numpy()))
    report(f"{name} padded logits", max_abs(np.asarray(logits)[0, 5:], ref[0, 5:]) + max_abs(logits[1], ref[1]), 1e-4)


def test_kv_cache_decoding_equals_full_forward(pair, report):
    name, _, _, model = pair
    ids = jnp.asarray(_ids(length=16).numpy())
    full, _ = model(ids)
    cache = model.init_cache(batch=2, max_len=24)
    step = jax.jit(lambda m, x, c: m(x, cache=c))  # nnx modules are pytrees: jit traces them directly
    prefill, cache = model(ids[:, :10], cache=cache)
    pieces = [prefill]
    for t in range(10, 16):
        out, cache = step(model, ids[:, t : t + 1], cache)
        pieces.append(out)
    assert int(cache.index) == 16
    report(f"{name} cached decode", max_abs(jnp.concatenate(pieces, axis=1), full), 1e-5)


def test_export_reloads_identically_in_pytorch(pair, tmp_path):
    name, hf, _, model = pair
    mgjax.save_pretrained(model, tmp_path)
    back = type(hf).from_pretrained(tmp_path).eval()
    want, got = hf.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, back(ids).logits)


def test_sharded_checkpoint_and_remat(pair, tmp_path, report):
    name, hf, _, model = pair
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    sharded = mgjax.from_pretrained(tmp_path, dtype=jnp.float32, remat="full")
    ids = jnp.asarray(_ids().numpy())
    a, _ = model(ids)
    loss = lambda m: m(ids)[0].mean()  # noqa: E731
    b, _ = sharded(ids)
    report(f"{name} sharded+remat logits", max_abs(a, b), 0.0)
    ga = jax.grad(loss)(model)
    gb = jax.grad(loss)(sharded)
    report(f"{name} remat grads", max(max_abs(x, y) for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb))), 1e-6)


def test_bf16_load_is_close_by_kl(pair):
    name, hf, path, _ = pair
    model = mgjax.from_pretrained(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    ids = _ids()
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids).logits, -1).numpy()
    logits, _ = model(jnp.asarray(ids.numpy()))
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    kl = float(np.mean(np.sum(np.exp(ref) * (ref - logp), -1)))
    print(f"[parity] {name} bf16 KL {kl:.2e} (bound 1e-2)")
    assert kl <= 1e-2


# --- bad checkpoints fail loudly, naming what is wrong ------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    _hf_model("llama", 2, None, False, {}).save_pretrained(path)
    return path


def _rewrite(src, dst, edit):
    tensors = safetensors.torch.load_file(src / "model.safetensors")
    edit(tensors)
    dst.mkdir(exist_ok=True)
    safetensors.torch.save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def test_missing_key_is_named(small, tmp_path):
    path = _rewrite(small, tmp_path / "m", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"1 missing: model\.layers\.1\.mlp\.up_proj\.weight"):
        mgjax.from_pretrained(path)


def test_unexpected_and_misshaped_keys_are_named(small, tmp_path):
    def edit(t):
        t["model.extra.weight"] = torch.zeros(3)
        t["model.norm.weight"] = torch.zeros(65)

    path = _rewrite(small, tmp_path / "u", edit)
    with pytest.raises(CheckpointError) as err:
        mgjax.from_pretrained(path)
    assert "unexpected: model.extra.weight" in str(err.value)
    assert "model.norm.weight: checkpoint (65,) vs model (64,)" in str(err.value)


def test_truncated_file_and_pickles_are_refused(small, tmp_path):
    bad = tmp_path / "t"
    bad.mkdir()
    data = (small / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    (bad / "config.json").write_text((small / "config.json").read_text())
    with pytest.raises(CheckpointError, match="truncated"):
        mgjax.from_pretrained(bad)
    pick = tmp_path / "p"
    pick.mkdir()
    (pick / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    (pick / "config.json").write_text((small / "config.json").read_text())
    with pytest.raises(CheckpointError, match="never loaded"):
        mgjax.from_pretrained(pick)


def test_family_switches_follow_model_type(pair):
    name, hf, _, model = pair
    assert type(model).__name__ == type(hf).__name__
    c = model.config
    assert (c.qkv_bias, c.norm_offset, c.scale_embeddings, c.num_local_experts) == {
        "llama": (False, 0.0, False, 0),
        "qwen2": (True, 0.0, False, 0),
        "gemma": (False, 1.0, True, 0),
        "mixtral": (False, 0.0, False, 4),
        "phi3": (False, 0.0, False, 0),
    }[c.model_type]


def test_moe_dense_grouped_and_megablox_paths_agree(tmp_path, report):
    name = "mixtral_top2"
    hf = _hf_model(*VARIANTS[name])
    hf.save_pretrained(tmp_path)
    path, model = tmp_path, mgjax.from_pretrained(tmp_path, dtype=jnp.float32)
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits.numpy()
    dense = mgjax.from_pretrained(path, dtype=jnp.float32, moe_impl="dense")
    grouped = mgjax.from_pretrained(path, dtype=jnp.float32, moe_impl="grouped")
    megablox = mgjax.from_pretrained(path, dtype=jnp.float32, moe_impl="megablox")  # Pallas, interpreted here
    a, _ = dense(jnp.asarray(ids.numpy()))
    b, _ = grouped(jnp.asarray(ids.numpy()))
    c, _ = megablox(jnp.asarray(ids.numpy()))
    assert model.config.moe_impl == "auto"
    report(f"{name} dense-dispatch logits vs torch", max_abs(a, ref), 1e-4)
    report(f"{name} grouped vs dense", max_abs(a, b), 1e-5)
    report(f"{name} megablox vs dense", max_abs(a, c), 1e-5)


def test_megablox_gradients_equal_the_dense_dispatch():
    from mgjax.models.moe import SparseMoeBlock

    def grads(impl):
        block = SparseMoeBlock(
            32, 64, 4, 2, act="silu", impl=impl, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0)
        )
        graphdef, state = nnx.split(block)
        x = jax.random.normal(jax.random.key(1), (2, 24, 32))
        loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x)[0] ** 2)  # noqa: E731
        return jax.tree.leaves(jax.grad(loss, argnums=(0, 1))(state, x))

    for want, got in zip(grads("dense"), grads("megablox")):  # router, the three expert stacks, the input
        assert max_abs(got, want) <= 1e-5 * float(jnp.max(jnp.abs(want)))


def test_unsupported_config_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_bigcode"}))
    with pytest.raises(CheckpointError, match="gpt_bigcode"):
        mgjax.from_pretrained(tmp_path)
    cfg = transformers.Qwen2Config(
        vocab_size=16,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        use_sliding_window=True,
        sliding_window=4,
    ).to_dict()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="use_sliding_window"):
        mgjax.from_pretrained(tmp_path)


def test_greedy_generation_matches_transformers(pair):
    name, hf, _, model = pair
    from mgjax.inference.decoding import greedy

    ids = _ids(batch=2, length=7, seed=3)
    ref = ids
    with torch.no_grad():  # torch reference: recompute the whole prefix each step, no cache
        for _ in range(12):
            ref = torch.cat([ref, hf(ref).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    ref = ref.numpy()
    got = np.asarray(greedy(model, jnp.asarray(ids.numpy()), 12))
    assert (got == ref).all(), (got, ref)


def test_inputs_embeds_path_equals_input_ids_path(pair, report):
    """VLMs splice image embeddings into ``inputs_embeds``; Gemma's sqrt(hidden) scale must reach them too."""
    name, _, _, model = pair
    ids = jnp.asarray(_ids().numpy())
    a, _ = model(ids)
    b, _ = model(inputs_embeds=model.embed(ids))
    report(f"{name} inputs_embeds vs input_ids", max_abs(a, b), 0.0)


def test_saved_config_states_the_written_dtype(small, tmp_path):
    model = mgjax.from_pretrained(small, dtype=jnp.bfloat16)
    mgjax.save_pretrained(model, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    mgjax.save_pretrained(model, tmp_path / "f32", dtype=jnp.float32)
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["dtype"] == "float32"
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "bf16")
    assert back.model.embed_tokens.weight.dtype == torch.bfloat16


def test_phi3_longrope_on_both_sides_of_the_switch(tmp_path, report):
    """transformers picks short or long factors per forward from max(position) + 1 > original context (16 here)."""
    hf = _hf_model(*VARIANTS["phi3_longrope"])
    hf.save_pretrained(tmp_path)
    model = mgjax.from_pretrained(tmp_path, dtype=jnp.float32)
    assert model.config.rope.type == "longrope"
    ids = _ids(length=40)
    out = {}
    for n in (16, 17, 40):
        with torch.no_grad():
            ref = hf(ids[:, :n]).logits.numpy()
        out[n], _ = model(jnp.asarray(ids[:, :n].numpy()))
        report(f"phi3 longrope logits at {n} positions", max_abs(out[n], ref), 1e-4)
    # the switch really happened: the first 16 positions change when the sequence grows past 16
    assert max_abs(out[16], out[17][:, :16]) > 1e-3
    assert max_abs(out[17], out[40][:, :17]) < 1e-4


def test_phi3_fused_tensors_split_as_transformers_splits_them(tmp_path):
    hf = _hf_model(*VARIANTS["phi3_longrope"])
    hf.save_pretrained(tmp_path)
    model = mgjax.from_pretrained(tmp_path, dtype=jnp.float32)
    attn = hf.model.layers[1].self_attn.qkv_proj.weight.detach().numpy()
    q, k, v = (np.asarray(getattr(model.model.layers.self_attn, f"{p}_proj").weight[1]) for p in "qkv")
    np.testing.assert_array_equal(np.concatenate([q, k, v]), attn)
    gate_up = hf.model.layers[2].mlp.gate_up_proj.weight.detach().numpy()
    np.testing.assert_array_equal(np.asarray(model.model.layers.mlp.gate_proj.weight[2]), gate_up[:112])
    np.testing.assert_array_equal(np.asarray(model.model.layers.mlp.up_proj.weight[2]), gate_up[112:])


def test_mixtral_router_aux_loss_is_a_switch(tmp_path, report):
    """Off by default (MGM trained without it); with ``output_router_logits`` it equals transformers' aux_loss,
    padding excluded."""
    hf = _hf_model(*VARIANTS["mixtral_top2"])
    hf.save_pretrained(tmp_path)
    off = mgjax.from_pretrained(tmp_path, dtype=jnp.float32)
    on = mgjax.from_pretrained(tmp_path, dtype=jnp.float32, output_router_logits=True)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    assert off.forward(jnp.asarray(ids.numpy())).aux_loss is None
    for m in (None, mask):
        with torch.no_grad():
            ref = hf(ids, attention_mask=m, output_router_logits=True).aux_loss.item()
        got = on.forward(jnp.asarray(ids.numpy()), attention_mask=None if m is None else jnp.asarray(m.numpy()))
        report(f"mixtral aux loss ({'padded' if m is not None else 'full'})", abs(float(got.aux_loss) - ref), 1e-6)
    grads = jax.grad(lambda model: model.forward(jnp.asarray(ids.numpy())).aux_loss)(on)
    assert float(jnp.abs(grads.model.layers.block_sparse_moe.gate.weight[...]).max()) > 0  # it trains the router


def test_per_layer_weights_decode_the_same(pair, report, tmp_path):
    """``layers.unstack`` (the CLIs' inference layout: one array per layer, the layers run as a loop) gives the
    stacked model's logits, cached decoding and tokens; ``restack`` brings the training layout back."""
    name, _, _, model = pair
    ids = jnp.asarray(_ids(length=12).numpy())
    want_logits, _ = model(ids)
    want = np.asarray(decoding.generate(model, ids[:, :8], 6))
    try:
        layers.unstack(model)
        assert layers.is_unstacked(model)
        cache = model.init_cache(batch=2, max_len=16)
        assert isinstance(cache.k, layers.PerLayer) and len(cache.k) == model.config.num_hidden_layers
        logits, _ = model(ids)
        report(f"{name} per-layer logits", max_abs(logits, want_logits), 1e-6)
        np.testing.assert_array_equal(np.asarray(decoding.generate(model, ids[:, :8], 6)), want)
        with pytest.raises(ValueError, match="restack"):
            mgjax.save_pretrained(model, tmp_path)
    finally:
        layers.restack(model)
    assert not layers.is_unstacked(model)
    np.testing.assert_array_equal(np.asarray(model(ids)[0]), np.asarray(want_logits))
