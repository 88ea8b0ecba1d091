"""What more than one test file uses (a helper one file alone uses stays in that file; fixtures are in conftest.py):

* ``max_abs``, the error the parity tests report;
* the word-level tokenizer the tiny checkpoints carry;
* the tiny MGM and InternVL2 configs the training tests build, and their batches;
* the checkpoint layouts written by hand from transformers' keys: timm's ConvNeXt, InternLM2 (packed wqkv) and its
  rotary embedding, InternViT (fused qkv);
* the tiny InternVL2 transformers model;
* MGM's PyTorch reference (towers, mining, splicing) with its inputs, and the ``model_zoo/`` its released
  checkpoints name their towers by.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from mgjax.models.clip import CLIPVisionConfig
from mgjax.models.convnext import ConvNextConfig
from mgjax.models.decoder import LlamaConfig, Qwen2Config
from mgjax.models.internvit import InternVisionConfig
from mgjax.models.internvl import InternVLConfig
from mgjax.models.mgm import IMAGE_TOKEN_INDEX, MGMConfig


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# ------------------------------------------------------------------------------------------------------- tokenizer
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<image>"]
WORDS = ["[UNK]", *SPECIALS, "user", "assistant", "system", "what", "is", "this", "?", "a", "red", "cat", ".", "\n"]


def tokenizer():
    """A word-level tokenizer small enough for the tiny models' 160-entry vocabularies."""
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="[UNK]",
        additional_special_tokens=SPECIALS[2:],
    )


# --------------------------------------------------------------------------------------- tiny training models
TINY_MGM = MGMConfig(
    vision=CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7
    ),
    vision_aux=ConvNextConfig(hidden_sizes=(8, 16, 24, 32), depths=(1, 1, 1, 1), final_norm=False),
    llm=LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    ),
    image_size_aux=64,
)


def tiny_mgm_batch(micro=1, per=4, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 64, (micro, per, 24))
    ids[..., 1:17] = IMAGE_TOKEN_INDEX  # 16 image tokens after a BOS-like first token
    labels = np.where(ids == IMAGE_TOKEN_INDEX, -100, ids)
    labels[..., :18] = -100  # only the answer part is trained
    return {
        "input_ids": jnp.asarray(ids, jnp.int32),
        "labels": jnp.asarray(labels, jnp.int32),
        "images": jnp.asarray(rng.normal(size=(micro, per, 3, 28, 28)), jnp.float32),
        "images_aux": jnp.asarray(rng.normal(size=(micro, per, 3, 64, 64)), jnp.float32),
    }


TINY_INTERNVL_IMAGE = 5
TINY_INTERNVL = InternVLConfig(
    vision=InternVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=28, patch_size=7
    ),
    llm=Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    ),
    image_token_id=TINY_INTERNVL_IMAGE,
)


def tiny_internvl_batch(seed=0, rows=2, length=16):
    rng = np.random.default_rng(seed)
    ids = rng.integers(6, 64, (rows, length))
    ids[:, 1 : 1 + TINY_INTERNVL.tokens_per_tile] = TINY_INTERNVL_IMAGE  # one tile per row
    labels = np.where(ids == TINY_INTERNVL_IMAGE, -100, ids)
    return {
        "input_ids": jnp.asarray(ids[None], jnp.int32),
        "labels": jnp.asarray(labels[None], jnp.int32),
        "pixel_values": jnp.asarray(rng.normal(size=(1, rows, 3, 28, 28)), jnp.float32),
    }


# ----------------------------------------------------------------------------------------------- timm ConvNeXt
# The timm / open_clip trunk names, written out independently of mgjax's TIMM layout.
TIMM_PREFIXES = {
    "embeddings.patch_embeddings.": "stem.0.",
    "embeddings.layernorm.": "stem.1.",
    "encoder.stages.": "stages.",
}
TIMM_PARTS = {
    "downsampling_layer": "downsample",
    "layers": "blocks",
    "dwconv": "conv_dw",
    "layernorm": "norm",
    "pwconv1": "mlp.fc1",
    "pwconv2": "mlp.fc2",
    "layer_scale_parameter": "gamma",
}


