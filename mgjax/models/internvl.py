"""Mini-InternVL / InternVL2: InternViT -> pixel unshuffle -> MLP projector -> a decoder LLM (Qwen2, InternLM2, Phi-3).

Our parameter tree follows transformers' ``InternVLForConditionalGeneration`` for the two new parts
(``vision_tower``, ``multi_modal_projector``) and nests the LLM as a whole ``*ForCausalLM`` (``language_model``),
so generation and caching are the decoder's own. Two checkpoint layouts map onto it:

* ``internvl``: InternVL's released checkpoints (``config.json`` model_type ``internvl_chat``): ``vision_model.*``
  in InternViT's own names with fused qkv, ``mlp1.{0,1,3}``, ``language_model.*`` in the LLM's own layout
  (InternLM2 packed ``wqkv``, Phi-3 fused tensors).
* ``hf``: transformers' native conversion (model_type ``internvl``; InternLM2 split into Llama names) as
  transformers 5 writes it: ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.{model,lm_head}.*``
  (our own tree). ``hf_modules``: the same under transformers' module names (``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head``), as some Hub repos store it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import jax
from flax import nnx

from mgjax.convert.keymap import HF, KeyLayout
from mgjax.models.base import ModelConfig, Pretrained, registered, require, split_overrides
from mgjax.models.decoder import DecoderConfig
from mgjax.models.internvit import InternVisionConfig, InternVisionModel
from mgjax.nn import layers
from mgjax.nn.merge import check_image_tokens, merge_image_embeddings


@dataclass(frozen=True, kw_only=True)
class InternVLConfig(ModelConfig):
    """``ps_version``: ``v2`` (every InternVL2 release) or ``v1`` (transposed token grid; InternVL's default when a
    config lacks the key). ``image_token_id``: ``<IMG_CONTEXT>``'s id (in transformers' config; InternVL's own
    config leaves it to the tokenizer, so it may be None until the tokenizer is read). ``native``: the config came
    from transformers (``internvl``) rather than InternVL (``internvl_chat``)."""

    model_type: ClassVar[str] = "internvl_chat"
    vision: InternVisionConfig
    llm: DecoderConfig
    downsample_ratio: float = 0.5
    ps_version: str = "v2"
    select_layer: int = -1
    projector_act: str = "gelu"
    image_token_id: int | None = None
    template: str | None = None
    native: bool = False

    @property
    def unshuffle(self) -> int:
        return round(1 / self.downsample_ratio)

    @property
    def tokens_per_tile(self) -> int:
        return (self.vision.grid // self.unshuffle) ** 2

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], **overrides) -> "InternVLConfig":
        shared, own = split_overrides(overrides)
        native = d.get("model_type") == "internvl"
        where = f"{d.get('model_type')} config"
        vision = InternVisionConfig.from_hf(require(d, "vision_config", where), **shared)
        text = dict(require(d, "text_config" if native else "llm_config", where))
        if native:  # transformers ties at the top level (default True); InternVL always unties
            text["tie_word_embeddings"] = d.get("tie_word_embeddings", True)
        else:
            text["tie_word_embeddings"] = False
        llm = registered(text.get("model_type")).config_class.from_hf(text, **shared)
        ps = "v2" if native else d.get("ps_version", "v1")
        if ps not in ("v1", "v2"):
            raise ValueError(f"{where}: ps_version {ps!r} is not v1 or v2")
        kw = dict(
            vision=vision,
            llm=llm,
            downsample_ratio=d.get("downsample_ratio", 0.5),
            ps_version=ps,
            select_layer=d.get("vision_feature_layer" if native else "select_layer", -1),
            projector_act=d.get("projector_hidden_act", "gelu"),
            image_token_id=d.get("image_token_id"),
            template=d.get("template"),
            native=native,
            hf=dict(d),
        )
        if native and d.get("vision_feature_select_strategy", "default") != "default":
            raise ValueError(f"{where}: vision_feature_select_strategy must be 'default' (CLS dropped)")
        return cls(**{**kw, **own}, **shared)

    def to_hf(self) -> dict[str, Any]:
        d = {**self.hf, "vision_config": self.vision.to_hf(), "downsample_ratio": self.downsample_ratio}
        if self.image_token_id is not None:
            d["image_token_id"] = self.image_token_id
        if self.native:
            return {
                **d,
                "model_type": "internvl",
                "architectures": ["InternVLForConditionalGeneration"],
                "text_config": self.llm.to_hf(),
                "vision_feature_layer": self.select_layer,
                "projector_hidden_act": self.projector_act,
                "tie_word_embeddings": self.llm.tie_word_embeddings,
            }
        return {
            **d,
            "model_type": self.model_type,
            "architectures": ["InternVLChatModel"],
            "llm_config": self.llm.to_hf(),
            "ps_version": self.ps_version,
            "select_layer": self.select_layer,
            "template": self.template,
        }


def pixel_unshuffle(x: jax.Array, factor: int, version: str = "v2") -> jax.Array:
    """[B, H, W, C] -> [B, (H/f)(W/f), f*f*C]: each f x f block of tokens becomes one token, channels ordered
    (dy, dx, c). ``v2`` orders the new tokens row-major; ``v1`` (InternVL's first release) column-major."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // factor, factor, w // factor, factor, c)
    grid = (0, 1, 3) if version == "v2" else (0, 3, 1)
    return x.transpose(*grid, 2, 4, 5).reshape(b, (h // factor) * (w // factor), factor * factor * c)


class Projector(nnx.Module):
    """InternVL's ``mlp1`` / transformers' ``multi_modal_projector``: LayerNorm (torch's default eps 1e-5) ->
    Linear -> GELU (exact) -> Linear."""

    def __init__(self, d_in: int, d_out: int, *, act: str, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = layers.LayerNorm(d_in, eps=1e-5, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = layers.Linear(d_in, d_out, axes=("embed", "mlp"), **kw)
        self.linear_2 = layers.Linear(d_out, d_out, axes=("embed", "mlp"), **kw)
        self.act = layers.activation(act)

    def __call__(self, x):
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class InternVLChatModel(nnx.Module, Pretrained):
    config_class = InternVLConfig

    @classmethod
    def layouts(cls, config: InternVLConfig) -> dict[str, KeyLayout]:
        llm = registered(config.llm.model_type).layouts(config.llm)
        vit = InternVisionModel.layouts(config.vision)
        internvl = KeyLayout(
            renames=(
                (r"^multi_modal_projector\.layer_norm\.", "mlp1.0."),
                (r"^multi_modal_projector\.linear_1\.", "mlp1.1."),
                (r"^multi_modal_projector\.linear_2\.", "mlp1.3."),
            ),
            children=(
                ("vision_tower.", "vision_model.", vit["internvit"]),
                ("language_model.", "language_model.", next(iter(llm.values()))),
            ),
        )
        hf = KeyLayout(
            children=(("vision_tower.", "vision_tower.", vit["hf"]), ("language_model.", "language_model.", llm["hf"]))
        )
        hf_modules = KeyLayout(
            renames=((r"^multi_modal_projector\.", "model.multi_modal_projector."),),
            children=(
                ("vision_tower.", "model.vision_tower.", vit["hf"]),
                ("language_model.model.", "model.language_model.", llm["hf"]),
                ("language_model.lm_head.", "lm_head.", HF),
            ),
        )
        if config.native:
            return {"hf": hf, "hf_modules": hf_modules, "internvl": internvl}
        return {"internvl": internvl, "hf": hf, "hf_modules": hf_modules}

    def __init__(self, config: InternVLConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision_tower = InternVisionModel(config.vision, rngs=rngs)
        self.multi_modal_projector = Projector(
            config.vision.hidden_size * config.unshuffle**2,
            config.llm.hidden_size,
            act=config.projector_act,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            rngs=rngs,
        )
        self.language_model = registered(config.llm.model_type)(config.llm, rngs=rngs)

    def image_features(
        self, pixel_values: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """Tiles [N, 3, H, W] -> LLM-width image embeddings [N, tokens_per_tile, D_llm]."""
        c = self.config
        x = self.vision_tower.features(
            pixel_values, select_layer=c.select_layer, deterministic=deterministic, rngs=rngs
        )
        n, t, d = x.shape
        side = round(t**0.5)
        x = pixel_unshuffle(x.reshape(n, side, side, d), c.unshuffle, c.ps_version)
        return self.multi_modal_projector(x)

    def embed(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        *,
        image_token_id: int | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """The LLM's input embeddings [B, T, D]: every ``image_token_id`` position of ``input_ids`` (row-major over
        the batch) takes the next image embedding of ``pixel_values``' tiles [N, 3, H, W], in order; text-only
        batches pass no pixels and run no vision tower. Training batches (static shapes) give each row its own tile
        slots, ``pixel_values`` [B, slots, 3, H, W]: a row's image positions take its own tiles in order, and the
        slots it does not fill are computed but unused."""
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None:
            return embeds
        token = image_token_id if image_token_id is not None else self.config.image_token_id
        if token is None:
            raise ValueError("no image_token_id: pass the tokenizer's <IMG_CONTEXT> id")
        slots = pixel_values.shape[:-4]
        feats = self.image_features(
            pixel_values.reshape(-1, *pixel_values.shape[-3:]), deterministic=deterministic, rngs=rngs
        )
        if slots:  # [B, slots]: per row
            feats = feats.reshape(slots[0], -1, feats.shape[-1])
            check_image_tokens(input_ids, token, feats.shape[1], up_to=True)
        else:
            feats = feats.reshape(-1, feats.shape[-1])
            check_image_tokens(input_ids, token, feats.shape[0])
        return merge_image_embeddings(embeds, input_ids == token, feats)

    def __call__(
        self,
        input_ids: jax.Array,
        pixel_values: jax.Array | None = None,
        *,
        attention_mask: jax.Array | None = None,
        image_token_id: int | None = None,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        logits: bool = True,
    ):
        """Logits [B, T, V] (``logits=False``: the final hidden states, for ``head``) and the LLM cache (see
        ``embed`` for how images enter; ``segment_ids``: packed samples, see the decoder's ``forward``)."""
        embeds = self.embed(
            input_ids, pixel_values, image_token_id=image_token_id, deterministic=deterministic, rngs=rngs
        )
        return self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, segment_ids=segment_ids, logits=logits
        )

    def head(self, h: jax.Array) -> jax.Array:
        return self.language_model.head(h)
