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
from tests.conftest import max_abs

HEADS, KV, HEAD_DIM, HIDDEN = 4, 2, 16, 64
RENAMES = {
    "model.embed_tokens.": "model.tok_embeddings.",
    "self_attn.o_proj.": "attention.wo.",
    "mlp.gate_proj.": "feed_forward.w1.",
    "mlp.up_proj.": "feed_forward.w3.",
    "mlp.down_proj.": "feed_forward.w2.",
    "input_layernorm.": "attention_norm.",
    "post_attention_layernorm.": "ffn_norm.",
    "lm_head.": "output.",
}


def _pack_wqkv(q, k, v, heads, kv):
    """InternLM2's wqkv: rows [KV, G + 2, D] = per KV head, its G queries, its key, its value."""
    g, d = heads // kv, q.shape[0] // heads
    rest = q.shape[1:]
    q = q.reshape(kv, g, d, *rest)
    k = k.reshape(kv, 1, d, *rest)
    v = v.reshape(kv, 1, d, *rest)
    return np.concatenate([q, k, v], axis=1).reshape(-1, *rest)


def _to_internlm2(state: dict, heads: int = HEADS, kv: int = KV) -> dict:
    out = {}
    for key, value in state.items():
        if ".self_attn.q_proj." in key:
            kind = key.rsplit(".", 1)[1]
            prefix = key.split(".self_attn.")[0]
            out[f"{prefix}.attention.wqkv.{kind}"] = _pack_wqkv(
                value, state[key.replace("q_proj", "k_proj")], state[key.replace("q_proj", "v_proj")], heads, kv
            )
        elif ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            continue
        else:
            for old, new in RENAMES.items():
                key = key.replace(old, new)
            out[key] = value
    return out


class InternLM2Rotary(torch.nn.Module):
    """InternLM2's remote-code rotary embedding (``InternLM2DynamicNTKScalingRotaryEmbedding``) as a drop-in for a
    transformers Llama's ``rotary_emb``: past ``max_position_embeddings`` the base is rescaled in Python floats,
    then a float32 table ``arange(seq_len) x inv_freq`` is built and indexed by position. The remote code takes
    ``seq_len`` from the cache length and keeps its largest table; here it is ``max(position_ids) + 1`` for every
    forward (what the remote code computes for a sequence that starts at position 0 in a fresh model)."""

    def __init__(self, dim: int, max_position_embeddings: int, base: float, scaling_factor: float):
        super().__init__()
        self.dim, self.max_position_embeddings = dim, max_position_embeddings
        self.base, self.scaling_factor = base, scaling_factor

    def inv_freq(self, seq_len: int) -> torch.Tensor:
        base = self.base
        if seq_len > self.max_position_embeddings:
            base = self.base * (
                (self.scaling_factor * seq_len / self.max_position_embeddings) - (self.scaling_factor - 1)
            ) ** (self.dim / (self.dim - 2))
        return 1.0 / (base ** (torch.arange(0, self.dim, 2).float() / self.dim))

    def forward(self, x, position_ids):
        seq_len = int(position_ids.max()) + 1
        t = torch.arange(seq_len, dtype=torch.float32)
        emb = torch.einsum("i,j->ij", t, self.inv_freq(seq_len))
        emb = torch.cat((emb, emb), dim=-1)
        return emb.cos()[position_ids].to(x.dtype), emb.sin()[position_ids].to(x.dtype)


def internlm2_checkpoint(llama, path, factor: float = 2.0):
    """Give ``llama`` InternLM2's rotary embedding and write it as an InternLM2 checkpoint at ``path``."""
    c = llama.config
    theta = c.rope_parameters["rope_theta"]
    llama.model.rotary_emb = InternLM2Rotary(c.head_dim, c.max_position_embeddings, theta, factor)
    state = {k: v.numpy() for k, v in llama.state_dict().items()}
    safetensors.numpy.save_file(
        _to_internlm2(state, c.num_attention_heads, c.num_key_value_heads),
        path / "model.safetensors",
        metadata={"format": "pt"},
    )
    (path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "internlm2",
                "architectures": ["InternLM2ForCausalLM"],
                "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size,
                "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads,
                "hidden_act": "silu",
                "rms_norm_eps": c.rms_norm_eps,
                "max_position_embeddings": c.max_position_embeddings,
                "bias": c.attention_bias,
                "rope_theta": theta,
                "rope_scaling": {"type": "dynamic", "factor": factor},
                "tie_word_embeddings": False,
                "auto_map": {"AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
            }
        )
    )


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
