"""InternViT (Mini-InternVL's vision tower), as transformers' ``InternVLVisionModel`` names it.

Pre-norm ViT with per-channel layer scale (``lambda_1/2``), a CLS token that runs through every layer and is
dropped afterwards, and no final norm (``use_mean_pooling``). InternVL's own checkpoints (``intern_vit_6b`` configs,
``vision_model.*`` inside InternVL2) name everything differently and fuse q/k/v into one ``qkv``; that is the
``internvit`` key layout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgjax.convert.keymap import HF, Fused, KeyLayout
from mgjax.models.base import ModelConfig, Pretrained, require
from mgjax.nn import attention, layers, resize

ORIGINAL_TYPE = "intern_vit_6b"  # InternVL's remote-code config, also used for InternViT-300M


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"internvit config: non-square {name} {value} is not supported")
        value = value[0]
    return int(value)


@dataclass(frozen=True, kw_only=True)
class InternVisionConfig(ModelConfig):
    """``original``: read from InternVL's ``intern_vit_6b`` config; written back and saved the same way."""

    model_type: ClassVar[str] = "internvl_vision"
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 448
    patch_size: int = 14
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    norm_type: str = "layer_norm"  # or "rms_norm" (InternViT-6B)
    attention_bias: bool = True
    use_qk_norm: bool = False
    use_mean_pooling: bool = True  # False adds a final LayerNorm (never in InternVL's own models)
    layer_scale_init_value: float = 0.1
    drop_path_rate: float = 0.0
    original: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def drop_path_rates(self) -> np.ndarray:
        """Stochastic-depth rate per layer, rising linearly from 0 to ``drop_path_rate``."""
        return np.linspace(0.0, self.drop_path_rate, self.num_hidden_layers, dtype=np.float32)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], **overrides) -> "InternVisionConfig":
        where = f"{d.get('model_type', cls.model_type)} config"
        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size"):
            require(d, key, where)
        original = d.get("model_type") == ORIGINAL_TYPE
        kw = dict(
            hidden_size=d["hidden_size"],
            intermediate_size=d.get("intermediate_size", 4 * d["hidden_size"]),
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_channels=d.get("num_channels", 3),
            image_size=_square(d["image_size"], "image_size"),
            patch_size=_square(d["patch_size"], "patch_size"),
            hidden_act=d.get("hidden_act", "gelu"),
            layer_norm_eps=d.get("layer_norm_eps", 1e-6),
            norm_type=d.get("norm_type", "layer_norm"),
            drop_path_rate=d.get("drop_path_rate", 0.0),
            original=original,
            hf=dict(d),
        )
        if original:
            kw.update(
                attention_bias=d.get("qkv_bias", True),
                use_qk_norm=d.get("qk_normalization", False),
                layer_scale_init_value=d.get("initializer_factor", 0.1),
            )
        else:
            kw.update(
                attention_bias=d.get("attention_bias", False),
                use_qk_norm=d.get("use_qk_norm", False),
                use_mean_pooling=d.get("use_mean_pooling", True),
                layer_scale_init_value=d.get("layer_scale_init_value", 0.1),
            )
        if kw["norm_type"] not in ("layer_norm", "rms_norm"):
            raise ValueError(f"{where}: norm_type {kw['norm_type']!r} is not layer_norm or rms_norm")
        return cls(**{**kw, **overrides})

    def to_hf(self) -> dict[str, Any]:
        d = {
            **self.hf,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_channels": self.num_channels,
            "hidden_act": self.hidden_act,
            "layer_norm_eps": self.layer_norm_eps,
            "norm_type": self.norm_type,
            "drop_path_rate": self.drop_path_rate,
        }
        if self.original:
            return {
                **d,
                "model_type": ORIGINAL_TYPE,
                "architectures": ["InternVisionModel"],
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "qkv_bias": self.attention_bias,
                "qk_normalization": self.use_qk_norm,
                "initializer_factor": self.layer_scale_init_value,
            }
        return {
            **d,
            "model_type": self.model_type,
            "architectures": ["InternVLVisionModel"],
            "image_size": [self.image_size] * 2,
            "patch_size": [self.patch_size] * 2,
            "attention_bias": self.attention_bias,
            "use_qk_norm": self.use_qk_norm,
            "use_mean_pooling": self.use_mean_pooling,
            "layer_scale_init_value": self.layer_scale_init_value,
        }


def _norm(c: InternVisionConfig, rngs: nnx.Rngs) -> nnx.Module:
    if c.norm_type == "rms_norm":
        return layers.RMSNorm(c.hidden_size, eps=c.layer_norm_eps, param_dtype=c.param_dtype, rngs=rngs)
    return layers.LayerNorm(c.hidden_size, eps=c.layer_norm_eps, param_dtype=c.param_dtype, rngs=rngs)


