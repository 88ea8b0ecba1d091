"""Mini-InternVL's releases (on the Hub as ``OpenGVLab/InternVL2-1B``, ``-2B``, ``-4B``) as data: each
``internvl_chat`` ``config.json`` (spec sections 1.1 and 6.1), the fine-tuning recipes of InternVL's scripts per
adaptation mode (spec 5.4), and what each mode costs in gradient and optimizer memory.

``config("InternVL2-2B", dtype=jnp.bfloat16)`` builds the architecture without any file (``shapes_config`` one
that also builds for 4B, for work on shapes). ``memory(name, mode)``
counts parameters from abstract shapes alone (nothing is allocated), LoRA adapters included;
``python -m mgjax.recipes.internvl_releases`` prints the table of every release and mode.

Phi-3-mini-128k's LongRoPE takes 2 x 48 per-frequency factors that the spec does not list; the 4B entry names its
rotary type and lengths but leaves them out, so a model built from ``config("InternVL2-4B")`` must take its rotary
factors from the checkpoint's own ``config.json`` (``from_pretrained`` reads that) before it runs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Iterator

from flax import nnx

from mgjax.models.internvl import InternVLChatModel, InternVLConfig
from mgjax.nn.params import count_params, trainable
from mgjax.recipes import adapt

# InternViT-300M-448px as InternVL2's chat configs embed it, keeping the fields that shape the network;
# initializer_factor is its LayerScale init. Training scripts set their own drop_path_rate (see RECIPES).
VISION: dict[str, Any] = dict(
    architectures=["InternVisionModel"],
    model_type="intern_vit_6b",
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_channels=3,
    image_size=448,
    patch_size=14,
    hidden_act="gelu",
    norm_type="layer_norm",
    layer_norm_eps=1e-6,
    qkv_bias=True,
    qk_normalization=False,
    initializer_factor=1.0,
    drop_path_rate=0.0,
)

# The base LLMs as InternVL2's llm_config holds them: vocabularies grown by InternVL's special tokens, and every
# LM head untied (InternVL unties Qwen2-0.5B's too).
LLMS: dict[str, dict[str, Any]] = {
    "Qwen2-0.5B-Instruct": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        vocab_size=151655,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        hidden_act="silu",
        rms_norm_eps=1e-6,
        rope_theta=1e6,
        max_position_embeddings=32768,
        use_sliding_window=False,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
    "internlm2-chat-1_8b": dict(
        architectures=["InternLM2ForCausalLM"],
        model_type="internlm2",
        vocab_size=92553,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=8,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        bias=False,
        rope_theta=1e6,
        rope_scaling={"type": "dynamic", "factor": 2.0},
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
    "Phi-3-mini-128k-instruct": dict(  # "su": LongRoPE under its first name; factors not listed (module doc)
        architectures=["Phi3ForCausalLM"],
        model_type="phi3",
        vocab_size=32020,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_scaling={"type": "su"},
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
}

# What every InternVL2 chat config holds besides its towers (spec 6.1).
CHAT_COMMON: dict[str, Any] = dict(
    architectures=["InternVLChatModel"],
    model_type="internvl_chat",
    downsample_ratio=0.5,
    ps_version="v2",
    select_layer=-1,
    force_image_size=448,
    dynamic_image_size=True,
    use_thumbnail=True,
    min_dynamic_patch=1,
    max_dynamic_patch=12,
    use_backbone_lora=0,
    use_llm_lora=0,
    pad2square=False,
    torch_dtype="bfloat16",
)


@dataclass(frozen=True)
class Release:
    llm: str
    template: str


RELEASES: dict[str, Release] = {
    "InternVL2-1B": Release("Qwen2-0.5B-Instruct", "Hermes-2"),
    "InternVL2-2B": Release("internlm2-chat-1_8b", "internlm2-chat"),
    "InternVL2-4B": Release("Phi-3-mini-128k-instruct", "phi3-chat"),
}
NAMES: tuple[str, ...] = tuple(RELEASES)


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning recipe of InternVL's scripts, named by the adaptation mode it trains (``adapt.MODES``).
    All of them: bf16, gradient checkpointing, AdamW (0.9, 0.999, 1e-8), cosine decay after a linear warmup.
    ``global_batch`` counts samples, or packed sequences of up to ``packed_tokens`` tokens where that is set;
    ``loss_reduction`` weighs samples as ``mgjax.train.loss.next_token_loss`` does. The scripts' LoRA dropout (0.05)
    has no counterpart in ``mgjax.nn.lora``."""

    lr: float
    global_batch: int
    max_tiles: int
    max_length: int
    drop_path: float
    packed_tokens: int = 0
    loss_reduction: str = "token"
    lora_rank: int = 0
    lora_alpha: float = 0.0
    weight_decay: float = 0.01
    warmup_ratio: float = 0.03
    clip_norm: float = 1.0  # HF Trainer's default max_grad_norm; no script changes it


