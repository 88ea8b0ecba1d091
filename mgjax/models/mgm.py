"""Mini-Gemini (MGM): CLIP (low-res) + ConvNeXt (high-res) towers, patch info mining, ``mlp2x_gelu``, a decoder LLM.

Follows MGM's released code (``../shared/specs/mgm.md``): CLIP's second-to-last layer without CLS; the four ConvNeXt
stage maps bilinearly upsampled to stride 4 and concatenated; mining (``mgjax.models.mining``); the projector on
``clip + mined``. HD models (``image_grid`` 2, ``image_global``) see a 2x2 grid of 336 crops plus a global view, the
ConvNeXt runs once on the 1536 image, crops take quarters of its map and the global view its 2x2 average; tokens
come global first, then crops row-major.

Our tree nests the LLM whole (``language_model``) and names the projectors; the ``mgm`` key layout maps it onto a
released MGM checkpoint (LLM keys at the top level, ``model.vision_tower.vision_tower.vision_model.*``,
``model.vision_tower_aux.vision_stem/vision_stages.*`` in timm names, ``model.mm_projector.{0,2}``,
``model.vlm_uni_{query,aux,val}_projector.{0,1}``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from mgjax.convert.keymap import KeyLayout
from mgjax.models import hr_projection, mining
from mgjax.models.base import ModelConfig, Pretrained, registered, split_overrides
from mgjax.models.clip import PREFIXED, CLIPVisionConfig, CLIPVisionModel
from mgjax.models.convnext import TIMM, ConvNextConfig, ConvNextModel
from mgjax.models.decoder import DecoderConfig
from mgjax.models.hr_projection import PreNormLinear
from mgjax.nn import layers, resize
from mgjax.nn.merge import check_image_tokens, merge_image_embeddings

IMAGE_TOKEN_INDEX = -200  # MGM's placeholder id: never a vocabulary entry
FAMILIES = {"mgm": "llama", "mini_gemini": "llama", "mgm_gemma": "gemma", "mgm_mixtral": "mixtral"}

# The towers MGM names by local path in config.json (mm_vision_tower / mm_vision_tower_aux), as configs.
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
# The timm ConvNeXt trunks open_clip builds MGM's HR tower from (MGM drops the head, so no final norm); tiny and
# small are open_clip trunks too (no MGM release uses them).
TIMM_TRUNKS = {
    "convnext_tiny": dict(hidden_sizes=(96, 192, 384, 768), depths=(3, 3, 9, 3), block_norm_eps=1e-6),
    "convnext_small": dict(hidden_sizes=(96, 192, 384, 768), depths=(3, 3, 27, 3), block_norm_eps=1e-6),
    "convnext_base": dict(hidden_sizes=(128, 256, 512, 1024), depths=(3, 3, 27, 3), block_norm_eps=1e-6),
    "convnext_large": dict(hidden_sizes=(192, 384, 768, 1536), depths=(3, 3, 27, 3), block_norm_eps=1e-6),
    "convnext_xxlarge": dict(hidden_sizes=(384, 768, 1536, 3072), depths=(3, 4, 30, 3), block_norm_eps=1e-5),
}
# MGM's routing of an HR tower path (spec 1.3): name fragments -> trunk, checked in MGM's order.
CONVNEXT_NAMES = (
    (("large", "d-320"), "convnext_large"),
    (("base", "w-320"), "convnext_base"),
    (("xxlarge",), "convnext_xxlarge"),
)
HR_DROP_PATH = 0.1  # open_clip's timm_drop_path, live unless MGM's config says drop_path: false


def convnext_trunk(timm_name: str, drop_path_rate: float, **shared) -> ConvNextConfig:
    return ConvNextConfig(
        **TIMM_TRUNKS[timm_name], layer_norm_eps=1e-6, drop_path_rate=drop_path_rate, final_norm=False, **shared
    )


def convnext_by_name(tower: str) -> str | None:
    """The timm trunk MGM builds for an HR tower path, or None if MGM would not recognise it."""
    name = tower.replace("_", "-")
    return next(
        (trunk for parts, trunk in CONVNEXT_NAMES if "convnext" in name and all(p in name for p in parts)), None
    )


def _vision(d: Mapping[str, Any], shared) -> CLIPVisionConfig:
    if "vision_config" in d:
        return CLIPVisionConfig.from_hf(d["vision_config"], **shared)
    tower = d.get("mm_vision_tower", "")
    if "clip-vit-large-patch14-336" not in tower:
        raise ValueError(
            f"mgm config: mm_vision_tower {tower!r} is not a CLIP MGM's releases use; load the "
            "checkpoint with its tower directory in reach (towers_root) so its config.json is read, "
            "or add a 'vision_config'"
        )
    return CLIPVisionConfig(**CLIP_L_336, **shared)


def _vision_aux(d: Mapping[str, Any], shared) -> ConvNextConfig:
    if "vision_aux_config" in d:
        return ConvNextConfig.from_hf(d["vision_aux_config"], **shared)
    tower = d.get("mm_vision_tower_aux", "")
    trunk = convnext_by_name(tower)
    if trunk is None:
        raise ValueError(
            f"mgm config: mm_vision_tower_aux {tower!r} is not a ConvNeXt MGM knows by name "
            "(convnext + large + d-320, base + w-320, or xxlarge); load the checkpoint with its tower "
            "directory in reach (towers_root) so its open_clip_config.json is read, or add a "
            "'vision_aux_config'"
        )
    return convnext_trunk(trunk, HR_DROP_PATH if d.get("drop_path", True) else 0.0, **shared)


@dataclass(frozen=True, kw_only=True)
class MGMConfig(ModelConfig):
    model_type: ClassVar[str] = "mgm"
    vision: CLIPVisionConfig
    vision_aux: ConvNextConfig
    llm: DecoderConfig
    select_layer: int = -2
    image_size_aux: int = 768
    image_grid: int = 1
    image_global: bool = False
    mining: bool = True  # False: the LR-only ablation (no HR tower, no mining; images_aux are ignored)
    mining_backend: str = "auto"  # mining.local_window_attention's: auto | xla | pallas (a run-time choice)

    @property
    def views(self) -> int:
        """336-pixel images per sample: 1, or the grid's crops plus the global view (HD: 5)."""
        return self.image_grid**2 + int(self.image_global) if self.image_grid > 1 else 1

    @property
    def tokens_per_image(self) -> int:
        return self.views * self.vision.grid**2

    @classmethod
    def from_hf(cls, d: Mapping[str, Any], **overrides) -> "MGMConfig":
        shared, own = split_overrides(overrides)
        kind = d.get("model_type")
        if kind not in FAMILIES:
            raise ValueError(f"mgm config: model_type {kind!r} is not one of {sorted(FAMILIES)}")
        if d.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
            raise ValueError(f"mgm config: mm_projector_type {d['mm_projector_type']!r} is not mlp2x_gelu")
        llm_d = {k: v for k, v in d.items() if k not in ("vision_config", "vision_aux_config")}
        llm_d["model_type"] = FAMILIES[kind]
        llm = registered(FAMILIES[kind]).config_class.from_hf(llm_d, **shared)
        kw = dict(
            vision=_vision(d, shared),
            vision_aux=_vision_aux(d, shared),
            llm=llm,
            select_layer=d.get("mm_vision_select_layer", -2),
            image_size_aux=d.get("image_size_aux", 768),
            image_grid=d.get("image_grid", 1),
            image_global=d.get("image_global", False),
            mining=d.get("mining", True),
            hf=dict(d),
        )
        return cls(**{**kw, **own}, **shared)

    def to_hf(self) -> dict[str, Any]:
        kind = next(k for k, fam in FAMILIES.items() if fam == self.llm.model_type)
        return {
            **self.hf,
            **self.llm.to_hf(),
            "model_type": kind,
            "mm_vision_select_layer": self.select_layer,
            "mm_hidden_size": self.vision.hidden_size,
            "mm_hidden_size_aux": sum(self.vision_aux.hidden_sizes),
            "mm_projector_type": "mlp2x_gelu",
            "image_size_aux": self.image_size_aux,
            "image_grid": self.image_grid,
            "image_global": self.image_global,
            **({} if self.mining else {"mining": False}),  # mgjax's LR-only ablation; MGM has no such key
            "vision_config": self.vision.to_hf(),
            "vision_aux_config": self.vision_aux.to_hf(),
        }