class PatchEmbeddings(nnx.Module):
    def __init__(self, c: InternVisionConfig, rngs: nnx.Rngs):
        self.projection = layers.Conv2d(
            c.num_channels,
            c.hidden_size,
            c.patch_size,
            stride=c.patch_size,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            rngs=rngs,
        )


class InternVisionEmbeddings(nnx.Module):
    def __init__(self, c: InternVisionConfig, rngs: nnx.Rngs):
        d = c.hidden_size
        self.cls_token = layers.param(rngs, layers.normal(0.02), (1, 1, d), (None, None, "embed"), c.param_dtype)
        self.patch_embeddings = PatchEmbeddings(c, rngs)
        self.position_embeddings = layers.param(
            rngs, layers.normal(0.02), (1, c.grid**2 + 1, d), (None, "positions", "embed"), c.param_dtype
        )
        self.config = c

    def positions(self, grid_h: int, grid_w: int) -> jax.Array:
        """[1 + grid_h * grid_w, D]: the table, bicubic-resized (as torch does) for a grid other than its own."""
        table = self.position_embeddings[0]
        g = self.config.grid
        if (grid_h, grid_w) == (g, g):
            return table
        patches = resize.bicubic_grid(table[1:].reshape(g, g, -1), grid_h, grid_w)
        return jnp.concatenate([table[:1], patches.reshape(grid_h * grid_w, -1).astype(table.dtype)])

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        c = self.config
        x = self.patch_embeddings.projection(pixel_values.transpose(0, 2, 3, 1))  # [B, H/p, W/p, D]
        b, gh, gw, d = x.shape
        cls = jnp.broadcast_to(self.cls_token[...].astype(c.dtype), (b, 1, d))
        return jnp.concatenate([cls, x.reshape(b, gh * gw, d)], axis=1) + self.positions(gh, gw).astype(c.dtype)