def timm_name(hf_key: str) -> str:
    for old, new in TIMM_PREFIXES.items():
        if hf_key.startswith(old):
            hf_key = new + hf_key[len(old) :]
    return ".".join(TIMM_PARTS.get(part, part) for part in hf_key.split("."))


# --------------------------------------------------------------------------------------------------- InternLM2
INTERNLM2_RENAMES = {
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


def to_internlm2(state: dict, heads: int, kv: int) -> dict:
    """A Llama state dict (numpy) in InternLM2's own names, q/k/v packed into ``wqkv``."""
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
            for old, new in INTERNLM2_RENAMES.items():
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
        to_internlm2(state, c.num_attention_heads, c.num_key_value_heads),
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


# ---------------------------------------------------------------------------------------------------- InternViT
# InternVL's own key for each transformers key (the fused qkv is built separately)
INTERNVIT_ORIGINAL = [
    ("embeddings.cls_token", "embeddings.class_embedding"),
    ("embeddings.position_embeddings", "embeddings.position_embedding"),
    ("embeddings.patch_embeddings.projection.", "embeddings.patch_embedding."),
    ("encoder.layer.", "encoder.layers."),
    (".attention.projection_layer.", ".attn.proj."),
    (".attention.q_norm.", ".attn.q_norm."),
    (".attention.k_norm.", ".attn.k_norm."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
    (".lambda_1", ".ls1"),
    (".lambda_2", ".ls2"),
]


def internvit_to_original(state: dict) -> dict:
    """A transformers InternVLVisionModel state dict in InternVL's own names, q/k/v fused into ``qkv``."""
    out = {}
    for key, value in state.items():
        if ".attention.q_proj." in key:
            kind = key.rsplit(".", 1)[1]
            layer = key.split(".attention.")[0].replace("encoder.layer.", "encoder.layers.")
            out[f"{layer}.attn.qkv.{kind}"] = torch.cat(
                [state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            )
        elif ".attention.k_proj." in key or ".attention.v_proj." in key:
            continue
        else:
            for old, new in INTERNVIT_ORIGINAL:
                key = key.replace(old, new)
            out[key] = value.contiguous()
    return out


# ---------------------------------------------------------------------------------------------------- InternVL2
INTERNVL_IMAGE_TOKEN = 150
INTERNVL_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=[28, 28],
    patch_size=[7, 7],
    attention_bias=True,
)  # 4x4 patches -> 2x2 = 4 tokens per tile
INTERNVL_TEXT = {
    "qwen2": dict(
        model_type="qwen2",
        vocab_size=160,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    # InternVL2-2B's InternLM2 is a Llama in transformers' conversion (head_dim 16, as tests/test_internlm2 packs)
    "llama": dict(
        model_type="llama",
        vocab_size=160,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "phi3": dict(
        model_type="phi3",
        vocab_size=160,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    ),
}


def internvl_hf_model(text):
    """A tiny transformers InternVLForConditionalGeneration with the ``text`` LLM of ``INTERNVL_TEXT``."""
    torch.manual_seed(0)
    cfg = transformers.InternVLConfig(
        vision_config=INTERNVL_VISION,
        text_config=INTERNVL_TEXT[text],
        image_token_id=INTERNVL_IMAGE_TOKEN,
        tie_word_embeddings=False,
    )
    model = transformers.InternVLForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(s in name for s in ("norm", "bias", "cls_token", "lambda")):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


# --------------------------------------------------------------------------------------------------------- MGM
MGM_CLIP = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=28,
    patch_size=7,
    hidden_act="quick_gelu",
)  # 4x4 = 16 low-res tokens
MGM_CONVNEXT = dict(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 2, 1], layer_scale_init_value=0.5)  # 80 channels
MGM_LLAMA = dict(
    vocab_size=160,
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=False,
)
MGM_MODES = {
    "standard": dict(image_grid=1, image_global=False, image_size_aux=64),  # HR 16x16 map: 4x4 windows
    "hd": dict(image_grid=2, image_global=True, image_size_aux=128),  # HR 32x32; crops and global 16x16
    "gemma": dict(image_grid=1, image_global=False, image_size_aux=64),
}  # MGM-2B: Gemma scales image tokens too
MGM_GEMMA = dict(MGM_LLAMA, head_dim=12, tie_word_embeddings=True)


def _perturbed(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias") or "layer_scale" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


class MGMReference(torch.nn.Module):
    """MGM's forward as its code runs it, on transformers towers and LM."""

    def __init__(self, mode, convnext=MGM_CONVNEXT, clip=MGM_CLIP, llm=None, modes=MGM_MODES):
        """Tiny towers and LM by default; ``bench/device_suite.py`` builds release-shaped ones."""
        super().__init__()
        torch.manual_seed(0)
        self.mode = modes[mode]
        self.clip = _perturbed(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**clip)))
        self.convnext = _perturbed(transformers.ConvNextModel(transformers.ConvNextConfig(**convnext)))
        self.gemma = mode == "gemma"
        llm = llm or (MGM_GEMMA if self.gemma else MGM_LLAMA)
        self.llm = _perturbed(
            transformers.GemmaForCausalLM(transformers.GemmaConfig(**llm))
            if self.gemma
            else transformers.LlamaForCausalLM(transformers.LlamaConfig(**llm))
        )
        c, aux, d = clip["hidden_size"], sum(convnext["hidden_sizes"]), llm["hidden_size"]
        pre_norm = lambda i, o: torch.nn.Sequential(torch.nn.LayerNorm(i), torch.nn.Linear(i, o))  # noqa: E731
        self.query, self.key, self.val = pre_norm(c, c), pre_norm(aux, c), pre_norm(aux, c)
        self.mm_projector = torch.nn.Sequential(torch.nn.Linear(c, d), torch.nn.GELU(), torch.nn.Linear(d, d))
        _perturbed(self)

    def hr_map(self, x):
        stages = self.convnext(x, output_hidden_states=True).hidden_states[1:]
        size = stages[0].shape[-2:]
        return torch.cat(
            [stages[0]]
            + [F.interpolate(s.float(), size=size, mode="bilinear", align_corners=False) for s in stages[1:]],
            dim=1,
        )

    def mine(self, low, high):
        b, ch, h, w = high.shape
        n = int(low.shape[1] ** 0.5)
        m = w // n
        win = high.permute(0, 2, 3, 1).reshape(b, n, m, n, m, ch).permute(0, 1, 3, 2, 4, 5).reshape(b, n * n, m * m, ch)
        q, k, v = self.query(low), self.key(win), self.val(win)
        s = torch.nan_to_num(q[:, :, None, :] @ (k / k.shape[-1] ** 0.5).transpose(-1, -2))
        return low + (s.softmax(-1) @ v).mean(2)

    def features(self, images, images_aux):
        clip = lambda x: self.clip(x, output_hidden_states=True).hidden_states[-2][:, 1:]  # noqa: E731
        high = self.hr_map(images_aux)
        if self.mode["image_grid"] == 1:
            return self.mm_projector(self.mine(clip(images), high))
        b = images.shape[0]
        low = clip(torch.cat([images[:, :-1].flatten(0, 1), images[:, -1]]))
        crops_low, glob_low = low[: 4 * b], low[4 * b :]
        ch, h, w = high.shape[1:]
        crops = high.reshape(b, ch, 2, h // 2, 2, w // 2).permute(0, 2, 4, 1, 3, 5).reshape(4 * b, ch, h // 2, w // 2)
        glob = F.interpolate(high, scale_factor=0.5, mode="bilinear", align_corners=False)
        tokens = torch.cat([self.mine(glob_low, glob), self.mine(crops_low, crops).reshape(b, -1, low.shape[-1])], 1)
        return self.mm_projector(tokens)

    def splice(self, ids, feats):
        """``ids`` hold one -200 per sample, spliced as MGM's prepare_inputs_labels_for_multimodal does (token
        embeddings as stored: transformers 5 folds Gemma's scale into its embedding layer, MGM's 4.38 did not)."""
        rows = []
        for b in range(ids.shape[0]):
            at = int((ids[b] == IMAGE_TOKEN_INDEX).nonzero())
            embed = lambda x: F.embedding(x, self.llm.model.embed_tokens.weight)  # noqa: E731
            rows.append(torch.cat([embed(ids[b, :at]), feats[b], embed(ids[b, at + 1 :])]))
        return torch.stack(rows)

    def logits(self, ids, images, images_aux):
        x = self.splice(ids, self.features(images, images_aux))
        if self.gemma:  # MGM-2B scaled the whole spliced sequence, image tokens included (spec 4.1)
            x = x * torch.tensor(self.llm.config.hidden_size**0.5, dtype=x.dtype)
        return self.llm(inputs_embeds=x).logits

    def checkpoint(self, path):
        """An MGM-layout checkpoint of these weights and its config.json."""
        out = {}
        for k, v in self.clip.state_dict().items():
            k = k if k.startswith("vision_model.") else "vision_model." + k
            out["model.vision_tower.vision_tower." + k] = v
        for k, v in self.convnext.state_dict().items():
            if not k.startswith("layernorm."):  # MGM keeps the trunk only
                name = timm_name(k).replace("stem.", "vision_stem.", 1).replace("stages.", "vision_stages.", 1)
                out["model.vision_tower_aux." + name] = v
        for name, seq in (
            ("vlm_uni_query_projector", self.query),
            ("vlm_uni_aux_projector", self.key),
            ("vlm_uni_val_projector", self.val),
            ("mm_projector", self.mm_projector),
        ):
            out.update({f"model.{name}.{k}": v for k, v in seq.state_dict().items()})
        tied = self.llm.config.tie_word_embeddings
        out.update({k: v for k, v in self.llm.state_dict().items() if not (tied and k == "lm_head.weight")})
        safetensors.torch.save_file({k: v.contiguous() for k, v in out.items()}, path / "model.safetensors")
        kind, arch = ("mgm_gemma", "MGMGemmaForCausalLM") if self.gemma else ("mgm", "MGMLlamaForCausalLM")
        config = {
            **self.llm.config.to_dict(),
            "model_type": kind,
            "architectures": [arch],
            "mm_vision_select_layer": -2,
            "mm_projector_type": "mlp2x_gelu",
            "mm_hidden_size": self.clip.config.hidden_size,
            "mm_hidden_size_aux": sum(self.convnext.config.hidden_sizes),
            **self.mode,
            "vision_config": self.clip.config.to_dict(),
            "vision_aux_config": {**self.convnext.config.to_dict(), "final_norm": False},
        }
        (path / "config.json").write_text(json.dumps(config))
        return out


def mgm_inputs(mode, tokens):
    """The reference's inputs (one -200 per row) and ours (``tokens`` placeholders per row) for ``mode``."""
    views = 5 if mode == "hd" else None
    g = torch.Generator().manual_seed(1)
    size = MGM_MODES[mode]["image_size_aux"]
    images = torch.randn(2, views, 3, 28, 28, generator=g) if views else torch.randn(2, 3, 28, 28, generator=g)
    images_aux = torch.randn(2, 3, size, size, generator=g)
    ids = torch.randint(0, 160, (2, 12), generator=g)
    ids[0, 2] = ids[1, 5] = IMAGE_TOKEN_INDEX
    # ours: the placeholder expanded to one id per image token, so every sequence keeps a static length
    ours = np.stack(
        [
            np.concatenate([r[:at], np.full(tokens, IMAGE_TOKEN_INDEX), r[at + 1 :]])
            for r, at in ((ids[0].numpy(), 2), (ids[1].numpy(), 5))
        ]
    )
    return ids, images, images_aux, ours


# ------------------------------------------------------------------------------------- MGM's model_zoo/ towers
ZOO_CONVNEXT = dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], layer_scale_init_value=0.5)
# Names MGM's releases do not use: the directories' own config files say what the towers are.
CLIP_DIR = "model_zoo/Lab/tiny-clip-vit-p7"
CONVNEXT_DIR = "model_zoo/Lab/tiny_openclip_convnext"
ZOO_CLIP_TEXT = dict(
    vocab_size=50,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=16,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
)
TOWERS = ("model.vision_tower.", "model.vision_tower_aux.")