def _crops(x: jax.Array, g: int) -> jax.Array:
    """[B, H, W, C] -> [B * g * g, H / g, W / g, C]: each map's g x g crops, row-major."""
    b, h, w, c = x.shape
    return x.reshape(b, g, h // g, g, w // g, c).transpose(0, 1, 3, 2, 4, 5).reshape(b * g * g, h // g, w // g, c)


class MLPProjector(nnx.Module):
    """LLaVA's ``mlp2x_gelu``: Linear -> GELU (exact) -> Linear."""

    def __init__(self, d_in: int, d_out: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = layers.Linear(d_in, d_out, axes=("mlp", "embed"), **kw)
        self.linear_2 = layers.Linear(d_out, d_out, axes=("embed", "mlp"), **kw)

    def __call__(self, x):
        return self.linear_2(layers.activation("gelu")(self.linear_1(x)))


# MGM keeps open_clip's ConvNeXt trunk as ``vision_stem`` / ``vision_stages`` in timm's block names.
MGM_CONVNEXT = KeyLayout(
    renames=TIMM.renames + ((r"^stem\.", "vision_stem."), (r"^stages\.", "vision_stages.")), ignore=TIMM.ignore
)


class MGMForCausalLM(nnx.Module, Pretrained):
    config_class = MGMConfig

    @classmethod
    def layouts(cls, config: MGMConfig) -> dict[str, KeyLayout]:
        llm = next(iter(registered(config.llm.model_type).layouts(config.llm).values()))
        return {
            "mgm": KeyLayout(
                renames=(
                    (r"^mm_projector\.linear_1\.", "model.mm_projector.0."),
                    (r"^mm_projector\.linear_2\.", "model.mm_projector.2."),
                    (r"^(vlm_uni_\w+_projector)\.norm\.", r"model.\1.0."),
                    (r"^(vlm_uni_\w+_projector)\.linear\.", r"model.\1.1."),
                ),
                children=(
                    ("vision_tower.", "model.vision_tower.vision_tower.", PREFIXED),
                    ("vision_tower_aux.", "model.vision_tower_aux.", MGM_CONVNEXT),
                    ("language_model.", "", llm),
                ),
            )
        }

    def __init__(self, config: MGMConfig, *, rngs: nnx.Rngs):
        c = config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        width, aux = c.vision.hidden_size, sum(c.vision_aux.hidden_sizes)
        self.config = c
        self.vision_tower = CLIPVisionModel(c.vision, rngs=rngs)
        if c.mining:
            self.vision_tower_aux = ConvNextModel(c.vision_aux, rngs=rngs)
            self.vlm_uni_query_projector = PreNormLinear(width, width, **kw)
            self.vlm_uni_aux_projector = PreNormLinear(aux, width, **kw)
            self.vlm_uni_val_projector = PreNormLinear(aux, width, **kw)
        self.mm_projector = MLPProjector(width, c.llm.hidden_size, **kw)
        self.language_model = registered(c.llm.model_type)(c.llm, rngs=rngs)

    def hr_features(
        self, images_aux: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """[B, 3, S, S] -> [B, S/4, S/4, sum(stage widths)]: MGM's HR map, every stage map resized (bilinear,
        float32) to the first stage's size, cast and concatenated on channels. Mining never builds it (its heads run
        stage by stage, ``hr_projection``); this is the map for inspection and parity."""
        stages = self.vision_tower_aux(images_aux, deterministic=deterministic, rngs=rngs).hidden_states[1:]
        h, w = stages[0].shape[1:3]
        dtype = self.config.dtype
        return jnp.concatenate(
            [stages[0].astype(dtype)] + [resize.bilinear(s, h, w).astype(dtype) for s in stages[1:]], -1
        )

    def mine(self, low: jax.Array, keys: jax.Array, values: jax.Array) -> jax.Array:
        """Patch info mining: low-res tokens [B, N, C] plus what each finds in its window of the HR map's key and
        value projections [B, H, W, C] (``hr_projection``)."""
        n = round(low.shape[1] ** 0.5)
        q = self.vlm_uni_query_projector(low)
        k, v = mining.windows(keys, n), mining.windows(values, n)
        return low + mining.local_window_attention(q, k, v, backend=self.config.mining_backend).astype(low.dtype)

    def image_features(
        self, images: jax.Array, images_aux: jax.Array, *, deterministic: bool = True, rngs: nnx.Rngs | None = None
    ) -> jax.Array:
        """LLM-width image tokens [B, tokens_per_image, D]. ``images``: [B, 3, 336, 336], or HD
        [B, views, 3, 336, 336] (crops row-major, then the global view); ``images_aux``: [B, 3, S, S]."""
        c = self.config
        low = self.vision_tower.features(images.reshape(-1, *images.shape[-3:]), select_layer=c.select_layer)
        if not c.mining:
            return self.mm_projector(low.reshape(images.shape[0], -1, low.shape[-1]))
        stages = self.vision_tower_aux(images_aux, deterministic=deterministic, rngs=rngs).hidden_states[1:]
        # Mining is recomputed in the backward from the stage maps, not kept across the LLM: its key and value maps
        # are full resolution (MGM-2B, 16 rows of 768 px per v5p chip: two bf16[16, 192, 192, 1024], 2.25 GiB,
        # against 0.8 GiB of stage maps). The HR map itself is never built (``hr_projection``).
        graphdef, state = nnx.split(self)  # functional: the model may be a merge inside a raw JAX transform
        mined = jax.checkpoint(lambda state, low, stages: nnx.merge(graphdef, state).mined_tokens(low, stages))
        return mined(state, low.reshape(-1, c.views, *low.shape[1:]), stages)

    def mined_tokens(self, low: jax.Array, stages: Sequence[jax.Array]) -> jax.Array:
        """The LLM-width image tokens [B, tokens, D] from the CLIP features ``low`` [B, views, N, C] and the ConvNeXt
        stage maps."""
        c = self.config
        b, g = low.shape[0], c.image_grid
        low = low.reshape(b * c.views, *low.shape[2:])
        heads = (self.vlm_uni_aux_projector, self.vlm_uni_val_projector)
        upsampling = hr_projection.upsampling(stages)
        keys, values = hr_projection.project(stages, upsampling, heads)
        if g == 1:
            return self.mm_projector(self.mine(low, keys, values))
        low = low.reshape(b, c.views, *low.shape[1:])
        tokens = self.mine(low[:, : g * g].reshape(b * g * g, *low.shape[2:]), _crops(keys, g), _crops(values, g))
        tokens = tokens.reshape(b, -1, low.shape[-1])
        if c.image_global:  # the global view pairs with the HR map's 2x2 average, and comes first
            _, h, w, _ = keys.shape
            average = hr_projection.then(
                upsampling, resize.bilinear_matrix(h, h // g), resize.bilinear_matrix(w, w // g)
            )
            glob = self.mine(low[:, -1], *hr_projection.project(stages, average, heads))
            tokens = jnp.concatenate([glob, tokens], axis=1)
        return self.mm_projector(tokens)

    def embed(
        self,
        input_ids: jax.Array,
        images: jax.Array | None = None,
        images_aux: jax.Array | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
    ) -> jax.Array:
        """The LLM's input embeddings [B, T, D]. A row's image (``images[b]``) occupies ``tokens_per_image``
        consecutive ``IMAGE_TOKEN_INDEX`` (-200) ids (static shapes; MGM splices one -200 dynamically); a
        text-only row has none, and its (zero) image is ignored."""
        is_image = input_ids == IMAGE_TOKEN_INDEX
        embeds = self.language_model.embed(jnp.where(is_image, 0, input_ids))
        if images is None:
            return embeds
        feats = self.image_features(images, images_aux, deterministic=deterministic, rngs=rngs)
        check_image_tokens(input_ids, IMAGE_TOKEN_INDEX, feats.shape[1], per_row=True)
        return merge_image_embeddings(embeds, is_image, feats)

    def __call__(
        self,
        input_ids: jax.Array,
        images: jax.Array | None = None,
        images_aux: jax.Array | None = None,
        *,
        attention_mask: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        logits: bool = True,
    ):
        """Logits [B, T, V] (``logits=False``: the final hidden states, for ``head``) and the LLM cache (see
        ``embed`` for how images enter)."""
        embeds = self.embed(input_ids, images, images_aux, deterministic=deterministic, rngs=rngs)
        return self.language_model(inputs_embeds=embeds, attention_mask=attention_mask, logits=logits)

    def head(self, h: jax.Array) -> jax.Array:
        return self.language_model.head(h)
