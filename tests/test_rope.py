"""RoPE at the release shapes against transformers' rotary modules, and logits at the end of every family's
context window (no cache, and prefill + decode through the KV cache).

PyTorch's CPU ``pow`` depends on the kernel it dispatches to (see ``mgjax.nn.rope``); the tests pin its scalar kernel
(``ATEN_CPU_CAPABILITY=default``, conftest.py). A child process with PyTorch's own choice (AVX2 / AVX-512) checks
that those kernels' tables stay within 2 ulps of ours and prints how many entries differ.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.gemma.modeling_gemma import GemmaRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

import mgjax
from mgjax.models.decoder import InternLM2Config
from mgjax.nn.rope import Rope
from tests.helpers import InternLM2Rotary, internlm2_checkpoint, max_abs

FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, LlamaRotaryEmbedding),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, Qwen2RotaryEmbedding),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, GemmaRotaryEmbedding),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM, MixtralRotaryEmbedding),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, Phi3RotaryEmbedding),
    "internlm2": (transformers.LlamaConfig, transformers.LlamaForCausalLM, None),
}


def _llama3(factor):
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


# Phi-3-mini-128k's 48 short and long factors are not at hand offline: factors of the same shape (short near 1,
# long rising to ~60), fixed here.
_rng = np.random.default_rng(0)
PHI3_LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [round(float(x), 4) for x in 1 + np.sort(_rng.uniform(0, 0.5, 48))],
    "long_factor": [round(float(x), 4) for x in 1 + np.sort(_rng.uniform(0, 60, 48))],
}

# Every supported LLM's rotary settings: (family, head_dim, config fields, where its context ends).
LLMS = {
    "vicuna-7b-v1.5": ("llama", 128, dict(rope_theta=1e4, max_position_embeddings=4096), 8192),
    "vicuna-7b-v1.5-16k": (
        "llama",
        128,
        dict(rope_theta=1e4, max_position_embeddings=4096, rope_scaling={"rope_type": "linear", "factor": 4.0}),
        16384,
    ),
    "Nous-Hermes-2-Yi-34B": ("llama", 128, dict(rope_theta=5e6, max_position_embeddings=4096), 4096),
    "Meta-Llama-3-8B-Instruct": ("llama", 128, dict(rope_theta=5e5, max_position_embeddings=8192), 8192),
    "Llama-3.1-8B-Instruct": (
        "llama",
        128,
        dict(rope_theta=5e5, max_position_embeddings=131072, rope_scaling=_llama3(8.0)),
        131072,
    ),
    "Llama-3.2-1B-Instruct": (
        "llama",
        64,
        dict(rope_theta=5e5, max_position_embeddings=131072, rope_scaling=_llama3(32.0)),
        131072,
    ),
    "Llama-3.2-3B-Instruct": (
        "llama",
        128,
        dict(rope_theta=5e5, max_position_embeddings=131072, rope_scaling=_llama3(32.0)),
        131072,
    ),
    "gemma-2b-it": ("gemma", 256, dict(rope_theta=1e4, max_position_embeddings=8192), 8192),
    "Mixtral-8x7B-Instruct-v0.1": ("mixtral", 128, dict(rope_theta=1e6, max_position_embeddings=32768), 32768),
    "Qwen2-0.5B-Instruct": ("qwen2", 64, dict(rope_theta=1e6, max_position_embeddings=32768), 32768),
    "Qwen2-7B-Instruct": ("qwen2", 128, dict(rope_theta=1e6, max_position_embeddings=32768), 32768),
    "Phi-3-mini-4k-instruct": ("phi3", 96, dict(rope_theta=1e4, max_position_embeddings=4096), 4096),
    "Phi-3-mini-128k-instruct": (
        "phi3",
        96,
        dict(
            rope_theta=1e4,
            max_position_embeddings=131072,
            original_max_position_embeddings=4096,
            rope_scaling=PHI3_LONGROPE,
        ),
        131072,
    ),
    # transformers' own dynamic NTK (no release uses it; InternLM2 has its own, below)
    "dynamic-ntk": (
        "llama",
        128,
        dict(rope_theta=1e6, max_position_embeddings=32768, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
        49152,
    ),
    "internlm2-chat-1_8b": ("internlm2", 128, dict(rope_theta=1e6, max_position_embeddings=32768), 49152),
}
INTERNLM2_FACTOR = 2.0


def _config(name, **tiny):
    family, head_dim, fields, _ = LLMS[name]
    extra = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2} if family == "phi3" else {}
    return FAMILIES[family][0](
        hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, **fields, **extra, **tiny
    )


def _rotary(name):
    family, head_dim, fields, _ = LLMS[name]
    if family == "internlm2":
        return InternLM2Rotary(head_dim, fields["max_position_embeddings"], fields["rope_theta"], INTERNLM2_FACTOR)
    return FAMILIES[family][2](_config(name))


def _rope(name) -> Rope:
    """mgjax's Rope, read from the config.json the model would ship with."""
    family, _, fields, _ = LLMS[name]
    if family == "internlm2":
        return InternLM2Config.from_hf(
            {
                **fields,
                "vocab_size": 1,
                "hidden_size": 256,
                "intermediate_size": 1,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "rope_scaling": {"type": "dynamic", "factor": INTERNLM2_FACTOR},
            }
        ).rope
    return Rope.from_hf(_config(name).to_dict())