RECIPES: dict[str, Recipe] = {
    # Mini-InternVL's domain adaptation (mini_internvl/domain_adaptation/*): 8 GPUs x 1 packed sequence x 8
    # accumulation steps (DriveLM: 1 step, so 8 in all); each domain's max_steps sets the length
    "full": Recipe(
        lr=1e-5,
        global_batch=64,
        max_tiles=12,
        max_length=8192,
        drop_path=0.1,
        packed_tokens=16384,
        loss_reduction="square",
    ),
    # InternVL2's 2nd-stage fine-tuning, *_full.sh (freeze_backbone) and *_lora.sh (use_llm_lora 16, alpha 2r)
    "frozen_vit": Recipe(lr=4e-5, global_batch=128, max_tiles=6, max_length=4096, drop_path=0.1),
    "lora": Recipe(
        lr=4e-5, global_batch=16, max_tiles=6, max_length=4096, drop_path=0.0, lora_rank=16, lora_alpha=32.0
    ),
}
MODES: tuple[str, ...] = tuple(RECIPES)


def release(name: str) -> Release:
    if name not in RELEASES:
        raise ValueError(f"unknown InternVL2 release {name!r}; known: {', '.join(NAMES)}")
    return RELEASES[name]


def recipe(mode: str) -> Recipe:
    if mode not in RECIPES:
        raise ValueError(f"unknown adaptation mode {mode!r}; known: {', '.join(MODES)}")
    return RECIPES[mode]


def hf_config(name: str) -> dict[str, Any]:
    """The release's ``config.json`` as InternVL writes it (a fresh copy)."""
    r = release(name)
    return {
        **copy.deepcopy(CHAT_COMMON),
        "vision_config": copy.deepcopy(VISION),
        "llm_config": copy.deepcopy(LLMS[r.llm]),
        "template": r.template,
    }


def config(name: str, **overrides) -> InternVLConfig:
    """The release's InternVLConfig; ``overrides`` as ``InternVLConfig.from_hf`` takes them."""
    return InternVLConfig.from_hf(hf_config(name), **overrides)


def shapes_config(name: str, **overrides) -> InternVLConfig:
    """``config``, with unit LongRoPE factors where the release does not list them (InternVL2-4B): for work on
    shapes alone (plans, compiled memory), which the factors' values do not change; never to run."""
    c = config(name, **overrides)
    rope = c.llm.rope
    if rope.type != "longrope" or rope.short_factor:
        return c
    ones = (1.0,) * (c.llm.head_dim // 2)
    return dataclasses.replace(
        c, llm=dataclasses.replace(c.llm, rope=dataclasses.replace(rope, short_factor=ones, long_factor=ones))
    )


@functools.cache
def _counts(name: str, mode: str) -> tuple[int, int]:
    """(all parameters, trainable ones) of the release prepared for ``mode``, from shapes alone."""
    r, m = recipe(mode), adapt.MODES[mode]

    def build() -> InternVLChatModel:
        model = InternVLChatModel(config(name), rngs=nnx.Rngs(0))
        adapt.prepare(model, mode, rank=r.lora_rank, alpha=r.lora_alpha)  # adapters exist in lora mode alone
        return model

    model = nnx.eval_shape(build)
    return count_params(model), count_params(model, trainable(m.trainable, m.frozen))


def memory(name: str, mode: str) -> dict[str, int]:
    """Parameter counts of the release under ``mode`` and the bytes its trainable set needs beyond the weights:
    float32 gradients and AdamW's two float32 moments (frozen parameters get neither)."""
    params, train = _counts(name, mode)
    return dict(params=params, trainable=train, gradient_bytes=4 * train, optimizer_bytes=8 * train, bytes=12 * train)


def table() -> Iterator[dict[str, Any]]:
    """``memory`` of every release and mode, with ``saving_bytes``: how much less than ``full`` the mode needs."""
    for name in NAMES:
        full = memory(name, "full")["bytes"]
        for mode in MODES:
            m = memory(name, mode)
            yield dict(release=name, mode=mode, **m, saving_bytes=full - m["bytes"])


def _format(row: dict[str, Any]) -> str:
    gib = 2**30
    saving = row["saving_bytes"]
    share = f"{saving / gib:6.2f} GiB ({100 * saving / (row['bytes'] + saving):4.1f}%)" if saving else "-"
    return (
        f"{row['release']:13s} {row['mode']:11s} {row['params'] / 1e9:7.3f}B {row['trainable'] / 1e6:9.2f}M "
        f"{row['bytes'] / gib:7.2f} GiB  {share}"
    )


def main() -> None:
    print(f"{'release':13s} {'mode':11s} {'params':>8s} {'trainable':>10s} {'grad+AdamW':>11s}  saving vs full")
    for row in table():
        print(_format(row))


if __name__ == "__main__":
    main()
