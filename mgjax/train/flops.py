"""Model FLOPs of an MGM or InternVL training step, counted by role, and MFU against the chip's peak.

A component's forward costs F. Backward adds F again when the gradient has to pass through it (it holds, or sits
after, a trainable parameter) and F times its trainable fraction for the weight gradients. So a trainable matmul
costs 6N per token, a frozen one on the gradient path 4N (MGM stage 1's LLM) and a frozen tower before every
trainable parameter 2N. Attention scores cost 4·T²·width per layer forward, halved when causal. Padded positions
are counted: they are computed. Embedding lookups are not matmuls and are not counted.
"""

from __future__ import annotations

from collections import Counter

import jax
from flax import nnx

from mgjax.models.mgm import MGMConfig
from mgjax.nn import layers

# Dense bf16 peak FLOP/s per chip (vendor figures), matched against ``jax.Device.device_kind``.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v4": 275e12,
}


def peak_flops(device: jax.Device | None = None) -> float | None:
    """The chip's peak, or None where unknown (CPUs): MFU is then not reported unless a peak is configured."""
    return kind_peak_flops((device or jax.devices()[0]).device_kind)


def kind_peak_flops(device_kind: str) -> float | None:
    """``peak_flops`` by ``device_kind`` ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...)."""
    kind = device_kind.lower()
    known = [k for k in PEAK_FLOPS if k.lower() in kind]  # the most specific name: "TPU v5 lite" over "TPU v5"
    return PEAK_FLOPS[max(known, key=len)] if known else None


def _count(module: nnx.Module, which=nnx.Param) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, which)))


def _by_top_module(model: nnx.Module, which) -> Counter:
    """Parameter counts per top-level attribute (filters match paths from the model's root)."""
    counts = Counter()
    for path, value in nnx.to_flat_state(nnx.state(model, which)):
        counts[path[0]] += value.size
    return counts


def _convnext_forward(c, size: int) -> float:
    """Conv FLOPs: every stage's parameters are applied once per position of that stage's map."""
    side, flops, prev = size // c.patch_size, 0.0, c.num_channels
    flops += 2 * side**2 * (c.patch_size**2 * prev * c.hidden_sizes[0])
    for s, (width, depth) in enumerate(zip(c.hidden_sizes, c.depths)):
        if s:
            side //= 2
            flops += 2 * side**2 * (4 * prev * width)
        flops += 2 * side**2 * depth * (49 * width + 8 * width * width)
        prev = width
    return flops


def _llm_matmul_params(model: nnx.Module) -> int:
    c = model.config
    n = _count(model) - (0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size)
    if c.num_local_experts:  # only the routed experts run
        per_expert = 3 * c.hidden_size * c.intermediate_size
        n -= c.num_hidden_layers * (c.num_local_experts - c.num_experts_per_tok) * per_expert
    return n


def mgm_step_flops(model: nnx.Module, trainable, *, batch: int, seq_len: int) -> dict[str, float]:
    """Training FLOPs of one step of ``batch`` samples of ``seq_len`` positions, by role (``trainable``,
    ``frozen_on_gradient_path``, ``frozen``) and in ``total``. ``trainable``: the optimizer's parameter filter."""
    c: MGMConfig = model.config
    v = c.vision
    clip_tokens = v.grid**2 + 1
    lr_tokens = c.tokens_per_image
    runs = layers.hidden_state_index(c.select_layer, v.num_hidden_layers)  # CLIP layers after the selected are idle
    idle = _count(model.vision_tower.encoder.layers) * (v.num_hidden_layers - runs) // v.num_hidden_layers
    forward = [  # (module names in compute order, forward FLOPs per sample)
        (
            ("vision_tower",),
            c.views
            * (2 * (_count(model.vision_tower) - idle) * clip_tokens + runs * 4 * clip_tokens**2 * v.hidden_size),
        )
    ]
    if c.mining:
        aux, hr = sum(c.vision_aux.hidden_sizes), (c.image_size_aux // 4) ** 2
        window = hr // (lr_tokens // c.views if c.image_grid == 1 else v.grid**2 * c.image_grid**2)
        forward += [
            (("vision_tower_aux",), _convnext_forward(c.vision_aux, c.image_size_aux)),
            (
                ("vlm_uni_query_projector", "vlm_uni_aux_projector", "vlm_uni_val_projector"),
                2 * lr_tokens * v.hidden_size**2
                + 2 * 2 * hr * aux * v.hidden_size
                + 4 * lr_tokens * window * v.hidden_size,
            ),
        ]
    forward += [
        (("mm_projector",), 2 * lr_tokens * _count(model.mm_projector)),
        (("language_model",), _llm_forward(model.language_model, seq_len)),
    ]
    return _by_role(model, trainable, forward, batch)


def internvl_step_flops(model: nnx.Module, trainable, *, batch: int, seq_len: int, tiles: int) -> dict[str, float]:
    """``mgm_step_flops`` for an InternVL model whose samples carry ``tiles`` tiles each (every slot of a
    static-shape batch is computed, filled or not)."""
    c = model.config
    v = c.vision
    tokens = v.grid**2 + 1
    forward = [
        (
            ("vision_tower",),
            tiles * (2 * _count(model.vision_tower) * tokens + v.num_hidden_layers * 4 * tokens**2 * v.hidden_size),
        ),
        (("multi_modal_projector",), 2 * tiles * c.tokens_per_tile * _count(model.multi_modal_projector)),
        (("language_model",), _llm_forward(model.language_model, seq_len)),
    ]
    return _by_role(model, trainable, forward, batch)


def _llm_forward(lm: nnx.Module, seq_len: int) -> float:
    c = lm.config
    return (
        2 * seq_len * _llm_matmul_params(lm)
        + c.num_hidden_layers * 4 * seq_len**2 * c.num_attention_heads * c.head_dim / 2
    )


def _by_role(
    model: nnx.Module, trainable, forward: list[tuple[tuple[str, ...], float]], batch: int
) -> dict[str, float]:
    """Step FLOPs by role of components given as (module names in compute order, forward FLOPs per sample). A
    component's trainable share is its trainable parameters' share (LoRA adapters: a small share of the LLM)."""
    out = {"trainable": 0.0, "frozen_on_gradient_path": 0.0, "frozen": 0.0}
    totals, trained = _by_top_module(model, nnx.Param), _by_top_module(model, trainable)
    on_path = False
    for names, f in forward:
        total, train = sum(totals[n] for n in names), sum(trained[n] for n in names)
        on_path = on_path or train > 0
        share = train / total if total else 0.0
        out["trainable"] += 3 * f * share
        out["frozen_on_gradient_path" if on_path else "frozen"] += (2 if on_path else 1) * f * (1 - share)
    out = {k: batch * x for k, x in out.items()}
    out["total"] = sum(out.values())
    return out
