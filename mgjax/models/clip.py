"""CLIP vision transformer (HF ``CLIPVisionModel``): Mini-Gemini's low-resolution tower.

Parameter paths equal ``CLIPVisionModel`` state-dict keys. ``features`` gives what MGM consumes: the hidden
state of a chosen layer (MGM: the second to last) with the CLS token dropped, running only the layers needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.convert.keymap import HF, KeyLayout
from mgjax.models.base import ModelConfig, Pretrained, require
from mgjax.nn import attention, layers, resize

FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "image_size",
    "patch_size",
    "hidden_act",
    "layer_norm_eps",
)


@dataclass(frozen=True, kw_only=True)
class CLIPVisionConfig(ModelConfig):
    model_type: ClassVar[str] = "clip_vision_model"
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], **overrides) -> "CLIPVisionConfig":
        d = d.get("vision_config", d)  # a full CLIPModel config nests the tower's
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"):
            require(d, key, f"{cls.model_type} config")
        kw = {k: d[k] for k in FIELDS if k in d}
        return cls(**{**kw, "hf": dict(d), **overrides})

    def to_hf(self) -> dict[str, Any]:
        return {
            **self.hf,
            "model_type": self.model_type,
            "architectures": ["CLIPVisionModel"],
            **{k: getattr(self, k) for k in FIELDS},
        }


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, c: CLIPVisionConfig, rngs: nnx.Rngs):
        d, p = c.hidden_size, c.patch_size
        self.class_embedding = layers.param(rngs, layers.normal(d**-0.5), (d,), ("embed",), c.param_dtype)
        self.patch_embedding = layers.Conv2d(
            c.num_channels, d, p, stride=p, bias=False, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs
        )
        self.position_embedding = layers.Embedding(
            c.grid**2 + 1, d, axes=("positions", "embed"), param_dtype=c.param_dtype, rngs=rngs
        )
        self.config = c

    def positions(self, grid_h: int, grid_w: int) -> jax.Array:
        table = self.position_embedding.weight[...]
        g = self.config.grid
        if (grid_h, grid_w) == (g, g):
            return table
        patches = resize.bicubic_grid(table[1:].reshape(g, g, -1), grid_h, grid_w)
        return jnp.concatenate([table[:1], patches.reshape(grid_h * grid_w, -1).astype(table.dtype)])

    def __call__(self, pixel_values: jax.Array, interpolate_pos_encoding: bool) -> jax.Array:
        c = self.config
        b, _, h, w = pixel_values.shape
        if (h, w) != (c.image_size, c.image_size) and not interpolate_pos_encoding:
            raise ValueError(
                f"image size {h}x{w} differs from the model's {c.image_size}x{c.image_size}; "
                "pass interpolate_pos_encoding=True to interpolate the position embeddings"
            )
        x = self.patch_embedding(pixel_values.transpose(0, 2, 3, 1))  # [B, H/p, W/p, D]
        gh, gw = x.shape[1:3]
        x = x.reshape(b, gh * gw, -1)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(c.dtype), (b, 1, x.shape[-1]))
        return jnp.concatenate([cls, x], axis=1) + self.positions(gh, gw).astype(c.dtype)


class CLIPAttention(nnx.Module):
    def __init__(self, c: CLIPVisionConfig, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        d = c.hidden_size
        self.q_proj = layers.Linear(d, d, axes=("heads", "embed"), **kw)
        self.k_proj = layers.Linear(d, d, axes=("heads", "embed"), **kw)
        self.v_proj = layers.Linear(d, d, axes=("heads", "embed"), **kw)
        self.out_proj = layers.Linear(d, d, axes=("embed", "heads"), **kw)
        self.heads, self.impl = c.num_attention_heads, c.attention_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (layers.named(split(p(x)), n) for p, n in zip(projections, layers.ATTENTION_NAMES))
        out = layers.named(attention.attention(q, k, v, scale=(d // self.heads) ** -0.5, impl=self.impl), "context")
        return layers.named(self.out_proj(out.reshape(b, t, d)), "out_proj")


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, c: CLIPVisionConfig, rngs: nnx.Rngs):
        norm = dict(eps=c.layer_norm_eps, param_dtype=c.param_dtype, rngs=rngs)
        self.layer_norm1 = layers.LayerNorm(c.hidden_size, **norm)
        self.self_attn = CLIPAttention(c, rngs)
        self.layer_norm2 = layers.LayerNorm(c.hidden_size, **norm)
        self.mlp = layers.FeedForward(
            c.hidden_size, c.intermediate_size, act=c.hidden_act, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs
        )

    def __call__(self, x, _, *, keep: bool):
        x = x + self.self_attn(self.layer_norm1(x))
        x = x + self.mlp(self.layer_norm2(x))
        return x, (x if keep else None)  # keep: stack every layer's output (HF's output_hidden_states)


class CLIPOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, 1 + N, D]
    pooler_output: jax.Array  # [B, D]: post_layernorm(CLS)
    hidden_states: jax.Array  # [L + 1, B, 1 + N, D]: embeddings (after pre_layrnorm), then every layer


class CLIPEncoder(nnx.Module):
    def __init__(self, c: CLIPVisionConfig, rngs: nnx.Rngs):
        self.layers = layers.stack(lambda r: CLIPEncoderLayer(c, r), c.num_hidden_layers, rngs)


# A full ``CLIPModel`` checkpoint (OpenAI's, which MGM loads) and transformers 4 saves prefix every tower key
# with ``vision_model.``; the text tower and projections are not ours, nor the ``position_ids`` buffer that older
# transformers versions saved.
PREFIXED = KeyLayout(
    renames=((r"^", "vision_model."),),
    ignore=(
        r"text_model\..*",
        r"text_projection\..*",
        r"visual_projection\..*",
        r"logit_scale",
        r"vision_model\.embeddings\.position_ids",
    ),
)


class CLIPVisionModel(nnx.Module, Pretrained):
    config_class = CLIPVisionConfig
    key_layouts = {"hf": HF, "vision_model": PREFIXED}

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs):
        norm = dict(eps=config.layer_norm_eps, param_dtype=config.param_dtype, rngs=rngs)
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config, rngs)
        self.pre_layrnorm = layers.LayerNorm(config.hidden_size, **norm)  # sic: HF's spelling
        self.encoder = CLIPEncoder(config, rngs)
        self.post_layernorm = layers.LayerNorm(config.hidden_size, **norm)

    def _run(self, pixel_values, interpolate_pos_encoding, n_layers, keep):
        """Embeddings (after pre_layrnorm), then the first ``n_layers`` layers: ``(x, last, per_layer)``."""
        x = self.pre_layrnorm(self.embeddings(pixel_values, interpolate_pos_encoding))
        if n_layers == 0:
            return x, x, None
        stack = self.encoder.layers
        if n_layers < self.config.num_hidden_layers:
            stack = layers.first_layers(stack, n_layers)
        last, per_layer = layers.scan(stack, x, remat=self.config.remat, keep=keep)
        return x, last, per_layer

    def __call__(self, pixel_values: jax.Array, *, interpolate_pos_encoding: bool = False) -> CLIPOutput:
        """``pixel_values``: [B, C, H, W] (NCHW, as HF image processors produce)."""
        x, last, per_layer = self._run(pixel_values, interpolate_pos_encoding, self.config.num_hidden_layers, True)
        pooled = self.post_layernorm(last[:, 0])
        hidden = x[None] if per_layer is None else jnp.concatenate([x[None], per_layer])
        return CLIPOutput(last, pooled, hidden)

    def features(
        self,
        pixel_values: jax.Array,
        *,
        select_layer: int = -2,
        drop_cls: bool = True,
        interpolate_pos_encoding: bool = False,
    ) -> jax.Array:
        """HF ``hidden_states[select_layer]`` (index 0 = embeddings), CLS dropped: [B, N, D]."""
        n_layers = layers.hidden_state_index(select_layer, self.config.num_hidden_layers)
        _, h, _ = self._run(pixel_values, interpolate_pos_encoding, n_layers, False)
        return h[:, 1:] if drop_cls else h