def write_zoo(root, ref):
    """The two tower directories MGM's scripts expect under ``model_zoo/``: a full OpenAI-style CLIPModel, and
    open_clip's config and weights (the trunk under ``visual.trunk.``, next to text-tower tensors)."""
    clip = transformers.CLIPModel(
        transformers.CLIPConfig(vision_config=MGM_CLIP, text_config=ZOO_CLIP_TEXT, projection_dim=8)
    )
    clip.vision_model.load_state_dict(ref.clip.state_dict())  # transformers 5 saves no vision_model. prefix
    clip.save_pretrained(root / CLIP_DIR)
    trunk = {
        "visual.trunk." + timm_name(k): v.contiguous()
        for k, v in ref.convnext.state_dict().items()
        if not k.startswith("layernorm.")
    }
    trunk.update(
        {
            "visual.head.proj.weight": torch.zeros(8, 768),
            "text.token_embedding.weight": torch.zeros(5, 8),
            "logit_scale": torch.zeros(()),
        }
    )
    (root / CONVNEXT_DIR).mkdir(parents=True)
    safetensors.torch.save_file(trunk, root / CONVNEXT_DIR / "open_clip_model.safetensors")
    vision = {
        "timm_model_name": "convnext_tiny",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "timm_drop": 0.0,
        "timm_drop_path": 0.1,
        "image_size": 64,
    }
    (root / CONVNEXT_DIR / "open_clip_config.json").write_text(
        json.dumps(
            {
                "model_cfg": {"embed_dim": 8, "vision_cfg": vision, "text_cfg": {"context_length": 16, "width": 8}},
                "preprocess_cfg": {
                    "mean": [0.48145466, 0.4578275, 0.40821073],
                    "std": [0.26862954, 0.26130258, 0.27577711],
                },
            }
        )
    )