def _torch_inv_freq(name, seq_len=None) -> np.ndarray:
    """The rotary module's frequencies as built (``seq_len`` None) or after a forward reaching ``seq_len``."""
    module = _rotary(name)
    if isinstance(module, InternLM2Rotary):
        return module.inv_freq(seq_len or 0).numpy()
    if seq_len is not None:
        module(torch.zeros(1, 1, 1), torch.tensor([[seq_len - 1]]))
    return module.inv_freq.numpy()


def _seq_lens(name):
    """The sequence lengths at which a sequence-dependent table is checked (None: as built)."""
    kind = _rope(name).type
    limit = LLMS[name][2].get("original_max_position_embeddings") or LLMS[name][2]["max_position_embeddings"]
    if kind == "longrope":
        return [None, limit, limit + 1, LLMS[name][3]]
    if kind == "dynamic":
        return [None, limit, limit + 1, 40000, 65536, 100001]
    return [None]


def _ulps(a, b) -> np.ndarray:
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


def test_pytorch_runs_its_scalar_kernels():
    assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", "tests/conftest.py sets ATEN_CPU_CAPABILITY"


@pytest.mark.parametrize("name", list(LLMS))
def test_inv_freq_is_bitwise_transformers(name):
    """The release table, and every sequence-dependent one, equals the rotary module's buffer bit for bit."""
    head_dim, rope = LLMS[name][1], _rope(name)
    differing = {str(s): int((_torch_inv_freq(name, s) != rope.inv_freq(head_dim, s)).sum()) for s in _seq_lens(name)}
    print(f"[rope] {name}: differing inv_freq entries per seq_len {differing}")
    assert not any(differing.values())


@pytest.mark.parametrize("name", list(LLMS))
def test_cos_sin_tables_equal_transformers_within_rounding(name):
    """cos/sin at every position up to the end of the context (and of the original window, where the table
    switches): within one float32 rounding of values <= 1 (times LongRoPE's attention factor, ~1.19)."""
    _, head_dim, fields, context = LLMS[name]
    rope = _rope(name)
    scale = rope.longrope_scale() if rope.type == "longrope" else 1.0
    for n in sorted({context, fields.get("original_max_position_embeddings") or context}):
        positions = torch.arange(n)[None]
        cos, sin = _rotary(name)(torch.zeros(1, 1, 1), positions)
        ours = rope.cos_sin(jnp.asarray(positions.numpy()), head_dim)
        diff = max(max_abs(ours[0], cos.numpy()), max_abs(ours[1], sin.numpy()))
        print(f"[rope] {name}: cos/sin over positions 0..{n - 1} max-abs {diff:.3e}")
        assert diff <= 2.0**-23 * scale


def _vectorised_kernel_ulps() -> dict:
    """In the child process: per release and sequence length, how many entries differ and by how many ulps."""
    out = {}
    for name, (_, head_dim, _, _) in LLMS.items():
        rope = _rope(name)
        ulps = {str(s): _ulps(_torch_inv_freq(name, s), rope.inv_freq(head_dim, s)) for s in _seq_lens(name)}
        out[name] = {s: [int((u > 0).sum()), int(u.max())] for s, u in ulps.items()}
    return {"capability": torch.backends.cpu.get_cpu_capability(), "ulps": out}


def test_vectorised_pytorch_tables_are_within_two_ulps(tmp_path):
    """PyTorch's AVX2 / AVX-512 kernels give tables that differ from its scalar kernel's, and so from ours, in a
    few entries: 1 ulp of the power, at most 2 after the reciprocal. Counted and printed for the record."""
    env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
    # PyTorch fixes its kernel choice at the first query, before conftest.py (imported next, for the suite's jax
    # settings) could pin it
    child = (
        "import torch, runpy; torch.backends.cpu.get_cpu_capability(); import tests.conftest; "
        "runpy.run_module('tests.test_rope', run_name='__main__')"
    )
    subprocess.run(
        [sys.executable, "-c", child, str(tmp_path / "ulps.json")],
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        timeout=600,
    )
    report = json.loads((tmp_path / "ulps.json").read_text())
    for name, per_len in report["ulps"].items():
        print(f"[rope] {name} ({report['capability']}): [entries off, max ulps] per seq_len {per_len}")
        assert all(worst <= 2 for _, worst in per_len.values()), name


