"""The embedded demo: tiny random models of every implemented family, end to end, no downloads.

    python -m mgjax.demo

For each model: build it from an embedded config, write it as an HF checkpoint, load it back (checking every
tensor is bit-identical), and run it: the vision towers (CLIP, ConvNeXt, InternViT) on a synthetic image; each
decoder (Llama, Qwen2, Gemma, Mixtral, Phi-3, InternLM2) generating greedily with its KV cache, checked token for
token against cache-free recomputation (the Llama's speed measured); and the two vision-language models (MGM with
patch info mining, InternVL2) answering a prompt that holds an image.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import mgjax
from mgjax.cli import HelpFormatter, compilation_cache, integer
from mgjax.demo import grounding_task, mgm_task
from mgjax.inference.decoding import greedy
from mgjax.models.clip import CLIPVisionConfig
from mgjax.models.convnext import ConvNextConfig
from mgjax.models.decoder import (
    GemmaConfig,
    InternLM2Config,
    LlamaConfig,
    MixtralConfig,
    Phi3Config,
    Qwen2Config,
)
from mgjax.models.internvit import InternVisionConfig
from mgjax.models.mgm import IMAGE_TOKEN_INDEX
from mgjax.nn.rope import Rope

LLAMA = LlamaConfig(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    rope=Rope(theta=500000.0, type="llama3", factor=8.0, original_max_position_embeddings=64),
)
CLIP = CLIPVisionConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, image_size=56, patch_size=14
)
CONVNEXT = ConvNextConfig(hidden_sizes=(16, 32, 48, 64), depths=(1, 1, 3, 1), patch_size=4)
INTERNVIT = InternVisionConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=56, patch_size=14
)
_SMALL = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=16,
    max_position_embeddings=256,
)
DECODERS = {  # every decoder family besides the Llama above, as small as its switches allow
    "Qwen2 (q/k/v biases)": Qwen2Config(**_SMALL, num_key_value_heads=2),
    "Gemma (offset norms, scaled embeddings, tied head)": GemmaConfig(**_SMALL, num_key_value_heads=1),
    "Mixtral (4 experts, top 2)": MixtralConfig(**_SMALL, num_key_value_heads=2, num_local_experts=4),
    "Phi-3": Phi3Config(**_SMALL, num_key_value_heads=4),
    "InternLM2 (dynamic NTK rope)": InternLM2Config(**_SMALL, num_key_value_heads=2),
}


def roundtrip(model: nnx.Module, where: str) -> nnx.Module:
    """Save as an HF checkpoint, load back, and insist every parameter survived bit for bit."""
    mgjax.save_pretrained(model, where)
    loaded = mgjax.from_pretrained(where, dtype=jnp.float32)
    a, b = nnx.state(model, nnx.Param), nnx.state(loaded, nnx.Param)
    same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    n = sum(x.size for x in jax.tree.leaves(a))
    print(f"  {type(model).__name__}: {n:,} parameters, HF checkpoint roundtrip bit-identical: {same}")
    if not same:
        raise SystemExit("roundtrip changed the weights")
    return loaded


def synthetic_image(size: int) -> jax.Array:
    """A smooth colour gradient, normalised like CLIP inputs, NCHW."""
    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, (x + y) / 2]) - 0.5
    return jnp.asarray(rgb[None] / 0.27, jnp.float32)


def cache_check(model: nnx.Module, prompt: jax.Array, out: jax.Array) -> float:
    """The share of generated tokens equal to the argmax of a cache-free forward on their prefix."""
    logits, _ = jax.jit(lambda m, x: m(x))(model, out)
    recomputed = np.asarray(jnp.argmax(logits[:, prompt.shape[1] - 1 : -1], -1))
    return float((recomputed == np.asarray(out[:, prompt.shape[1] :])).mean())


def towers(tmp: str, seed: int) -> None:
    clip = roundtrip(mgjax.init(CLIP, seed=seed), f"{tmp}/clip")
    feats = jax.jit(lambda m, x: m.features(x, select_layer=-2))(clip, synthetic_image(CLIP.image_size))
    print(f"  CLIP features (layer -2, CLS dropped): {tuple(feats.shape)}, mean |x| {float(jnp.abs(feats).mean()):.4f}")
    convnext = roundtrip(mgjax.init(CONVNEXT, seed=seed), f"{tmp}/convnext")
    stages = jax.jit(lambda m, x: m(x).hidden_states[1:])(convnext, synthetic_image(64))
    print("  ConvNeXt stage maps (NHWC): " + ", ".join(str(tuple(s.shape)) for s in stages))
    internvit = roundtrip(mgjax.init(INTERNVIT, seed=seed), f"{tmp}/internvit")
    hidden = jax.jit(lambda m, x: m(x).last_hidden_state)(internvit, synthetic_image(INTERNVIT.image_size))
    print(f"  InternViT tokens (CLS + patches): {tuple(hidden.shape)}")


def decoders(tmp: str, seed: int, new_tokens: int) -> None:
    llama = roundtrip(mgjax.init(LLAMA, seed=seed), f"{tmp}/llama")
    prompt = jax.random.randint(jax.random.key(seed), (2, 8), 0, LLAMA.vocab_size)
    greedy(llama, prompt, new_tokens)  # compile the prefill and the step once
    t = time.perf_counter()
    out = jax.block_until_ready(greedy(llama, prompt, new_tokens))
    secs = time.perf_counter() - t
    agreement = {"Llama": cache_check(llama, prompt, out)}
    print(
        f"  Llama (GQA 8q/2kv, llama3 rope): {new_tokens} tokens x 2 sequences in {secs:.2f} s "
        f"({2 * new_tokens / secs:.0f} tokens/s with the KV cache); cache check {agreement['Llama']:.0%}"
    )
    for name, config in DECODERS.items():
        model = roundtrip(mgjax.init(config, seed=seed), f"{tmp}/{config.model_type}")
        out = greedy(model, prompt, 8)
        agreement[name] = cache_check(model, prompt, out)
        print(f"  {name}: 8 greedy tokens, cache check {agreement[name]:.0%}")
    if min(agreement.values()) < 1.0:
        raise SystemExit(f"KV-cache decoding disagrees with the full forward: {agreement}")


def vision_language(tmp: str, seed: int) -> None:
    config = mgm_task.model_config()
    mgm = roundtrip(mgjax.init(config, seed=seed), f"{tmp}/mgm")
    ids = jnp.asarray([[1] + [IMAGE_TOKEN_INDEX] * config.tokens_per_image + [5, 6, 7]])
    side, aux = config.vision.image_size, config.image_size_aux
    logits, _ = jax.jit(lambda m, x, a, b: m(x, a, b))(mgm, ids, synthetic_image(side), synthetic_image(aux))
    print(
        f"  MGM (CLIP {side} px + ConvNeXt {aux} px, mining): logits {tuple(logits.shape)} for "
        f"{config.tokens_per_image} image tokens + 4 text tokens"
    )
    token = 5
    config = grounding_task.model_config(token)
    internvl = roundtrip(mgjax.init(config, seed=seed), f"{tmp}/internvl")
    tiles = 2
    ids = jnp.asarray([[1] + [token] * (tiles * config.tokens_per_tile) + [7, 8]])
    pixels = jnp.concatenate([synthetic_image(config.vision.image_size)] * tiles)[None]
    logits, _ = jax.jit(lambda m, x, p: m(x, p))(internvl, ids, pixels)
    print(f"  InternVL2 ({tiles} tiles, pixel unshuffle, Qwen2): logits {tuple(logits.shape)}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--new-tokens", type=integer(1), default=24, help="tokens the Llama generates per sequence")
    ap.add_argument(
        "--seed", type=integer(0, 2**32 - 1), default=0, help="seed of every model's random weights and of the prompt"
    )
    args = ap.parse_args(argv)
    compilation_cache()
    print(f"mgjax {mgjax.__version__} on {jax.devices()[0].platform}: tiny random models, no downloads")
    with tempfile.TemporaryDirectory() as tmp:
        print("[1/3] vision towers")
        towers(tmp, args.seed)
        print("[2/3] decoders: greedy generation with the KV cache = argmax of a cache-free forward on each prefix")
        decoders(tmp, args.seed, args.new_tokens)
        print("[3/3] vision-language models")
        vision_language(tmp, args.seed)
    print("demo OK")
