"""InternLM2 (transformers has none): pack a tiny Llama's weights into InternLM2's layout by hand and check that the
InternLM2 checkpoint reproduces the Llama reference, given InternLM2's own dynamic NTK rotary embedding."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

import mgjax
from tests.helpers import internlm2_checkpoint, max_abs

HEADS, KV, HEAD_DIM, HIDDEN = 4, 2, 16, 64


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=160,
        hidden_size=HIDDEN,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=HEADS,
        num_key_value_heads=KV,
        attention_bias=True,
        max_position_embeddings=16,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    llama = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in llama.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("internlm2")
    internlm2_checkpoint(llama, path)
    return llama, path, mgjax.from_pretrained(path, dtype=jnp.float32)


def test_packed_checkpoint_matches_llama_reference(pair, report):
    llama, _, model = pair
    assert type(model).__name__ == "InternLM2ForCausalLM" and model.config.attention_bias
    ids = torch.randint(0, 160, (2, 40), generator=torch.Generator().manual_seed(1))
    out = {}
    for n in (12, 40):  # below and above max_position_embeddings (16), where dynamic NTK rescales the base
        with torch.no_grad():
            ref = llama(ids[:, :n]).logits.numpy()
        out[n], _ = model(jnp.asarray(ids[:, :n].numpy()))
        report(f"internlm2 logits at {n} positions", max_abs(out[n], ref), 1e-4)
    # the rescaled base really changed the early positions (by far more than the 2e-7 parity noise)
    assert max_abs(out[12], out[40][:, :12]) > 2e-5


def test_query_heads_use_their_own_kv_head(pair):
    """Unpacking follows the KV grouping: query head h of layer 0 is rows h*D..(h+1)*D of the Llama q_proj."""
    llama, _, model = pair
    q = np.asarray(model.model.layers.self_attn.q_proj.weight[0])
    np.testing.assert_array_equal(q, llama.model.layers[0].self_attn.q_proj.weight.detach().numpy())
    k = np.asarray(model.model.layers.self_attn.k_proj.bias[0])
    np.testing.assert_array_equal(k, llama.model.layers[0].self_attn.k_proj.bias.detach().numpy())


def test_export_writes_the_same_packed_checkpoint(pair, tmp_path):
    _, path, model = pair
    mgjax.save_pretrained(model, tmp_path)
    want = safetensors.numpy.load_file(path / "model.safetensors")
    got = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(want[k], got[k], err_msg=k)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "internlm2" and cfg["bias"] is True and "auto_map" in cfg


def test_llama_named_split_weights_load_too(pair, tmp_path, report):
    """transformers' InternVL converter stores InternLM2 split and Llama-named; the same class reads that."""
    llama, path, model = pair
    llama.save_pretrained(tmp_path)
    split = mgjax.from_pretrained(tmp_path, config=model.config, layout="hf")
    ids = jnp.arange(20, dtype=jnp.int32)[None] % 160
    report("internlm2 llama-layout vs packed", max_abs(split(ids)[0], model(ids)[0]), 0.0)