# ------------------------------------------------------------------------------------------------------------------
# Logits at the end of each family's context, against the transformers model (PyTorch's default kernels)
# ------------------------------------------------------------------------------------------------------------------
LATE = [
    "vicuna-7b-v1.5",
    "vicuna-7b-v1.5-16k",
    "Nous-Hermes-2-Yi-34B",
    "Meta-Llama-3-8B-Instruct",
    "Llama-3.1-8B-Instruct",
    "Llama-3.2-1B-Instruct",
    "gemma-2b-it",
    "Mixtral-8x7B-Instruct-v0.1",
    "Qwen2-0.5B-Instruct",
    "Qwen2-7B-Instruct",
    "Phi-3-mini-128k-instruct",
    "dynamic-ntk",
    "internlm2-chat-1_8b",
]
VOCAB = 256


@pytest.fixture(scope="module", params=LATE)
def late(request, tmp_path_factory):
    name = request.param
    family = LLMS[name][0]
    tiny = dict(
        vocab_size=VOCAB,
        intermediate_size=256,
        num_hidden_layers=2,
        num_key_value_heads=1,
        tie_word_embeddings=family == "gemma",
        initializer_range=0.08,
    )
    if family == "mixtral":
        tiny.update(num_local_experts=2, num_experts_per_tok=2)
    torch.manual_seed(0)
    hf = FAMILIES[family][1](_config(name, **tiny)).eval()
    path = tmp_path_factory.mktemp(name)
    if family == "internlm2":
        internlm2_checkpoint(hf, path, INTERNLM2_FACTOR)
    else:
        hf.save_pretrained(path)
    return name, hf, mgjax.from_pretrained(path, dtype=jnp.float32)


@jax.jit
def _forward(model, ids, positions, cache=None):
    return model(ids, positions=positions, cache=cache)


def _fresh(hf):
    """The reference with a freshly built rotary module: transformers' dynamic and LongRoPE modules keep the
    frequencies of the longest sequence they have seen, which a shorter one after it would reuse."""
    if not isinstance(hf.model.rotary_emb, InternLM2Rotary):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    return hf


def _tokens(n, seed=1):
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_logits_at_the_end_of_the_context(late, report):
    name, hf, model = late
    end = LLMS[name][3]
    ids, positions = _tokens(48), torch.arange(end - 48, end)[None]
    with torch.no_grad():
        ref = _fresh(hf)(ids, position_ids=positions).logits.numpy()
    logits, _ = _forward(model, jnp.asarray(ids.numpy()), jnp.asarray(positions.numpy()))
    print(f"[rope] {name}: logits magnitude {np.abs(ref).max():.2f}")
    report(f"{name} logits at positions {end - 48}..{end - 1}", max_abs(logits, ref), 1e-4)
    assert (np.asarray(logits).argmax(-1) == ref.argmax(-1)).all()


def test_cached_decoding_at_the_end_of_the_context(late, report):
    """Prefill 64 tokens at a late offset, then 16 greedy steps through the KV cache, on both sides."""
    name, hf, model = late
    end = LLMS[name][3]
    start = end - 80
    prompt = _tokens(64, seed=2)
    cache = transformers.DynamicCache(config=hf.config)
    hf = _fresh(hf)
    with torch.no_grad():
        out = hf(prompt, position_ids=torch.arange(start, start + 64)[None], past_key_values=cache, use_cache=True)
    ours, kv = _forward(
        model, jnp.asarray(prompt.numpy()), jnp.arange(start, start + 64)[None], model.init_cache(1, 80)
    )
    worst = max_abs(ours, out.logits.numpy())
    ref_tokens, tokens = [], []
    ref_next, next_ = out.logits[:, -1].argmax(-1), int(np.asarray(ours)[0, -1].argmax())
    for step in range(16):
        pos = start + 64 + step
        with torch.no_grad():
            out = hf(ref_next[:, None], position_ids=torch.tensor([[pos]]), past_key_values=cache, use_cache=True)
        ours, kv = _forward(model, jnp.asarray([[next_]]), jnp.asarray([[pos]]), kv)
        worst = max(worst, max_abs(ours, out.logits.numpy()))
        ref_tokens.append(int(ref_next)), tokens.append(next_)
        ref_next, next_ = out.logits[:, -1].argmax(-1), int(np.asarray(ours)[0, -1].argmax())
    report(f"{name} prefill at {start} + 16 cached steps", worst, 1e-4)
    assert tokens == ref_tokens


if __name__ == "__main__":  # the child process of test_vectorised_pytorch_tables_are_within_two_ulps
    Path(sys.argv[1]).write_text(json.dumps(_vectorised_kernel_ulps()))
