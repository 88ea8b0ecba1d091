"""ConvNeXt (HF ``ConvNextModel``): the trunk of Mini-Gemini's high-resolution tower (open_clip / timm
``convnext_large_d_320``).

Parameter paths equal ``ConvNextModel`` state-dict keys; ``TIMM`` maps them to the timm trunk layout that MGM's
checkpoint uses. Activations are NHWC throughout (``pixel_values`` arrive NCHW, as HF processors give them), so
every LayerNorm — HF's channels-first ones included — normalises the last axis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mgjax.convert.keymap import HF, KeyLayout
from mgjax.models.base import ModelConfig, Pretrained, require
from mgjax.nn import layers

FIELDS = (
    "num_channels",
    "patch_size",
    "hidden_sizes",
    "depths",
    "hidden_act",
    "layer_norm_eps",
    "layer_scale_init_value",
    "drop_path_rate",
    "final_norm",
    "block_norm_eps",
)


@dataclass(frozen=True, kw_only=True)
class ConvNextConfig(ModelConfig):
    """``final_norm``: whether the LayerNorm applied to the pooled output exists (HF: yes; the timm trunk MGM
    keeps: no). ``block_norm_eps``: the eps of the stem, downsampling and block norms (HF hard-codes 1e-6, timm's
    ``convnext_xxlarge`` uses 1e-5); ``layer_norm_eps`` is the final norm's only. Neither is an HF field; ``to_hf``
    writes them anyway so an exported trunk reloads as one."""

    model_type: ClassVar[str] = "convnext"
    num_channels: int = 3
    patch_size: int = 4
    hidden_sizes: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (3, 3, 9, 3)
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    layer_scale_init_value: float = 1e-6
    drop_path_rate: float = 0.0
    final_norm: bool = True
    block_norm_eps: float = 1e-6

    def __post_init__(self):
        # Lists from config.json would make the frozen config unhashable.
        object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        object.__setattr__(self, "depths", tuple(self.depths))
        if len(self.hidden_sizes) != len(self.depths):
            raise ValueError(f"hidden_sizes {self.hidden_sizes} and depths {self.depths} differ in length")

    def drop_path_rates(self) -> list[np.ndarray]:
        """Per-block stochastic-depth rates, rising linearly from 0 to ``drop_path_rate`` over all blocks."""
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths), dtype=np.float32)
        return np.split(rates, np.cumsum(self.depths)[:-1])

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], **overrides) -> "ConvNextConfig":
        for key in ("hidden_sizes", "depths"):
            require(d, key, f"{cls.model_type} config")
        if d.get("num_stages", len(d["depths"])) != len(d["depths"]):  # HF builds num_stages stages
            raise ValueError(f"{cls.model_type} config: num_stages {d['num_stages']} != len(depths) {d['depths']}")
        kw = {k: d[k] for k in FIELDS if k in d}
        return cls(**{**kw, "hf": dict(d), **overrides})

    def to_hf(self) -> dict[str, Any]:
        out = {
            **self.hf,
            "model_type": self.model_type,
            "architectures": ["ConvNextModel"],
            **{k: getattr(self, k) for k in FIELDS},
        }
        out.update(hidden_sizes=list(self.hidden_sizes), depths=list(self.depths), num_stages=len(self.depths))
        return out


def _norm(dim: int, c: ConvNextConfig, rngs: nnx.Rngs, eps: float | None = None) -> layers.LayerNorm:
    return layers.LayerNorm(dim, eps=c.block_norm_eps if eps is None else eps, param_dtype=c.param_dtype, rngs=rngs)


class ConvNextEmbeddings(nnx.Module):
    def __init__(self, c: ConvNextConfig, rngs: nnx.Rngs):
        self.patch_embeddings = layers.Conv2d(
            c.num_channels,
            c.hidden_sizes[0],
            c.patch_size,
            stride=c.patch_size,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            rngs=rngs,
        )
        self.layernorm = _norm(c.hidden_sizes[0], c, rngs)

    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        return self.layernorm(self.patch_embeddings(pixel_values.transpose(0, 2, 3, 1)))


class ConvNextLayer(nnx.Module):
    """One block: depthwise 7x7 -> LayerNorm -> Linear(C, 4C) -> act -> Linear(4C, C) -> layer scale -> drop path
    -> residual add."""

    def __init__(self, c: ConvNextConfig, dim: int, rngs: nnx.Rngs):
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.dwconv = layers.Conv2d(dim, dim, 7, padding=3, groups=dim, **kw)
        self.layernorm = _norm(dim, c, rngs)
        self.pwconv1 = layers.Linear(dim, 4 * dim, axes=("mlp", "embed"), bias=True, **kw)
        self.pwconv2 = layers.Linear(4 * dim, dim, axes=("embed", "mlp"), bias=True, **kw)
        self.act = layers.activation(c.hidden_act)
        self.layer_scale_parameter = (
            layers.param(
                rngs, lambda k, s, d: jnp.full(s, c.layer_scale_init_value, d), (dim,), ("norm",), c.param_dtype
            )
            if c.layer_scale_init_value > 0
            else None
        )

    def __call__(self, x: jax.Array, drop: tuple[jax.Array, jax.Array] | None):
        """``drop``: ``(rate, key)`` for this block, or None for no stochastic depth."""
        y = self.pwconv2(self.act(self.pwconv1(self.layernorm(self.dwconv(x)))))
        if self.layer_scale_parameter is not None:
            y = y * self.layer_scale_parameter[...].astype(y.dtype)
        if drop is not None:
            y = layers.drop_path(y, *drop)
        return x + y, None


class ConvNextStage(nnx.Module):
    def __init__(self, c: ConvNextConfig, index: int, rngs: nnx.Rngs):
        dim, prev = c.hidden_sizes[index], c.hidden_sizes[index - 1]
        # Stage 0 follows the stem directly (HF holds an empty ModuleList there: no keys).
        self.downsampling_layer = nnx.List(
            [
                _norm(prev, c, rngs),
                layers.Conv2d(prev, dim, 2, stride=2, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs),
            ]
            if index > 0
            else []
        )
        self.layers = layers.stack(lambda r: ConvNextLayer(c, dim, r), c.depths[index], rngs)
        self.remat = c.remat

    def __call__(self, x: jax.Array, drop) -> jax.Array:
        for layer in self.downsampling_layer:
            x = layer(x)
        x, _ = layers.scan(self.layers, x, drop, remat=self.remat)
        return x


class ConvNextEncoder(nnx.Module):
    def __init__(self, c: ConvNextConfig, rngs: nnx.Rngs):
        self.stages = nnx.List([ConvNextStage(c, i, rngs) for i in range(len(c.depths))])


class ConvNextOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, H/32, W/32, C_last] (NHWC) for the standard 4-stage, patch-4 model
    pooler_output: jax.Array  # [B, C_last]: mean over H, W, then the final LayerNorm when ``final_norm``
    hidden_states: tuple[jax.Array, ...]  # NHWC: the embedding output, then every stage's output (HF's order)


# timm / open_clip trunk names. timm's classifier head (its ``head.norm`` is the pooled-output norm) is
# dropped by MGM, so its keys are ignored rather than loaded.
TIMM = KeyLayout(
    renames=(
        (r"^embeddings\.patch_embeddings\.", "stem.0."),
        (r"^embeddings\.layernorm\.", "stem.1."),
        (r"^encoder\.stages\.(\d+)\.downsampling_layer\.", r"stages.\1.downsample."),
        (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2."),
        (r"^(stages\.\d+\.blocks\.\d+\.)dwconv\.", r"\1conv_dw."),
        (r"^(stages\.\d+\.blocks\.\d+\.)layernorm\.", r"\1norm."),
        (r"^(stages\.\d+\.blocks\.\d+\.)pwconv([12])\.", r"\1mlp.fc\2."),
        (r"^(stages\.\d+\.blocks\.\d+\.)layer_scale_parameter$", r"\1gamma"),
    ),
    ignore=(r"head\..*",),
)


# A whole open_clip ConvNeXt CLIP checkpoint (what MGM loads its HR tower from): the image trunk is
# ``visual.trunk.*`` in timm names; the text tower and the image head are not ours.
OPEN_CLIP = KeyLayout(children=(("", "visual.trunk.", TIMM),), ignore=(r"(?!visual\.trunk\.).*",))


class ConvNextModel(nnx.Module, Pretrained):
    config_class = ConvNextConfig
    key_layouts = {"hf": HF, "timm": TIMM, "open_clip": OPEN_CLIP}

    def __init__(self, config: ConvNextConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = ConvNextEmbeddings(config, rngs)
        self.encoder = ConvNextEncoder(config, rngs)
        self.layernorm = (
            _norm(config.hidden_sizes[-1], config, rngs, eps=config.layer_norm_eps) if config.final_norm else None
        )

    def __call__(
        self, pixel_values: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
    ) -> ConvNextOutput:
        """``pixel_values``: [B, C, H, W] (NCHW). Outputs are NHWC (see ``ConvNextOutput``).

        With ``deterministic=False`` and ``drop_path_rate > 0`` each block's residual branch is dropped per sample
        with its stochastic-depth rate, drawing from ``rngs.dropout()`` (MGM runs its frozen tower this way)."""
        c = self.config
        x = self.embeddings(pixel_values)
        hidden = [x]
        drops = [None] * len(c.depths)
        if not deterministic and c.drop_path_rate > 0:
            if rngs is None:
                raise ValueError("drop path (deterministic=False, drop_path_rate > 0) needs rngs")
            keys = jnp.split(jax.random.split(rngs.dropout(), sum(c.depths)), np.cumsum(c.depths)[:-1])
            drops = [(jnp.asarray(r), k) for r, k in zip(c.drop_path_rates(), keys)]
        for stage, drop in zip(self.encoder.stages, drops):
            x = stage(x, drop)
            hidden.append(x)
        pooled = x.mean(axis=(1, 2))
        if self.layernorm is not None:
            pooled = self.layernorm(pooled)
        return ConvNextOutput(x, pooled, tuple(hidden))