class InternVisionAttention(nnx.Module):
    def __init__(self, c: InternVisionConfig, rngs: nnx.Rngs):
        d = c.hidden_size
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.q_proj = layers.Linear(d, d, axes=("heads", "embed"), bias=c.attention_bias, **kw)
        self.k_proj = layers.Linear(d, d, axes=("heads", "embed"), bias=c.attention_bias, **kw)
        self.v_proj = layers.Linear(d, d, axes=("heads", "embed"), bias=c.attention_bias, **kw)
        self.projection_layer = layers.Linear(d, d, axes=("embed", "heads"), bias=True, **kw)
        # InternViT-6B normalises the whole q / k vector (all heads together), before the head split
        norm = dict(eps=c.layer_norm_eps, param_dtype=c.param_dtype, rngs=rngs)
        self.q_norm = layers.RMSNorm(d, **norm) if c.use_qk_norm else None
        self.k_norm = layers.RMSNorm(d, **norm) if c.use_qk_norm else None
        self.heads, self.impl = c.num_attention_heads, c.attention_impl

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        split = lambda y: y.reshape(b, t, self.heads, d // self.heads)  # noqa: E731
        q, k, v = (layers.named(split(y), n) for y, n in zip((q, k, v), layers.ATTENTION_NAMES))
        out = layers.named(attention.attention(q, k, v, scale=(d // self.heads) ** -0.5, impl=self.impl), "context")
        return layers.named(self.projection_layer(out.reshape(b, t, d)), "out_proj")


class InternVisionLayer(nnx.Module):
    def __init__(self, c: InternVisionConfig, rngs: nnx.Rngs):
        scale = lambda k, s, dt: jnp.full(s, c.layer_scale_init_value, dt)  # noqa: E731
        self.layernorm_before = _norm(c, rngs)
        self.attention = InternVisionAttention(c, rngs)
        self.lambda_1 = layers.param(rngs, scale, (c.hidden_size,), ("norm",), c.param_dtype)
        self.layernorm_after = _norm(c, rngs)
        self.mlp = layers.FeedForward(
            c.hidden_size, c.intermediate_size, act=c.hidden_act, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs
        )
        self.lambda_2 = layers.param(rngs, scale, (c.hidden_size,), ("norm",), c.param_dtype)

    def __call__(self, x, drop, *, keep: bool):
        """``drop``: ``(rate, key)`` for this layer's two stochastic-depth draws, or None."""
        branches = (
            (self.layernorm_before, self.attention, self.lambda_1),
            (self.layernorm_after, self.mlp, self.lambda_2),
        )
        keys = (None, None) if drop is None else jax.random.split(drop[1])
        for (norm, f, scale), key in zip(branches, keys):
            h = f(norm(x)) * scale[...].astype(x.dtype)
            x = x + (h if key is None else layers.drop_path(h, drop[0], key))
        return x, (x if keep else None)  # keep: stack every layer's output (HF's output_hidden_states)


class InternVisionEncoder(nnx.Module):
    def __init__(self, c: InternVisionConfig, rngs: nnx.Rngs):
        self.layer = layers.stack(lambda r: InternVisionLayer(c, r), c.num_hidden_layers, rngs)


class InternVisionOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, 1 + N, D] (after the final LayerNorm when use_mean_pooling is False)
    hidden_states: jax.Array  # [L + 1, B, 1 + N, D]: embeddings, then every layer


def _qkv(kind: str) -> tuple[str, ...]:
    return tuple(f"attention.{p}_proj.{kind}" for p in "qkv")


# InternVL's own names (InternViT-300M-448px, ``vision_model.*`` in InternVL2 checkpoints): fused qkv rows
# [q | k | v], ls1/ls2 layer scales, norm1/norm2.
INTERNVIT = KeyLayout(
    renames=(
        (r"^embeddings\.cls_token$", "embeddings.class_embedding"),
        (r"^embeddings\.position_embeddings$", "embeddings.position_embedding"),
        (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
        (r"^encoder\.layer\.", "encoder.layers."),
        (r"\.attention\.projection_layer\.", ".attn.proj."),
        (r"\.attention\.", ".attn."),
        (r"\.layernorm_before\.", ".norm1."),
        (r"\.layernorm_after\.", ".norm2."),
        (r"\.lambda_1$", ".ls1"),
        (r"\.lambda_2$", ".ls2"),
    ),
    fused=(Fused("attention.qkv.weight", _qkv("weight")), Fused("attention.qkv.bias", _qkv("bias"))),
)


class InternVisionModel(nnx.Module, Pretrained):
    config_class = InternVisionConfig

    @classmethod
    def layouts(cls, config):
        both = {"hf": HF, "internvit": INTERNVIT}
        return dict(reversed(both.items())) if config.original else both

    def __init__(self, config: InternVisionConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = InternVisionEmbeddings(config, rngs)
        self.encoder = InternVisionEncoder(config, rngs)
        self.layernorm = (
            None
            if config.use_mean_pooling
            else layers.LayerNorm(
                config.hidden_size, eps=config.layer_norm_eps, param_dtype=config.param_dtype, rngs=rngs
            )
        )

    def _drops(self, deterministic: bool, rngs: nnx.Rngs | None):
        c = self.config
        if deterministic or c.drop_path_rate == 0:
            return None
        if rngs is None:
            raise ValueError("drop path (deterministic=False, drop_path_rate > 0) needs rngs")
        return jnp.asarray(c.drop_path_rates()), jax.random.split(rngs.dropout(), c.num_hidden_layers)

    def _run(self, pixel_values, n_layers: int, keep: bool, drops):
        """Embeddings, then the first ``n_layers`` layers: ``(embeddings, last, per_layer)``."""
        x = self.embeddings(pixel_values)
        if n_layers == 0:
            return x, x, None
        stack = self.encoder.layer
        if n_layers < self.config.num_hidden_layers:
            stack = layers.first_layers(stack, n_layers)
            drops = None if drops is None else jax.tree.map(lambda a: a[:n_layers], drops)
        last, per_layer = layers.scan(stack, x, drops, remat=self.config.remat, keep=keep)
        return x, last, per_layer

    def __call__(
        self, pixel_values: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
    ) -> InternVisionOutput:
        """``pixel_values``: [B, C, H, W] (NCHW). ``deterministic=False`` applies stochastic depth (InternVL
        trains even its frozen ViT that way) with keys from ``rngs.dropout()``."""
        drops = self._drops(deterministic, rngs)
        x, last, per_layer = self._run(pixel_values, self.config.num_hidden_layers, True, drops)
        if self.layernorm is not None:
            last = self.layernorm(last)
        return InternVisionOutput(last, jnp.concatenate([x[None], per_layer]))

    def features(
        self,
        pixel_values: jax.Array,
        *,
        select_layer: int = -1,
        drop_cls: bool = True,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """What InternVL feeds its connector: HF ``hidden_states[select_layer]`` (-1: the last layer, no norm),
        CLS dropped after the encoder: [B, N, D]."""
        n_layers = layers.hidden_state_index(select_layer, self.config.num_hidden_layers)
        _, h, _ = self._run(pixel_values, n_layers, False, self._drops(deterministic, rngs))
        if select_layer == -1 and self.layernorm is not None:  # HF takes last_hidden_state there
            h = self.layernorm(h)
        return h[:, 1:] if drop_cls else h