def write_checkpoint(ref, path, *, sharded: bool):
    """``ref`` as MGM saves it: bf16 copies of both towers in the checkpoint, the towers named by path. Sharded:
    the LLM and CLIP in one shard, the projectors and the ConvNeXt copy in the other (so MGM reads only that)."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(torch.bfloat16) if k.startswith(TOWERS) else v for k, v in ref.checkpoint(path).items()}
    config = json.loads((path / "config.json").read_text())
    del config["vision_config"], config["vision_aux_config"]
    config.update(mm_vision_tower=CLIP_DIR, mm_vision_tower_aux=CONVNEXT_DIR)
    (path / "config.json").write_text(json.dumps(config))
    (path / "model.safetensors").unlink()
    if not sharded:
        safetensors.torch.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        return
    first = {k: v for k, v in tensors.items() if not k.startswith(("model.vlm_uni", "model.mm_projector", TOWERS[1]))}
    files = {
        "model-00001-of-00002.safetensors": first,
        "model-00002-of-00002.safetensors": {k: v for k, v in tensors.items() if k not in first},
    }
    for name, part in files.items():
        safetensors.torch.save_file(part, path / name, metadata={"format": "pt"})
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: name for name, part in files.items() for k in part}})
    )


def make_zoo(root):
    """Under ``root``: ``model_zoo/`` with both tower directories, and the MGM checkpoints ``MGM-single`` and
    ``MGM-sharded`` naming them; with the PyTorch reference of its weights."""
    ref = MGMReference("standard", convnext=ZOO_CONVNEXT)
    write_zoo(root, ref)
    for sharded in (False, True):
        write_checkpoint(ref, root / ("MGM-sharded" if sharded else "MGM-single"), sharded=sharded)
    return root, ref


# ------------------------------------------------------------------------------------------------ command lines
def undocumented(parser: argparse.ArgumentParser) -> list[str]:
    """The flags ``--help`` would list without a word of help."""
    return [a.dest for a in parser._actions if not isinstance(a, argparse._HelpAction) and not a.help]


def help_text(main, argv: list[str], capsys) -> str:
    """What ``main(argv + ["--help"])`` prints, whitespace collapsed (argparse wraps to the terminal's width)."""
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def on_8_devices(worker: str, *args, cwd=None, timeout: float = 1200):
    """Run ``worker`` (Python source) in a fresh process that sees 8 simulated CPU devices (the suite's XLA flags
    kept) with ``args`` as ``sys.argv[1:]``; the JSON its last stdout line prints."""
    root = Path(__file__).resolve().parents[1]
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(root)}
    run = subprocess.run(
        [sys.executable, "-c", worker, *args], capture_output=True, text=True, env=env, cwd=cwd or root, timeout=timeout
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])
